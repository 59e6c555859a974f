"""Data and model parallelism for AIM through `keras.distribution`.

A mesh is written `BATCHxMODEL` (`"8x1"`: data parallel on 8 devices,
`"2x4"`: 2 data-parallel groups of 4 model-parallel devices). With the JAX
backend, `distribution_for_mesh` returns a `keras.distribution.DataParallel`
(model axis 1) or a `ModelParallel` driven by `layout_map`; models built or
loaded from a preset inside its `scope()` get their variables created
directly with their sharding (Keras initializes large variables with a
sharded, jitted initializer and places loaded values shard by shard).

With TensorFlow, `keras.distribution` is not available in Keras 3.15; data
parallelism uses `tf.distribute.MirroredStrategy`, and across processes
`MultiWorkerMirroredStrategy` (see `keras_aim.training.distribution_tf`).
With PyTorch neither exists: asking for more than one device raises
`DistributionUnavailableError`.

Several processes (hosts): every process runs the same command;
`initialize_multi_host` starts JAX's distributed runtime from Keras'
environment variables and `check_multi_host` refuses meshes that leave
devices out and processes started with different settings
(`keras_aim.training.distribution_jax` holds the JAX-only parts).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

import keras
import numpy as np

BATCH_DIM = "batch"
MODEL_DIM = "model"

# Variable path patterns (regexes, matched against the whole `variable.path`)
# and how their axes map onto the mesh. Megatron-style: the first matmul of a
# pair (qkv, fc1, probe k/v) is split on its output dimension and the second
# (proj, fc2, probe linear) on its input dimension, so each pair needs one
# all-reduce. Everything else (norms, biases, the probe query, the BatchNorm
# statistics) is small and replicated.
_MODEL_SHARDED = {
    # Trunk and pixel-head transformer blocks.
    r".*attn/qkv/kernel": (None, MODEL_DIM),
    r".*attn/proj/kernel": (MODEL_DIM, None),
    r".*mlp/fc1/kernel": (None, MODEL_DIM),
    r".*mlp/fc3/kernel": (None, MODEL_DIM),  # AIMv2's SwiGLU "up", beside fc1
    r".*mlp/fc2/kernel": (MODEL_DIM, None),
    # Patch embedding: (p, p, C, D), split over D.
    r".*patch_embedding/conv/kernel": (None, None, None, MODEL_DIM),
    # Pixel head projections in and out, split over the trunk/head width.
    r".*pixel_head/input_proj/kernel": (MODEL_DIM, None),
    r".*pixel_head/output_proj/kernel": (MODEL_DIM, None),
    # Attentive probe.
    r".*probe/k/kernel": (None, MODEL_DIM),
    r".*probe/v/kernel": (None, MODEL_DIM),
    r".*probe/linear/kernel": (MODEL_DIM, None),
}


class DistributionUnavailableError(RuntimeError):
    """The current Keras backend cannot run the requested distribution."""


@dataclass(frozen=True)
class Mesh:
    """A `BATCHxMODEL` device mesh: `batch` data-parallel groups of `model`
    devices each."""

    batch: int
    model: int

    @property
    def num_devices(self) -> int:
        return self.batch * self.model

    def __str__(self) -> str:
        return f"{self.batch}x{self.model}"


def parse_mesh(spec: str) -> Mesh:
    """`"2x4"` -> `Mesh(batch=2, model=4)`; raises ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(spec))
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise ValueError(
            f"Invalid mesh {spec!r}: write it BATCHxMODEL with positive "
            "integers, e.g. 8x1 (data parallel on 8 devices) or 2x4."
        )
    return Mesh(int(match[1]), int(match[2]))


def check_backend_supports(mesh: Mesh) -> None:
    """Raises `DistributionUnavailableError` if this Keras backend cannot run
    `mesh` (a 1x1 mesh always works)."""
    backend = keras.config.backend()
    if mesh.num_devices == 1 or backend == "jax":
        return
    if backend == "tensorflow":
        if mesh.model > 1:
            raise DistributionUnavailableError(
                f"Mesh {mesh} needs model parallelism, which Keras 3.15 offers "
                "only through keras.distribution on the JAX backend. Use "
                "KERAS_BACKEND=jax, or a data-parallel mesh "
                f"{mesh.num_devices}x1 (tf.distribute.MirroredStrategy)."
            )
        return
    raise DistributionUnavailableError(
        f"Mesh {mesh} needs {mesh.num_devices} devices, but keras.distribution "
        f"is not available with the {backend!r} backend in Keras "
        f"{keras.version()}: it supports JAX only. Use KERAS_BACKEND=jax "
        "(data and model parallelism) or KERAS_BACKEND=tensorflow (data "
        "parallelism with MirroredStrategy), or run with --mesh 1x1."
    )


