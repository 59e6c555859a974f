"""One pre-training step, with gradient clipping, under
tf.distribute.MirroredStrategy on 2 logical CPU devices and on one device;
prints both losses, the largest weight difference and the gradient norm as
JSON. Run in its own process (TensorFlow backend): the CPU
must be split before TensorFlow starts."""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_aim.training import distribution_tf  # noqa: E402

distribution_tf.split_cpu(2)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_aim  # noqa: E402
from tests.conftest import make_tiny_backbone  # noqa: E402


def one_step(images, initial=None):
    pretrainer = keras_aim.AIMPretrainer(
        make_tiny_backbone(), pixel_head_width=32, pixel_head_depth=2, seed=0
    )
    # A small clipping norm, so that clipping changes the step: it applies to
    # the gradient summed over the replicas, as on one device.
    pretrainer.compile(
        optimizer=keras_aim.pretraining_optimizer(learning_rate=1e-3, global_clipnorm=CLIP)
    )
    if initial is not None:
        pretrainer.set_weights(initial)
    before = [keras.ops.convert_to_numpy(w) for w in pretrainer.weights]
    loss = float(pretrainer.train_on_batch(images))
    return before, loss, [keras.ops.convert_to_numpy(w) for w in pretrainer.weights]


CLIP = 0.05
images = np.random.default_rng(1).normal(size=(8, 32, 32, 3)).astype("float32")
initial, single_loss, single_after = one_step(images)
strategy = distribution_tf.mirrored_strategy(2)
with strategy.scope():
    _, mirrored_loss, mirrored_after = one_step(images, initial)
probe = keras_aim.AIMPretrainer(make_tiny_backbone(), pixel_head_width=32, pixel_head_depth=2, seed=0)
probe.set_weights(initial)
with tf.GradientTape() as tape:
    loss = probe.compute_loss(images, None, probe(images, training=True))
gradient_norm = float(tf.linalg.global_norm(tape.gradient(loss, probe.trainable_variables)))
print(json.dumps({
    "replicas": strategy.num_replicas_in_sync,
    "clip": CLIP,
    "gradient_norm": gradient_norm,
    "single_loss": single_loss,
    "mirrored_loss": mirrored_loss,
    "max_weight_difference": max(
        float(np.max(np.abs(a - b))) for a, b in zip(single_after, mirrored_after)
    ),
}))
