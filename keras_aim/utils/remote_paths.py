"""Output paths that may be local or remote (`gs://bucket/run`, any URL
`etils.epath` opens), for run directories.

Local paths keep `atomic_files`' guarantees; on object stores, which have no
rename, a folder is copied file by file with `config.json` last, so that an
interrupted copy is never a loadable keras-hub preset. Never `os.path` on a
URL: it would write into a local folder named `gs:`.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from typing import Iterator

from keras_aim.utils.atomic_files import atomic_directory

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
LAST_FILE = "config.json"


def is_url(path: str) -> bool:
    """Whether `path` is a URL (`gs://...`) rather than a local path."""
    return bool(_URL.match(str(path)))


def join(base: str, *names: str) -> str:
    """`base/name/...` for a local path or a URL."""
    if not is_url(base):
        return os.path.join(base, *names)
    return "/".join([str(base).rstrip("/"), *names])


@contextlib.contextmanager
def written_directory(target: str) -> Iterator[str]:
    """Yields a local staging folder whose files become folder `target`
    (replacing it) once the block succeeds: by an atomic rename for a local
    path, by a copy (`config.json` last) for a URL."""
    if not is_url(target):
        with atomic_directory(target, replace=True) as staging:
            yield staging
        return
    from etils import epath

    with tempfile.TemporaryDirectory(prefix="keras_aim-") as staging:
        yield staging
        files = sorted(
            os.path.relpath(os.path.join(root, name), staging)
            for root, _, names in os.walk(staging) for name in names
        )
        files.sort(key=lambda name: name == LAST_FILE)
        remote = epath.Path(target)
        if remote.exists():
            remote.rmtree()
        for name in files:
            destination = remote / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            epath.Path(os.path.join(staging, name)).copy(destination)
