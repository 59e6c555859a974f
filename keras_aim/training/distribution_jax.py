"""JAX-only pieces of multi-process training (imported lazily, only with the
JAX backend): starting the distributed runtime with a bounded wait for the
coordinator, checks that every process runs the same job on a mesh that
covers all devices, the part of each global batch a process feeds, and host
copies of weights for exporting."""

from __future__ import annotations

import json
import socket
import sys
import time

import jax
import numpy as np


class CoordinatorUnreachableError(RuntimeError):
    """The coordinator of a multi-process run did not answer in time."""


def _wait_for_coordinator(address: str, timeout: float) -> None:
    """Returns once a TCP connection to `address` (HOST:PORT) succeeds;
    raises `CoordinatorUnreachableError` after `timeout` seconds.

    Why by hand: `jax.distributed.initialize` aborts the whole process
    (a fatal C++ check, no Python exception) when it cannot reach the
    coordinator within its timeout, so this probe comes first to fail with
    an error that names the address.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(
            f"Coordinator address {address!r} is not HOST:PORT; set "
            "KERAS_DISTRIBUTION_JOB_ADDRESSES to e.g. 10.0.0.1:1234."
        )
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise CoordinatorUnreachableError(
                    f"The coordinator at {address} (process 0) did not answer "
                    f"within {timeout:.0f} s ({error}). Start the same command "
                    "on the coordinator host, check the address and port in "
                    "KERAS_DISTRIBUTION_JOB_ADDRESSES and that the port is open "
                    "between the hosts, or raise --coordinator-timeout."
                ) from error
            time.sleep(1.0)


def initialize(
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    timeout: float = 300.0,
) -> None:
    """`jax.distributed.initialize` with every process waiting at most
    `timeout` seconds: processes other than 0 first check that the
    coordinator answers (raising `CoordinatorUnreachableError` naming the
    address if not). Without arguments (Cloud TPU, SLURM), JAX finds them.
    On CPU, cross-process collectives use Gloo (JAX's default)."""
    if coordinator and process_id not in (None, 0):
        _wait_for_coordinator(coordinator, timeout)
    elif coordinator:
        print(f"process 0: coordinating {num_processes} processes at {coordinator} "
              f"(waiting up to {timeout:.0f} s for all of them)", file=sys.stderr, flush=True)
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=int(timeout),
    )


def _allgather(values: np.ndarray) -> np.ndarray:
    """`values` of every process, stacked `(processes, ...)`."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values))


def check_devices(num_devices: int, mesh_text: str) -> None:
    """Raises ValueError unless the mesh uses every device of every process
    (a process whose devices the mesh leaves out would have nothing to do).
    """
    counts = _allgather(np.array([jax.local_device_count()], np.int32)).ravel()
    if num_devices != int(counts.sum()):
        per_process = " + ".join(str(int(c)) for c in counts)
        raise ValueError(
            f"Mesh {mesh_text} uses {num_devices} devices, but the "
            f"{len(counts)} processes have {per_process} = {int(counts.sum())}. "
            f"Use a mesh whose BATCH x MODEL is {int(counts.sum())}, e.g. "
            f"{int(counts.sum())}x1, or give the processes the devices the mesh needs."
        )


def check_same_on_every_process(settings: dict) -> None:
    """Raises ValueError, naming each setting and process that differs from
    process 0, unless every process passes equal `settings` (JSON values:
    the command line and config of the run)."""
    text = json.dumps(settings, sort_keys=True, default=str).encode()
    lengths = _allgather(np.array([len(text)], np.int32)).ravel()
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(text)] = np.frombuffer(text, np.uint8)
    rows = _allgather(padded)
    everyone = [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]
    differences = [
        f"process {p}: {key} = {mine.get(key)!r} (process 0: {everyone[0].get(key)!r})"
        for p, mine in enumerate(everyone[1:], start=1)
        for key in sorted(set(mine) | set(everyone[0]))
        if mine.get(key) != everyone[0].get(key)
    ]
    if differences:
        raise ValueError(
            "The processes of this run were started with different settings:\n  "
            + "\n  ".join(differences)
            + "\nStart every process with the same command and config."
        )


def data_shard(distribution) -> tuple[int, int]:
    """`(index, count)`: this process feeds part `index` of `count` equal,
    consecutive parts of every global batch (the rows its devices hold on
    the mesh's batch axis); `(0, 1)` when it needs the whole batch. The same
    split as Keras' own auto-sharding of a dataset."""
    processes = jax.process_count()
    replicas = distribution.num_model_replicas
    if processes == 1 or replicas == 1:
        return 0, 1
    if replicas >= processes:
        return jax.process_index(), processes
    return distribution.data_shard_id, replicas


def host_values(variables) -> list[np.ndarray]:
    """Every variable's full value as a host array on every process (a
    collective: all processes call it). Arrays a process holds whole are
    read locally; others are gathered across processes."""
    from jax.experimental import multihost_utils

    values = []
    for variable in variables:
        value = variable.value
        if isinstance(value, jax.Array) and not (
            value.is_fully_addressable or value.is_fully_replicated
        ):
            value = multihost_utils.process_allgather(value, tiled=True)
        values.append(np.asarray(value))
    return values
