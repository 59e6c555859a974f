"""Released checkpoints as cached keras-hub presets.

The first `from_preset("aim_600m")` downloads the released file(s), verifies
their SHA-256, converts them and saves a standard keras-hub preset folder;
later calls load that folder and never touch the network. This module does
the fetching and the caching; the model family hands it a `write` function
that builds its model and fills the staging folder (see
`keras_aim.models.aim.aim_backbone`), so it imports no model.

Cache layout (`$KERAS_AIM_HOME`, default `~/.keras/keras_aim`):

    downloads/<released file>              verified released files
    downloads/<model_id>/<revision>/<file> files of Hub repositories (every
                                           AIMv2 checkpoint is model.safetensors)
    presets/<preset>[-<dtype>]/            keras-hub preset: config.json,
        metadata.json, model.weights.h5 (sharded when large),
        preprocessor.json, image_converter.json
        heads/probe_{best,last}.weights.h5 released heads (task weights)

Every file and folder appears by an atomic rename once complete, so an
interrupted run leaves nothing half-written behind.

Any number of processes and threads may load the same preset at once (the
hosts of a multi-host job on a shared cache, two notebooks): each entry is
written under a file lock (`.locks/<entry>.lock` in the cache, with
`filelock`, the lock library huggingface_hub uses), so one process downloads or converts while the
others wait and then read the finished entry. A lock dies with its process:
the next writer resumes a killed download from its `.part` file and removes
the staging folders a killed conversion left.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterable, Iterator

from keras_aim.loading.download import download_file, verify_sha256
from keras_aim.utils.atomic_files import (
    atomic_directory,
    atomic_file,
    remove_staging_leftovers,
)

SHARD_SIZE_GB = 5.0  # keras-hub shards model.weights.h5 above this size
CACHED_DTYPES = ("float32", "bfloat16", "float16")


def keras_aim_home() -> str:
    """The cache root: `$KERAS_AIM_HOME`, default `~/.keras/keras_aim`."""
    return os.path.expanduser(
        os.environ.get("KERAS_AIM_HOME") or os.path.join("~", ".keras", "keras_aim")
    )


def release_url(filename: str, default_base_url: str) -> str:
    """Where a released file is fetched from: `$KERAS_AIM_BASE_URL` (a
    mirror) or the release's own base URL."""
    base = os.environ.get("KERAS_AIM_BASE_URL") or default_base_url
    return base.rstrip("/") + "/" + filename


def downloaded_path(filename: str) -> str:
    return os.path.join(keras_aim_home(), "downloads", *filename.split("/"))


