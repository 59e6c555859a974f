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

import contextlib
import importlib.abc
import importlib.util
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
    if "tensorflow" not in sys.modules and not any(
        isinstance(finder, _SilentTensorFlowImport) for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _SilentTensorFlowImport())
    warnings.filterwarnings("ignore", module=r"(tensorflow|keras|keras_hub|jax|torch)(\.|$)")


@contextlib.contextmanager
def silenced_stderr_descriptor():
    """Points file descriptor 2 at the null device for the duration: C++
    code writes there directly, past Python's `sys.stderr`."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


class _SilentTensorFlowImport(importlib.abc.MetaPathFinder):
    """Runs the first `import tensorflow` with standard error silenced.

    TensorFlow's C++ start-up lines (oneDNN, "Could not find cuda drivers")
    are written before its logging reads `TF_CPP_MIN_LOG_LEVEL`, so only
    the descriptor can keep them off the terminal. Errors still surface:
    an exception raised by the import propagates as usual. One use, then
    the finder removes itself.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _SilentLoader(spec.loader)
        return spec


class _SilentLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with silenced_stderr_descriptor():
            self.loader.exec_module(module)

    def __getattr__(self, name):  # get_resource_reader, is_package, ...
        return getattr(self.loader, name)


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