def check_batch_divisible(batch_size: int, mesh: Mesh, accumulate: int = 1) -> None:
    """Raises ValueError, before anything runs, unless the global batch
    splits evenly into `accumulate` micro-batches across the batch axis."""
    parts = mesh.batch * accumulate
    if batch_size < 1 or batch_size % parts:
        split = f"{mesh.batch} batch-axis devices of mesh {mesh}"
        if accumulate > 1:
            split += f" x {accumulate} accumulation steps"
        lower = max(parts, batch_size - batch_size % parts)
        raise ValueError(
            f"Global batch size {batch_size} is not divisible by the {split} "
            f"(= {parts}); use a batch size that is a multiple of {parts}, "
            f"e.g. {lower} or {lower + parts}."
        )


def layout_map(
    device_mesh, model_dim: str = MODEL_DIM, batch_dim: str = BATCH_DIM
):
    """A `keras.distribution.LayoutMap` for AIM trunks, pixel heads and
    attentive probes.

    qkv and fc1 (and the probe's k and v) are split over `model_dim` on their
    output dimension, proj and fc2 (and the probe's linear layer, the pixel
    head's input and output projections) on their input dimension, the
    patch-embedding kernel on its output channels; norms, biases and other
    small tensors are replicated. Every sharded dimension must be divisible
    by the size of the model axis.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh` with axes `batch_dim`
            and `model_dim`.
        model_dim: mesh axis the weights are split over.
        batch_dim: mesh axis the batch is split over (checked to exist; the
            `ModelParallel` distribution uses it for the data).

    Example:
    ```python
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"))
    distribution = keras.distribution.ModelParallel(
        layout_map=keras_aim.distribution.layout_map(mesh),
        batch_dim_name="batch")
    with distribution.scope():
        backbone = keras_aim.AIMBackbone.from_preset("aim_7b")
    ```
    """
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise TypeError(
            "device_mesh must be a keras.distribution.DeviceMesh; received "
            f"{type(device_mesh).__name__}."
        )
    for name, role in ((model_dim, "model_dim"), (batch_dim, "batch_dim")):
        if name not in device_mesh.axis_names:
            raise ValueError(
                f"{role}={name!r} is not an axis of the device mesh (axes: "
                f"{list(device_mesh.axis_names)}); pass one of those names."
            )
    layouts = keras.distribution.LayoutMap(device_mesh)
    for pattern, axes in _MODEL_SHARDED.items():
        layouts[pattern] = tuple(model_dim if a == MODEL_DIM else a for a in axes)
    return layouts


def device_mesh(mesh: Mesh, devices=None):
    """A `keras.distribution.DeviceMesh` of shape `(batch, model)` over the
    first `mesh.num_devices` of `devices` (default: all devices)."""
    if devices is None:
        devices = keras.distribution.list_devices()
    if len(devices) < mesh.num_devices:
        raise ValueError(
            f"Mesh {mesh} needs {mesh.num_devices} devices but only "
            f"{len(devices)} are available; use a mesh whose BATCH x MODEL "
            f"is at most {len(devices)}."
        )
    return keras.distribution.DeviceMesh(
        (mesh.batch, mesh.model),
        (BATCH_DIM, MODEL_DIM),
        devices=list(devices)[: mesh.num_devices],
    )


def distribution_for_mesh(mesh: Mesh | str, devices=None):
    """The `keras.distribution` for a mesh (JAX backend): `DataParallel`
    when the model axis is 1, else `ModelParallel` with `layout_map`."""
    if isinstance(mesh, str):
        mesh = parse_mesh(mesh)
    if keras.config.backend() != "jax":
        check_backend_supports(mesh)
        raise DistributionUnavailableError(
            "keras.distribution works with the JAX backend only in Keras "
            f"{keras.version()}; use KERAS_BACKEND=jax, or "
            "keras_aim.distribution.distribution_scope(), which uses "
            "MirroredStrategy on TensorFlow."
        )
    devices_mesh = device_mesh(mesh, devices)
    if mesh.model == 1:
        # DataParallel wants a 1-D mesh (its batch axis).
        return keras.distribution.DataParallel(
            devices=list(devices_mesh.devices.flat)
        )
    return keras.distribution.ModelParallel(
        layout_map=layout_map(devices_mesh), batch_dim_name=BATCH_DIM
    )


JOB_ADDRESSES = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
NUM_PROCESSES = "KERAS_DISTRIBUTION_NUM_PROCESSES"
PROCESS_ID = "KERAS_DISTRIBUTION_PROCESS_ID"


