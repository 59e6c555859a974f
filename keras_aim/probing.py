"""Attentive probes on a frozen trunk: features once, then a small model.

The trunk runs once over the data (no augmentation) and the averaged block
outputs are kept; the probe (`AIMAttentionProbe`) then trains on them in
seconds. The trained probe drops into an `AIMImageClassifier`.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np

from keras_aim.layers import AIMAttentionProbe


def probe_features(
    backbone,
    images,
    block_indices: Sequence[int],
    batch_size: int = 256,
    return_labels: bool = False,
):
    """Average of the given blocks' outputs (before the final norm), the
    probe's input, for normalized `images` `(n, H, W, C)` (an array or a
    batched dataset of images or of (images, labels)) -> `(n, N, D)`
    float32; with `return_labels`, also the datasets' labels `(n,)`, read
    in the same pass."""
    outputs, labels = [], []
    if isinstance(images, np.ndarray):
        if len(images) == 0:
            raise ValueError("No images to extract features from.")
        batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    else:
        batches = images

    for batch in batches:
        if isinstance(batch, (tuple, list)):
            batch, batch_labels = batch[0], batch[1]
            labels.append(np.asarray(batch_labels))
        features = backbone.extract_features(batch, list(block_indices))
        outputs.append(keras.ops.convert_to_numpy(features).astype("float32"))
    features = np.concatenate(outputs)
    if not return_labels:
        return features
    if len(labels) != len(outputs):
        raise ValueError("return_labels needs a dataset of (images, labels) batches.")
    return features, np.concatenate(labels)


def train_attentive_probe(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    num_heads: int,
    epochs: int = 30,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
    verbose: int = 0,
) -> keras.Model:
    """Trains an `AIMAttentionProbe` on cached features with AdamW and a
    warmup + cosine schedule. Returns a model mapping `(B, N, D)` features
    to logits; its layer `probe` fits `AIMImageClassifier.probe`."""
    features = np.asarray(features, "float32")
    labels = np.asarray(labels)
    if len(labels) == 0 or len(features) != len(labels):
        raise ValueError(
            f"Need as many labels as feature rows; got {len(features)} features "
            f"and {len(labels)} labels."
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"Labels must be in [0, {num_classes}); found {labels.min()}..{labels.max()}."
        )
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=features.shape[1:], name="features")
    probe = AIMAttentionProbe(features.shape[-1], num_classes, num_heads, name="probe")
    model = keras.Model(inputs, probe(inputs))
    steps = epochs * int(np.ceil(len(labels) / batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, steps - steps // 10), warmup_target=learning_rate,
        warmup_steps=max(1, steps // 10),
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(features, labels, batch_size=batch_size, epochs=epochs, verbose=verbose)
    return model


def top1_accuracy(model: keras.Model, features: np.ndarray, labels: np.ndarray) -> float:
    logits = model.predict(np.asarray(features, "float32"), batch_size=512, verbose=0)
    return topk_accuracy(logits, labels, 1)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose label is among the k largest logits."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    top = np.argsort(-logits, axis=-1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=-1)))
