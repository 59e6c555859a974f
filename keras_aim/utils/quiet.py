"""Keeping the command line free of framework noise, and its errors short.

TensorFlow (imported for tf.data and export, whatever the backend) writes
C++ log lines at start-up, among them an alarming but harmless
`failed call to cuInit` on machines without a GPU, and its Python side logs
through absl. keras_aim's commands and recipes call `quiet_frameworks()`
before any framework is imported; `--verbose` keeps everything.
`report_error` prints a failure as one `error: ...` line (exit code 1), the
traceback only when asked for.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings

# Set only when the user has not chosen a value.
QUIET_ENVIRONMENT = {
    "TF_CPP_MIN_LOG_LEVEL": "3",  # TensorFlow's C++ logs, including errors such as cuInit
    "GRPC_VERBOSITY": "ERROR",
    "GLOG_minloglevel": "3",  # XLA's C++ logs
}


def quiet_frameworks(verbose: bool = False) -> None:
    """Silences TensorFlow's and XLA's C++ logs, absl's Python logs and
    framework warnings; call it before TensorFlow or JAX is imported. With
    `verbose`, does nothing."""
    if verbose:
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for name in ("absl", "tensorflow", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(tensorflow|keras|keras_hub|jax|torch)(\.|$)")


def report_error(error: BaseException, with_traceback: bool = False) -> int:
    """Prints `error: <message>` on stderr (after the traceback if
    `with_traceback`) and returns the exit code 1."""
    if with_traceback:
        traceback.print_exception(error)
    message = str(error)
    # keras_aim's own errors explain themselves; others (KeyError, TypeError,
    # ...) need their type to make sense.
    if not message or not isinstance(error, (ValueError, OSError, RuntimeError, MemoryError)):
        message = f"{type(error).__name__}: {message}".rstrip(": ")
    print(f"error: {message}", file=sys.stderr)
    return 1