def _int_from_environment(name: str) -> int | None:
    text = os.environ.get(name)
    if text in (None, ""):
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer; set it to e.g. 2.") from None


def initialize_multi_host(timeout: float = 300.0) -> None:
    """Starts the runtime of a multi-process run (JAX backend) from Keras'
    environment variables, like `keras.distribution.initialize()`:

    - `KERAS_DISTRIBUTION_JOB_ADDRESSES`: `HOST:PORT` of process 0, the
      coordinator (or every process's address, comma-separated, the first
      being the coordinator's);
    - `KERAS_DISTRIBUTION_NUM_PROCESSES`: how many processes the run has;
    - `KERAS_DISTRIBUTION_PROCESS_ID`: this process's number, 0 to N-1.

    On Cloud TPU and under SLURM they may be left unset (JAX finds them).
    A process that cannot reach the coordinator within `timeout` seconds
    raises `distribution_jax.CoordinatorUnreachableError` naming the
    address. All processes then share one random seed (drawn by process 0),
    as Keras does. Call it first, before anything touches a device.
    """
    if keras.config.backend() != "jax":
        raise DistributionUnavailableError(
            "Multi-host training with keras.distribution needs the JAX backend "
            f"in Keras {keras.version()}; use KERAS_BACKEND=jax (or, for data "
            "parallelism, KERAS_BACKEND=tensorflow with TF_CONFIG: "
            "MultiWorkerMirroredStrategy)."
        )
    addresses = [a.strip() for a in os.environ.get(JOB_ADDRESSES, "").split(",") if a.strip()]
    num_processes = _int_from_environment(NUM_PROCESSES)
    process_id = _int_from_environment(PROCESS_ID)
    if len(addresses) > 1 and num_processes not in (None, len(addresses)):
        raise ValueError(
            f"{JOB_ADDRESSES} lists {len(addresses)} addresses but "
            f"{NUM_PROCESSES}={num_processes}; list one address per process "
            "(or only the coordinator's)."
        )
    if num_processes is not None and not 0 <= (process_id or 0) < num_processes:
        raise ValueError(
            f"{PROCESS_ID}={process_id} is not in 0..{num_processes - 1} "
            f"({NUM_PROCESSES}={num_processes}); number the processes from 0."
        )
    from keras_aim.training import distribution_jax

    distribution_jax.initialize(
        addresses[0] if addresses else None, num_processes, process_id, timeout
    )
    from jax.experimental import multihost_utils

    seed = multihost_utils.broadcast_one_to_all(
        np.array(np.random.SeedSequence().entropy % 2**31, np.int32)
    )
    keras.utils.set_random_seed(int(seed))


def check_multi_host(mesh: Mesh, settings: dict) -> None:
    """In a multi-process JAX run, raises ValueError before any training
    unless the mesh covers the devices of all processes and every process
    was started with the same `settings` (naming what differs)."""
    if keras.config.backend() != "jax":
        return
    from keras_aim.training import distribution_jax

    distribution_jax.check_same_on_every_process({**settings, "mesh": str(mesh)})
    distribution_jax.check_devices(mesh.num_devices, str(mesh))


@contextlib.contextmanager
def each_process_alone():
    """Runs its block without the current `keras.distribution` if that
    spans several processes: every process then computes the same thing
    on its own first device (for models too small to be worth splitting,
    like an attentive probe on extracted features, which every process
    holds whole). Otherwise it changes nothing."""
    current = keras.distribution.distribution() if keras.config.backend() == "jax" else None
    if current is None or getattr(current, "num_processes", 1) == 1:
        yield
        return
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(current)


def distribution_scope(mesh: Mesh | str, devices=None, multi_host: bool = False):
    """A context manager to build, compile and fit a model in, for `mesh`
    on the current backend: a `keras.distribution` scope (JAX), a
    `MirroredStrategy` scope (TensorFlow, data parallel; with `multi_host`,
    the `MultiWorkerMirroredStrategy` of `TF_CONFIG`'s workers), or nothing
    for a 1x1 mesh. Raises `DistributionUnavailableError` when the backend
    cannot run the mesh."""
    if isinstance(mesh, str):
        mesh = parse_mesh(mesh)
    check_backend_supports(mesh)
    if keras.config.backend() == "tensorflow" and multi_host:
        from keras_aim.training import distribution_tf

        return distribution_tf.multi_worker_strategy(mesh.batch).scope()
    if mesh.num_devices == 1:
        return contextlib.nullcontext()
    if keras.config.backend() == "tensorflow":
        from keras_aim.training import distribution_tf

        return distribution_tf.mirrored_strategy(mesh.batch).scope()
    return distribution_for_mesh(mesh, devices).scope()
