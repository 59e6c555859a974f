"""The checks the exported serving signatures run where a request enters.

Without them an empty batch or an image without pixels fails deep inside
the graph with a framework message (a resize's "output dimensions must be
positive", a gather's shapes in StableHLO, "Incompatible shapes" in a
norm). These run first, as TensorFlow assertions ahead of any other op, so
a TF Serving client gets `InvalidArgumentError` with a message that names
the problem, the fix and the shape it sent:

    assertion failed: [the batch is empty: send at least one image per request; received shape] [0 40 52 3]

TensorFlow ops, called while the signatures are traced: TensorFlow is
imported inside the functions (keras_aim's backend-specific part).
"""

from __future__ import annotations

EMPTY_BATCH = "the batch is empty"
EMPTY_IMAGE = "images must have height and width > 0"


def _after(check, tensor):
    """`tensor`, through an op that runs only once `check` has passed: the
    assertion always answers before the ops that would fail on the input."""
    import tensorflow as tf

    with tf.control_dependencies([check]):
        return tf.identity(tensor)


def checked_batch(tensor, item: str = "image"):
    """`tensor` (batch first), asserted to hold at least one `item`."""
    import tensorflow as tf

    shape = tf.shape(tensor)
    check = tf.debugging.Assert(
        shape[0] > 0,
        [f"{EMPTY_BATCH}: send at least one {item} per request; received shape", shape],
        summarize=8,
    )
    return _after(check, tensor)


def checked_size(images):
    """`images` (`(..., H, W, C)`: one image or a batch), asserted to have
    at least one row and one column."""
    import tensorflow as tf

    shape = tf.shape(images)
    check = tf.debugging.Assert(
        tf.reduce_all(shape[-3:-1] > 0),
        [f"{EMPTY_IMAGE}: send images with pixels; received shape", shape],
        summarize=8,
    )
    return _after(check, images)


def checked_images(images):
    """A batch of images `(B, H, W, C)`, asserted to be non-empty and of a
    size with pixels (the batch checked first)."""
    return checked_size(checked_batch(images, "image"))


__all__ = ["EMPTY_BATCH", "EMPTY_IMAGE", "checked_batch", "checked_images", "checked_size"]
