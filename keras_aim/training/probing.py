"""Attentive probes on a frozen trunk: features once, then a small model.

The trunk runs once over the data (no augmentation) and the averaged block
outputs are kept; the probe (`AIMAttentionProbe`) then trains on them in
seconds. The trained probe drops into an `AIMImageClassifier`. For data
too large to keep its features (ImageNet: terabytes),
`keras_aim.training.streaming_probe` trains the probe batch by batch on the
frozen trunk instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Sequence

import keras
import numpy as np

from keras_aim.layers import AIMAttentionProbe
from keras_aim.training.distribution import each_process_alone
from keras_aim.training.interrupts import StopOnNonFinite, check_finite_weights
from keras_aim.training.optimizers import adamw_warmup_cosine
from keras_aim.utils.atomic_files import atomic_directory, atomic_file


class _BlockFeatures(keras.Model):
    """`backbone.extract_features(images, blocks)` as a model, so that
    `predict_on_batch` compiles it once (per input shape) on backends that
    compile, instead of running it op by op."""

    def __init__(self, backbone, block_indices: Sequence[int], **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.block_indices = list(block_indices)

    def call(self, images):
        return self.backbone.extract_features(images, self.block_indices)


def _feature_batches(backbone, images, block_indices, batch_size):
    """Yields `(features (b, N, D) float32, labels (b,) or None)` per batch;
    raises once the data turns out to hold no images."""
    if isinstance(images, np.ndarray):
        images = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    extractor = _BlockFeatures(backbone, block_indices, name="block_features")
    full = None  # the first batch's size: a shorter last batch is padded to it
    empty = True
    for batch in images:
        labels = None
        if isinstance(batch, (tuple, list)):
            batch, labels = batch[0], np.asarray(batch[1])
        batch = np.asarray(batch)
        backbone.check_images(batch)  # a clear error before any tracing
        count = len(batch)
        full = full or count
        if count < full:  # same shape, so no second compilation
            batch = np.concatenate([batch, np.repeat(batch[-1:], full - count, axis=0)])
        features = extractor.predict_on_batch(batch)[:count]
        empty = False
        yield keras.ops.convert_to_numpy(features).astype("float32"), labels
    if empty:
        raise ValueError("No images to extract features from: the data is empty.")


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
    for features, batch_labels in _feature_batches(
        backbone, images, block_indices, batch_size
    ):
        outputs.append(features)
        if batch_labels is not None:
            labels.append(batch_labels)
    features = np.concatenate(outputs)
    if not return_labels:
        return features
    if len(labels) != len(outputs):
        raise ValueError("return_labels needs a dataset of (images, labels) batches.")
    return features, np.concatenate(labels)


def trunk_checksum(backbone) -> str:
    """SHA-256 of a trunk's config and every weight (in order, by path):
    equal checksums mean the same features."""
    digest = hashlib.sha256(
        json.dumps(backbone.get_config(), sort_keys=True, default=str).encode()
    )
    for variable in backbone.weights:
        digest.update(variable.path.encode())
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(variable)).tobytes())
    return digest.hexdigest()


def cached_probe_features(
    backbone,
    batches,
    block_indices: Sequence[int],
    cache_dir: str,
    data_fingerprint: str,
    log=print,
    cache_dtype: str = "float32",
    checksum: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`probe_features(..., return_labels=True)` through an on-disk cache.

    The cache entry is keyed by the SHA-256 of the trunk's weights and
    config (`checksum`, `trunk_checksum(backbone)` when not given),
    `data_fingerprint` (which must change whenever the images, labels or
    their preprocessing do), the blocks, the compute dtype and
    `cache_dtype`, so a stale entry is never reused. Features are streamed
    to disk batch by batch and come back memory-mapped `(n, N, D)` (a sweep
    over a large set does not need them in RAM), float32 or, with
    `cache_dtype="bfloat16"`, bfloat16 (half the disk; `np.asarray(features,
    "float32")` converts); labels `(n,)`. An entry is written into a
    staging folder and renamed when complete; an unreadable entry is
    rebuilt.
    """
    storage = _storage_dtype(cache_dtype)
    entry, key = feature_cache_entry(
        cache_dir, checksum or trunk_checksum(backbone), data_fingerprint, block_indices,
        cache_dtype,
    )
    if os.path.isdir(entry):
        try:
            features, labels = _read_cache_entry(entry, key)
            log(f"feature cache hit: {entry}")
            return features, labels
        except (OSError, ValueError, KeyError) as error:
            log(f"feature cache entry {entry} is unreadable ({error}); rebuilding it")
            shutil.rmtree(entry, ignore_errors=True)
    with atomic_directory(entry) as staging:
        count, shape, labels = 0, None, []
        with open(os.path.join(staging, _FEATURE_FILES[cache_dtype]), "wb") as handle:
            for features, batch_labels in _feature_batches(
                backbone, batches, block_indices, 256
            ):
                if batch_labels is None:
                    raise ValueError("The feature cache needs (images, labels) batches.")
                handle.write(features.astype(storage).tobytes())
                labels.append(batch_labels)
                count, shape = count + len(features), features.shape[1:]
        np.save(os.path.join(staging, "labels.npy"), np.concatenate(labels))
        meta = {"key": key, "shape": [count, *shape], "data": data_fingerprint,
                "blocks": list(block_indices), "dtype": cache_dtype}
        with open(os.path.join(staging, "meta.json"), "w") as handle:
            json.dump(meta, handle)
    log(f"feature cache written: {entry} ({count} images, {cache_dtype})")
    return _read_cache_entry(entry, key)


