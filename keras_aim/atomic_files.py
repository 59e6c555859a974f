"""Writing files and folders so that a crash never leaves a half-written one.

    with atomic_file("probe.weights.h5") as staging:
        classifier.save_task_weights(staging)   # renamed over the target on success
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yields a staging path beside `path` with the same file suffixes
    (writers such as Keras check them); on success it replaces `path`, on
    failure it is removed and `path` stays as it was."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, dot, suffixes = name.partition(".")
    staging = os.path.join(folder, f".{stem}.tmp{os.getpid()}{dot}{suffixes}")
    try:
        yield staging
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


@contextlib.contextmanager
def atomic_directory(path: str, replace: bool = False) -> Iterator[str]:
    """Yields a staging folder beside `path`; on success it is renamed to
    `path` (an existing `path` is kept unless `replace`), on failure it is
    removed."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield staging
        if os.path.exists(path) and replace:
            old = f"{staging}.old"
            os.rename(path, old)
            os.rename(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        elif not os.path.exists(path):
            os.rename(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
