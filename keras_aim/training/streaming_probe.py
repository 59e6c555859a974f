"""Attentive probes trained and evaluated on a frozen trunk, batch by batch.

`keras_aim.training.probing` runs the trunk once and keeps every token of
every image (n x N x D numbers: about 2 TB for ImageNet's training split on
a large trunk). Here the frozen trunk runs inside the model that `fit`
trains, on an endless stream of augmented batches, and evaluation counts
correct predictions batch by batch: memory does not depend on the number
of images, and the probe sees a new augmentation of every image each pass
(the paper's protocol) instead of one fixed view.

The trunk runs in its own dtype policy (e.g. `bfloat16`, about half the
time and memory of float32); the probe that `train_streaming_probe` builds
trains in float32 on the trunk's features cast to float32.

This module takes ready batches; the pipelines that make them are in
`keras_aim.data.pipelines` (`classification_stream`, `evaluation_batches`).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import keras
import numpy as np

from keras_aim.layers import AIMAttentionProbe
from keras_aim.training.interrupts import StopOnNonFinite, check_finite_weights
from keras_aim.training.optimizers import adamw_warmup_cosine


class ProbeOnTrunk(keras.Model):
    """A probe on the averaged outputs of some blocks of a frozen trunk:
    images `(B, H, W, C)` -> logits `(B, num_classes)`. No gradient flows
    into the trunk (its activations are not kept for the backward pass)."""

    def __init__(self, backbone, block_indices: Sequence[int], probe, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.block_indices = list(block_indices)
        self.probe = probe

    def call(self, images, training=False):
        features = self.backbone.extract_features(images, self.block_indices)
        features = keras.ops.stop_gradient(features)
        features = keras.ops.cast(features, self.probe.compute_dtype)
        return self.probe(features, training=training)


def train_streaming_probe(
    backbone,
    batches,
    block_indices: Sequence[int],
    num_classes: int,
    steps_per_epoch: int,
    epochs: int = 30,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
    verbose: int = 0,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    gradient_accumulation_steps: int | None = None,
    num_heads: int | None = None,
    image_shape: Sequence[int | None] | None = None,
) -> ProbeOnTrunk:
    """Trains a new `AIMAttentionProbe` (float32) on `backbone`'s frozen
    features of `batches`, an endless dataset of `(normalized images,
    int labels)` batches (e.g. `keras_aim.data.classification_stream`), for
    `epochs` epochs of `steps_per_epoch` batches, with the optimizer and
    schedule of `probing.train_attentive_probe` (AdamW, warmup + cosine
    over all the steps).

    `backbone.trainable` is set to False (the trunk stays frozen
    afterwards). Call it inside a `keras.distribution` scope or a
    `tf.distribute` strategy's scope to train data parallel; in a
    multi-process run each process passes its own part of every global
    batch (`classification_stream(shard=...)`) with Keras' auto-sharding
    off. `callbacks` go to `fit` (a `keras.callbacks.BackupAndRestore` backs
    up the whole model, the trunk included; a resumed run continues the
    schedule at its epoch, and gets the same batches as an uninterrupted one
    when its stream starts at that epoch's first batch: `recipes.
    attentive_probe` reads the epoch with `checkpointing.backup_epoch`).

    `image_shape`: `(H, W, C)` of the images (default: the trunk's, else
    the dataset's `element_spec`); the model is built on it before `fit`.

    Returns the trained `ProbeOnTrunk`; its layer `probe` fits
    `AIMImageClassifier.probe` (`classifier.probe.set_weights(...)`).
    """
    if steps_per_epoch < 1 or epochs < 1:
        raise ValueError(
            f"steps_per_epoch and epochs must be >= 1; received {steps_per_epoch} "
            f"and {epochs}."
        )
    keras.utils.set_random_seed(seed)
    backbone.trainable = False
    probe = AIMAttentionProbe(
        backbone.hidden_dim, num_classes, num_heads or backbone.num_heads,
        dtype="float32", name="probe",
    )
    model = ProbeOnTrunk(backbone, block_indices, probe, name="streaming_probe")
    model(keras.Input(shape=_image_shape(backbone, batches, image_shape)))  # builds it
    model.compile(
        optimizer=adamw_warmup_cosine(
            learning_rate, epochs * steps_per_epoch, weight_decay, gradient_accumulation_steps
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(
        batches, epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=verbose,
        callbacks=[StopOnNonFinite(), *callbacks],
        shuffle=False,  # the stream is shuffled by its pipeline
    )
    check_finite_weights(probe, "the probe")
    return model


def _image_shape(backbone, batches, image_shape) -> tuple:
    if image_shape is None and None not in tuple(backbone.image_shape):
        image_shape = backbone.image_shape
    if image_shape is None and hasattr(batches, "element_spec"):
        image_shape = batches.element_spec[0].shape[1:]
    if image_shape is None or None in tuple(image_shape):
        raise ValueError(
            "The image size of the batches is unknown (a trunk of any size and "
            "batches without an element_spec); pass image_shape=(H, W, C)."
        )
    return tuple(int(side) for side in image_shape)


def evaluate_streaming_probe(
    backbone,
    probe,
    block_indices: Sequence[int],
    batches: Iterable,
    top_k: Sequence[int] = (1, 5),
) -> dict:
    """Top-k accuracies of `probe` (an `AIMAttentionProbe`, e.g. a trained
    `ProbeOnTrunk`'s layer `probe` or a classifier's) on `backbone`'s
    features of `batches`, `(normalized images, labels)` batches that hold
    every image once (e.g. `keras_aim.data.evaluation_batches`).

    Only the counts of correct predictions are kept, batch by batch. A
    smaller last batch is padded to the first batch's size (one compiled
    shape) and its padding dropped.

    Returns `{"top1": float, "top5": float, ..., "count": images}` (one key
    per `top_k`). Raises `ValueError` when `batches` hold no image.

    In a multi-process run, give every process all the images: each
    evaluates the whole split itself and gets the same figures.
    """
    correct, count = count_correct(backbone, probe, block_indices, batches, top_k)
    if count == 0:
        raise ValueError("No images to evaluate on: the data is empty.")
    result = {f"top{k}": float(c) / count for k, c in zip(top_k, correct)}
    result["count"] = int(count)
    return result


def count_correct(
    backbone, probe, block_indices: Sequence[int], batches: Iterable,
    top_k: Sequence[int] = (1, 5),
) -> tuple[np.ndarray, int]:
    """`(correct predictions per k in top_k (int64), images)` of `probe` on
    `backbone`'s features of `batches` (see `evaluate_streaming_probe`)."""
    model = ProbeOnTrunk(backbone, block_indices, probe, name="probe_on_trunk")
    correct = np.zeros(len(top_k), "int64")
    count, full = 0, None
    for images, labels in batches:
        images, labels = np.asarray(images), np.asarray(labels).reshape(-1)
        backbone.check_images(images)  # a clear error before any tracing
        size = len(images)
        if size == 0:
            continue
        full = full or size
        if size < full:  # same shape as the others: no second compilation
            images = np.concatenate([images, np.repeat(images[-1:], full - size, axis=0)])
        logits = np.asarray(
            keras.ops.convert_to_numpy(model.predict_on_batch(images)), "float32"
        )[:size]
        correct += topk_correct(logits, labels, top_k)
        count += size
    return correct, count


def topk_correct(logits: np.ndarray, labels: np.ndarray, top_k: Sequence[int]) -> np.ndarray:
    """How many rows have their label among their k largest logits, per k."""
    order = np.argsort(-logits, axis=-1)
    hits = order == labels[:, None]
    return np.array([int(np.sum(np.any(hits[:, :k], axis=-1))) for k in top_k], "int64")
