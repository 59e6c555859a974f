"""Pre-training under tf.distribute.MirroredStrategy on 2 logical CPU
devices and on one device: the loss and gradients (computed directly), the
losses of three optimizer steps and the weights after them, as JSON (the
largest differences). Run in its own process (TensorFlow backend): the CPU
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
from tests.conftest import (  # noqa: E402
    fixed_prefix_lengths,
    fixed_prefix_loss_terms,
    loss_and_gradients,
    make_tiny_backbone,
)

STEPS = 3
CLIP = 0.05


def pretrainer(initial=None):
    model = keras_aim.AIMPretrainer(
        make_tiny_backbone(), pixel_head_width=32, pixel_head_depth=2, seed=0
    )
    # A small clipping norm, so that clipping changes every step: it applies
    # to the gradient summed over the replicas, as on one device.
    model.compile(
        optimizer=keras_aim.pretraining_optimizer(learning_rate=1e-3, global_clipnorm=CLIP)
    )
    if initial is not None:
        model.set_weights(initial)
    return model


def mirrored_loss_and_gradients(strategy, model, images):
    """Each replica's loss and gradients on its half of the batch (the loss
    divides by the global target count), summed over the replicas."""
    lengths = fixed_prefix_lengths(model, len(images))
    batch = next(iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((images, lengths)).batch(len(images)))))

    @tf.function
    def step(batch):
        def replica(x, n):
            with tf.GradientTape() as tape:
                error, count = fixed_prefix_loss_terms(model, x, n)
                loss = error / distribution_tf.sum_over_replicas(count)
            return loss, tape.gradient(loss, model.trainable_variables)

        losses, gradients = strategy.run(replica, args=batch)
        total = strategy.reduce("SUM", losses, axis=None)
        return total, [strategy.reduce("SUM", g, axis=None) for g in gradients]

    loss, gradients = step(batch)
    return float(loss), [g.numpy() for g in gradients]


def train(model, images):
    """`STEPS` optimizer steps through `fit` on a dataset of one batch, as
    the recipe trains: under the strategy, each replica gets its half of it
    (`train_on_batch` would give every replica the whole batch)."""
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(len(images))
    history = model.fit(dataset, epochs=STEPS, verbose=0, shuffle=False)
    return history.history["loss"], [keras.ops.convert_to_numpy(w) for w in model.weights]


def largest_difference(a, b, relative=False):
    return max(
        float(np.max(np.abs(x - y)) / ((np.max(np.abs(x)) or 1.0) if relative else 1.0))
        for x, y in zip(a, b)
    )


images = np.random.default_rng(1).normal(size=(8, 32, 32, 3)).astype("float32")
single = pretrainer()
initial = single.get_weights()
single_loss, single_gradients = loss_and_gradients(single, images)
single_losses, single_weights = train(single, images)
strategy = distribution_tf.mirrored_strategy(2)
with strategy.scope():
    mirrored = pretrainer(initial)
    mirrored_loss, mirrored_gradients = mirrored_loss_and_gradients(strategy, mirrored, images)
    mirrored_losses, mirrored_weights = train(mirrored, images)
print(json.dumps({
    "replicas": strategy.num_replicas_in_sync,
    "clip": CLIP,
    "gradient_norm": float(np.sqrt(sum(np.sum(g ** 2) for g in single_gradients))),
    "single_loss": single_loss,
    "mirrored_loss": mirrored_loss,
    "max_relative_gradient_difference": largest_difference(
        single_gradients, mirrored_gradients, relative=True),
    "single_step_losses": single_losses,
    "mirrored_step_losses": mirrored_losses,
    "max_weight_difference": largest_difference(single_weights, mirrored_weights),
}))