@contextlib.contextmanager
def entry_lock(path: str, progress: bool = True) -> Iterator[None]:
    """Holds the lock that guards the writers of cache entry `path` (see
    `_lock_file`). While another process or thread holds it,
    says so on stderr (with `progress`) and waits."""
    from filelock import FileLock, Timeout

    lock_file = _lock_file(path)
    os.makedirs(os.path.dirname(lock_file), exist_ok=True)
    lock = FileLock(lock_file)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        if progress:
            print(f"waiting for another process to finish {path} "
                  f"(lock {lock.lock_file})", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _lock_file(path: str) -> str:
    """Where the lock of cache entry `path` lives: under `.locks/` in the
    cache (huggingface_hub's layout), so that the entries' folders hold
    entries only; beside `path`, hidden, for a path outside the cache."""
    home, path = os.path.abspath(keras_aim_home()), os.path.abspath(path)
    if os.path.commonpath([home, path]) == home:
        return os.path.join(home, ".locks", os.path.relpath(path, home) + ".lock")
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.lock")


def release_file(
    filename: str,
    sha256: str,
    base_url: str,
    release_dir: str | None = None,
    progress: bool = True,
) -> str:
    """Local path of a released file, verified against `sha256` (a digest
    or its prefix) wherever it came from: `release_dir`, the download cache
    (where a user may have put it by hand) or the network.

    A file on disk that does not match raises `ChecksumError` and is left
    where it is (it may be the user's only copy)."""
    url = release_url(filename, base_url)
    if release_dir is not None:
        candidate = os.path.join(release_dir, filename)
        if os.path.exists(candidate):
            verify_sha256(candidate, sha256, candidate, fix=(
                f"Replace {candidate} with the released file ({url})."
            ))
            return candidate
    cached = downloaded_path(filename)
    if os.path.exists(cached):
        verify_sha256(cached, sha256, cached, fix=(
            f"It is damaged or not the released file: delete it to download "
            f"it again, or replace it with the released file ({url})."
        ))
        return cached
    with entry_lock(cached, progress):
        if os.path.exists(cached):  # another process finished it meanwhile
            return cached
        return download_file(url, cached, sha256, progress=progress)


def url_file(
    cache_name: str,
    url: str,
    sha256: str | None,
    verify: Callable[[str], None] | None = None,
    progress: bool = True,
) -> str:
    """Local path of the file at `url`, kept as `downloads/<cache_name>`
    (a relative path with `/`): from the download cache, or downloaded and
    checked (SHA-256 if known, else `verify(path)`) before it is kept."""
    cached = downloaded_path(cache_name)
    if os.path.exists(cached):
        return cached
    with entry_lock(cached, progress):
        if os.path.exists(cached):  # another process finished it meanwhile
            return cached
        return download_file(url, cached, sha256, progress=progress, verify=verify)


def variable_dtype(dtype) -> str:
    """The dtype variables get under `dtype` (a policy name or None)."""
    import keras

    policy = keras.dtype_policies.get(dtype or keras.config.dtype_policy())
    return policy.variable_dtype


def preset_cache_dir(name: str, dtype: str = "float32") -> str:
    suffix = "" if dtype == "float32" else f"-{dtype}"
    return os.path.join(keras_aim_home(), "presets", name + suffix)


def find_cached_preset(name: str, dtype=None) -> str | None:
    """A cached preset usable for `dtype`: float32 serves every dtype."""
    for candidate_dtype in dict.fromkeys(("float32", variable_dtype(dtype))):
        path = preset_cache_dir(name, candidate_dtype)
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    return None


def cached_preset(name: str, dtype, write: Callable[[str, str], None]) -> str:
    """The cached preset folder of `name` usable for `dtype`; if there is
    none, `write(staging_folder, variable_dtype)` fills a new one (in
    `dtype`'s variable dtype: bfloat16 halves the memory converting needs),
    which is renamed into the cache when complete. One process or thread
    writes while the others wait for it (`entry_lock`); staging folders of a
    killed writer are removed first."""
    cached = find_cached_preset(name, dtype)
    if cached is not None:
        return cached
    target_dtype = variable_dtype(dtype)
    target = preset_cache_dir(name, target_dtype)
    with entry_lock(target):
        cached = find_cached_preset(name, dtype)
        if cached is not None:  # written by another process meanwhile
            return cached
        remove_staging_leftovers(target)
        with atomic_directory(target) as staging:
            write(staging, target_dtype)
    return target


def head_cache_path(preset_dir: str, kind: str) -> str:
    return os.path.join(preset_dir, "heads", f"probe_{kind}.weights.h5")


def cached_file(path: str, write: Callable[[str], None]) -> str:
    """`path`, written first by `write(staging_path)` if it does not exist
    (by one process or thread at a time, like `cached_preset`)."""
    if os.path.exists(path):
        return path
    with entry_lock(path):
        if not os.path.exists(path):
            remove_staging_leftovers(path)
            with atomic_file(path) as staging:
                write(staging)
    return path


def cache_status(name: str, filenames: Iterable[str], head_kinds=("best", "last")) -> str:
    """One line on what is on disk for preset `name` whose released files
    are `filenames`."""
    parts = []
    for dtype in CACHED_DTYPES:
        path = preset_cache_dir(name, dtype)
        if os.path.isfile(os.path.join(path, "config.json")):
            heads = [k for k in head_kinds if os.path.exists(head_cache_path(path, k))]
            parts.append(
                f"{dtype} ({_size_gb(path):.1f} GB"
                + (f", heads: {'/'.join(heads)}" if heads else "")
                + ")"
            )
    downloaded = [f for f in filenames if os.path.exists(downloaded_path(f))]
    if downloaded:
        parts.append(f"{len(downloaded)} released file(s) downloaded")
    return "; ".join(parts) if parts else "not cached"


def _size_gb(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 1e9
