"""TensorFlow-only pieces of data-parallel training (imported lazily, only
with the TensorFlow backend): `tf.distribute.MirroredStrategy` (one
process) and `MultiWorkerMirroredStrategy` (several, from `TF_CONFIG`), a
sum across replicas for the loss normalizer, and AdamW that clips the
gradient summed over all replicas."""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf

from keras_aim.layers import attention


def replica_position() -> tuple[int, int]:
    """`(this replica's index, replicas in sync)`: under MirroredStrategy
    and MultiWorkerMirroredStrategy, replica i holds rows
    `[i * b, (i + 1) * b)` of each global batch of `replicas * b`. `(0, 1)`
    outside a multi-replica step."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return 0, 1
    return context.replica_id_in_sync_group, context.num_replicas_in_sync


# Layers that draw per image of the global batch (AIMPrefixSampler) ask this.
attention.set_replica_position(replica_position)


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


_MULTI_WORKER: list = []  # the one MultiWorkerMirroredStrategy of the process


def multi_worker_strategy(num_replicas: int) -> tf.distribute.MultiWorkerMirroredStrategy:
    """The process's `MultiWorkerMirroredStrategy` over the workers that
    `TF_CONFIG` lists (created on the first call, which must come before
    TensorFlow runs anything); raises ValueError unless it has
    `num_replicas` replicas in all (workers x local GPUs, or one CPU per
    worker)."""
    if not _MULTI_WORKER:
        config = json.loads(os.environ.get("TF_CONFIG") or "{}")
        if not config.get("cluster") or not config.get("task"):
            raise ValueError(
                "Multi-worker training with TensorFlow reads its workers from "
                "TF_CONFIG, which is not set; set it on every worker, e.g. "
                '{"cluster": {"worker": ["host0:12345", "host1:12345"]}, '
                '"task": {"type": "worker", "index": 0}}.'
            )
        _MULTI_WORKER.append(tf.distribute.MultiWorkerMirroredStrategy())
        _reduce_scalar_logs_across_workers()
    strategy = _MULTI_WORKER[0]
    if strategy.num_replicas_in_sync != num_replicas:
        raise ValueError(
            f"The mesh asks for {num_replicas} data-parallel replicas, but the "
            f"{strategy.cluster_resolver.cluster_spec().num_tasks('worker')} "
            f"workers of TF_CONFIG give {strategy.num_replicas_in_sync}; use "
            f"--mesh {strategy.num_replicas_in_sync}x1."
        )
    return strategy


def _reduce_scalar_logs_across_workers() -> None:
    """Works around a Keras 3.15 bug: under MultiWorkerMirroredStrategy its
    TensorFlow trainer averages each step's logs over the workers with
    `strategy.reduce("MEAN", value, axis=0)`, which fails for the scalar
    loss ("Invalid reduction dimension 0 for input with 0 dimensions",
    tensorflow/tensorflow#72388), so `fit` cannot run. Scalars are averaged
    without an axis instead; everything else goes to Keras' own code. Done
    once, when the multi-worker strategy is made; skipped if Keras changed."""
    from keras.src.backend.tensorflow import trainer
    from keras.src import tree

    original = getattr(trainer, "reduce_per_replica", None)
    multi_worker = getattr(trainer, "_collective_all_reduce_multi_worker", None)
    if original is None or multi_worker is None or getattr(original, "keras_aim", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not multi_worker(strategy):
            return original(values, strategy, reduction)
        return tree.map_structure(
            lambda v: strategy.reduce("MEAN", v, axis=0 if v.shape.rank else None), values
        )

    reduce_per_replica.keras_aim = True
    trainer.reduce_per_replica = reduce_per_replica


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


def task_number() -> int:
    """This process's number in a multi-worker run (`TF_CONFIG`): 0 for the
    chief (or, without one, worker 0), then the workers in order; 0 without
    `TF_CONFIG`."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task") or {}
    if not task:
        return 0
    index = int(task.get("index", 0))
    if "chief" in (config.get("cluster") or {}):
        return 0 if task.get("type") == "chief" else index + 1
    return index


def is_chief() -> bool:
    """Whether this process writes the shared files of a multi-worker run."""
    return task_number() == 0


@keras.saving.register_keras_serializable(package="keras_aim")
class GlobalNormClipAdamW(keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` whose `global_clipnorm` (or `clipnorm`)
    applies to the gradient of the whole global batch under a
    `tf.distribute` strategy, as on one device and under JAX's
    `keras.distribution`.

    Why: Keras 3.15's TensorFlow optimizer clips each replica's gradient and
    sums the replicas afterwards (in `_backend_update_step`), so a clipped
    step differs from the single-device step. Here the sum over replicas
    comes first, in `_clip_gradients`, and the later all-reduce is skipped
    (it would add the already-summed gradients again). Outside a
    multi-replica strategy it is plain AdamW.
    """

    def _clip_gradients(self, grads):
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            present = [g for g in grads if g is not None]
            summed = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present))
            grads = [None if g is None else next(summed) for g in grads]
        return super()._clip_gradients(grads)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        # Already summed over the replicas in `_clip_gradients`, which Keras
        # calls before every update.
        return list(grads_and_vars)
