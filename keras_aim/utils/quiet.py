"""Keeping the command line free of framework noise.

TensorFlow (imported for tf.data and export, whatever the backend) writes
C++ log lines at start-up, among them an alarming but harmless
`failed call to cuInit` on machines without a GPU, and its Python side logs
through absl. keras_aim's commands and recipes call `quiet_frameworks()`
before any framework is imported; `--verbose` keeps everything.
"""

from __future__ import annotations

import logging
import os
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
