"""Jobs of several local processes for tests (tests only, 127.0.0.1).

    with Job(tmp_path) as job:
        processes = job.start_jax(["-m", "recipes.pretrain", ...])  # 2 x 4 CPU devices
        outputs = job.wait(processes, timeout=300)

JAX processes join through `jax.distributed` (the coordinator on a free
local port, Keras' KERAS_DISTRIBUTION_* variables, Gloo collectives, 4 CPU
devices each); TensorFlow workers through TF_CONFIG. Each process's output
goes to a log file. `wait` has a hard time limit, and leaving the `with`
block kills every process still running, so a test never leaves one behind.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def environment(backend: str, devices: int = 1, **extra: str) -> dict:
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": str(ROOT),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        **extra,
    }
    for name in ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                 "KERAS_DISTRIBUTION_PROCESS_ID", "TF_CONFIG"):
        if name not in extra:
            env.pop(name, None)
    return env


class Job:
    """Processes started by a test, killed when its block ends."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.processes: list[subprocess.Popen] = []

    def start(self, argv: list[str], env: dict, name: str) -> subprocess.Popen:
        """`python ARGV` with `env`; output to `log_dir/NAME.log`."""
        log = open(self.log_dir / f"{name}.log", "w")
        process = subprocess.Popen(
            [sys.executable, *argv], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        process.log_path = log.name
        log.close()
        self.processes.append(process)
        return process

    def start_jax(self, argv: list[str], name: str, processes: int = 2, devices: int = 4,
                  per_process: list[list[str]] | None = None) -> list[subprocess.Popen]:
        """One JAX job of `processes` processes with `devices` CPU devices
        each; `per_process[i]` is appended to process i's arguments."""
        (port,) = free_ports(1)
        return [
            self.start(
                argv + (per_process[i] if per_process else []),
                environment(
                    "jax", devices,
                    KERAS_DISTRIBUTION_JOB_ADDRESSES=f"127.0.0.1:{port}",
                    KERAS_DISTRIBUTION_NUM_PROCESSES=str(processes),
                    KERAS_DISTRIBUTION_PROCESS_ID=str(i),
                ),
                f"{name}.{i}",
            )
            for i in range(processes)
        ]

    def start_tensorflow(self, argv: list[str], name: str, workers: int = 2) -> list[subprocess.Popen]:
        """`workers` TensorFlow workers of one MultiWorkerMirroredStrategy."""
        cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(workers)]}
        return [
            self.start(
                argv,
                environment("tensorflow", TF_CONFIG=json.dumps(
                    {"cluster": cluster, "task": {"type": "worker", "index": i}})),
                f"{name}.{i}",
            )
            for i in range(workers)
        ]

    def wait(self, processes: list[subprocess.Popen], timeout: float) -> list[str]:
        """Waits for `processes` to end (killing all of them and failing the
        test after `timeout` seconds); returns each one's output."""
        deadline = time.monotonic() + timeout
        for process in processes:
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill_all()
                pytest.fail(f"processes still running after {timeout:.0f} s:\n"
                            + "\n".join(self.tail(p) for p in processes))
        return [self.output(p) for p in processes]

    def wait_for(self, condition, processes, timeout: float, what: str) -> None:
        """Polls `condition()` until true; fails (killing everything) on
        timeout or if one of `processes` ends first."""
        deadline = time.monotonic() + timeout
        while not condition():
            ended = [p for p in processes if p.poll() is not None]
            if ended or time.monotonic() > deadline:
                self.kill_all()
                pytest.fail(f"no {what} ({'a process ended' if ended else 'timed out'}):\n"
                            + "\n".join(self.tail(p) for p in processes))
            time.sleep(0.1)

    @staticmethod
    def output(process) -> str:
        return Path(process.log_path).read_text(errors="replace")

    def tail(self, process, characters: int = 3000) -> str:
        return f"--- {process.log_path} (exit {process.poll()}):\n" + \
            self.output(process)[-characters:]

    def kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            process.wait()

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.kill_all()
