"""TensorFlow-only pieces of data-parallel training (imported lazily, only
with the TensorFlow backend): `tf.distribute.MirroredStrategy`, and a sum
across its replicas for the loss normalizer."""

from __future__ import annotations

import json
import os

import tensorflow as tf


def mirrored_strategy(num_replicas: int) -> tf.distribute.MirroredStrategy:
    """A `MirroredStrategy` over `num_replicas` GPUs or, without GPUs, over
    as many logical CPU devices (which must then be configured before
    TensorFlow starts: see `split_cpu`)."""
    gpus = tf.config.list_logical_devices("GPU")
    devices = gpus or tf.config.list_logical_devices("CPU")
    if len(devices) < num_replicas:
        kind = "GPUs" if gpus else "logical CPU devices"
        raise ValueError(
            f"MirroredStrategy over {num_replicas} replicas needs as many "
            f"devices, but TensorFlow sees {len(devices)} {kind}; use "
            f"--mesh {len(devices)}x1, or on CPU call "
            "keras_aim.training.distribution_tf.split_cpu(n) before TensorFlow starts."
        )
    return tf.distribute.MirroredStrategy(
        [device.name for device in devices[:num_replicas]]
    )


def split_cpu(num_devices: int) -> None:
    """Splits the CPU into `num_devices` logical devices (for running
    MirroredStrategy without GPUs); must run before TensorFlow initializes
    its runtime, i.e. before the first tensor is created."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices
        )
    except RuntimeError as error:
        if len(tf.config.list_logical_devices("CPU")) >= num_devices:
            return
        raise RuntimeError(
            f"Cannot split the CPU into {num_devices} devices: TensorFlow is "
            "already initialized. Split it before creating any tensor or model."
        ) from error


def sum_over_replicas(value):
    """`value` summed over the replicas of the current `tf.distribute`
    strategy (unchanged outside a multi-replica step)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def is_chief() -> bool:
    """Whether this process is the one that writes shared files in a
    multi-worker run (`TF_CONFIG`'s chief, else worker 0); True without
    `TF_CONFIG`."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task") or {}
    if not task:
        return True
    if "chief" in (config.get("cluster") or {}):
        return task.get("type") == "chief"
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0