_CACHE_FORMAT = 1
CACHE_DTYPES = ("float32", "bfloat16")
_FEATURE_FILES = {"float32": "features.f32", "bfloat16": "features.bf16"}


def _storage_dtype(cache_dtype: str) -> np.dtype:
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype must be one of {CACHE_DTYPES}; received {cache_dtype!r}.")
    if cache_dtype == "bfloat16":
        import ml_dtypes  # comes with TensorFlow and JAX

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype("float32")


def feature_cache_entry(
    cache_dir: str, checksum: str, data_fingerprint: str, block_indices: Sequence[int],
    cache_dtype: str = "float32",
) -> tuple[str, str]:
    """`(folder, key)` of the cache entry of a trunk (`trunk_checksum`), a
    data fingerprint, blocks and storage dtype under the current dtype
    policy; the folder exists once the entry is complete."""
    parts = [
        f"v{_CACHE_FORMAT}", checksum, data_fingerprint,
        ",".join(str(i) for i in block_indices),
        str(keras.config.dtype_policy().name),
    ]
    if cache_dtype != "float32":  # float32 entries keep their earlier keys
        parts.append(f"stored:{cache_dtype}")
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    return os.path.join(cache_dir, f"features-{key[:32]}"), key


def _read_cache_entry(entry: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    with open(os.path.join(entry, "meta.json")) as handle:
        meta = json.load(handle)
    if meta["key"] != key:
        raise ValueError("its key does not match")
    shape = tuple(meta["shape"])
    cache_dtype = meta.get("dtype", "float32")
    storage = _storage_dtype(cache_dtype)
    path = os.path.join(entry, _FEATURE_FILES[cache_dtype])
    if os.path.getsize(path) != storage.itemsize * int(np.prod(shape)):
        raise ValueError(f"{os.path.basename(path)} has the wrong size")
    labels = np.load(os.path.join(entry, "labels.npy"))
    if len(labels) != shape[0]:
        raise ValueError("labels.npy has the wrong length")
    return np.memmap(path, dtype=storage, mode="r", shape=shape), labels


def feature_bytes(count: int, tokens: int, width: int, dtype: str = "float32") -> int:
    """Bytes of `count` images' probe features `(tokens, width)` in `dtype`."""
    return int(count) * int(tokens) * int(width) * _storage_dtype(dtype).itemsize


def free_disk_bytes(path: str) -> int:
    """Free bytes on the file system that holds `path` (or its nearest
    existing parent folder)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def available_memory_bytes() -> int | None:
    """Bytes of RAM available to a new allocation (Linux: MemAvailable,
    which counts reclaimable page cache; else free pages); `None` when the
    system does not say."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


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
    callbacks: Sequence[keras.callbacks.Callback] = (),
    gradient_accumulation_steps: int | None = None,
) -> keras.Model:
    """Trains an `AIMAttentionProbe` on features `(n, N, D)` (e.g. from
    `probe_features`) with AdamW and a warmup + cosine schedule. Returns a
    model mapping `(B, N, D)` features to logits; its layer `probe` fits
    `AIMImageClassifier.probe`. `callbacks` go to `fit` (e.g. TensorBoard,
    `keras.callbacks.BackupAndRestore` to resume). In a multi-process run
    every process trains the same probe on its own device (each holds all
    the features; a probe is too small to be worth splitting)."""
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
    with each_process_alone():
        inputs = keras.Input(shape=features.shape[1:], name="features")
        probe = AIMAttentionProbe(features.shape[-1], num_classes, num_heads, name="probe")
        model = keras.Model(inputs, probe(inputs))
        steps = epochs * int(np.ceil(len(labels) / batch_size))
        model.compile(
            optimizer=adamw_warmup_cosine(
                learning_rate, steps, weight_decay, gradient_accumulation_steps
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        model.fit(features, labels, batch_size=batch_size, epochs=epochs, verbose=verbose,
                  callbacks=[StopOnNonFinite(), *callbacks])
    check_finite_weights(model, "the probe")
    return model


def probe_logits(model, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits `(n, num_classes)` float32 of a probe layer on features
    `(n, N, D)` (which may be memory-mapped), or of a classifier on images,
    batch by batch in inference mode."""
    logits = [
        keras.ops.convert_to_numpy(
            keras.ops.cast(model(_float32(inputs[i : i + batch_size]), training=False),
                           "float32")
        )
        for i in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(logits)


def _float32(batch) -> np.ndarray:
    """A batch as an array that every backend takes (bfloat16 features of
    the cache as float32)."""
    batch = np.asarray(batch)
    return batch.astype("float32") if batch.dtype.name == "bfloat16" else batch


def classifier_logits(classifier, batches) -> tuple[np.ndarray, np.ndarray]:
    """`(logits (n, C) float32, labels (n,))` of a classifier over a dataset
    of `(normalized images, labels)` batches, in inference mode."""
    logits, labels = [], []
    for images, batch_labels in batches:
        logits.append(probe_logits(classifier, np.asarray(images), batch_size=len(images)))
        labels.append(np.asarray(batch_labels))
    if not logits:
        raise ValueError("No images to evaluate on: the data is empty.")
    return np.concatenate(logits), np.concatenate(labels)


def save_probe(classifier, directory: str) -> str:
    """Writes `classifier`'s probe (and nothing of the trunk) to
    `directory/probe.weights.h5` through a temporary file; returns the
    path. Load it with `classifier.load_task_weights` or
    `keras_aim.models.aim.convert_aim.load_head`."""
    path = os.path.join(directory, "probe.weights.h5")
    with atomic_file(path) as staging:
        classifier.save_task_weights(staging)
    return path


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose label is among the k largest logits."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    top = np.argsort(-logits, axis=-1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=-1)))
