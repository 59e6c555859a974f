"""Writing files and folders so that a crash never leaves a half-written one.

    with atomic_file("probe.weights.h5") as staging:
        classifier.save_task_weights(staging)   # renamed over the target on success

Every writer in keras_aim that produces a file or folder a user keeps
(cached presets, checkpoints, probes, adapters, exports, features, figures)
goes through these context managers: the data is written beside the
target under a hidden name, flushed to disk (`fsync` of the files and of the
folder holding them), then renamed into place in one step. A failure or a
kill at any moment leaves the previous version, or nothing (except, after a
kill, the hidden staging entry itself: `remove_staging_leftovers` removes
those of a target, for writers that hold a lock on it).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import threading
from typing import Iterator


def fsync_path(path: str) -> None:
    """Flushes a file, or a folder's entries, to disk (best effort on
    filesystems and platforms that do not support it)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else os.O_RDONLY
    try:
        handle = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def current_umask() -> int:
    """The process's umask, read without changing it where the system
    tells (Linux); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _ordinary_permissions(path: str, directory: bool) -> None:
    """`mkdtemp`/`mkstemp` create private (0700/0600) entries; a kept file or
    folder gets what `open`/`mkdir` would give it under the umask, so that
    other users (e.g. a model server) can read it."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def _file_staging_parts(path: str) -> tuple[str, str, str]:
    """(folder, name before the tag, name after it) of `path`'s staging
    file: `.{stem}.tmp{tag}.{suffixes}`, keeping the suffixes that writers
    such as Keras check."""
    folder, name = os.path.split(os.path.abspath(path))
    stem, dot, suffixes = name.partition(".")
    return folder, f".{stem}.tmp", f"{dot}{suffixes}"


def _directory_staging_prefix(path: str) -> str:
    return f".{os.path.basename(os.path.abspath(path))}.tmp-"


def staging_leftovers(path: str) -> list[str]:
    """The hidden staging files or folders of `path` that `atomic_file` /
    `atomic_directory` calls have left beside it (a process killed while
    writing leaves its staging entry)."""
    folder, head, tail = _file_staging_parts(path)
    patterns = (
        os.path.join(glob.escape(folder), glob.escape(head) + "*" + glob.escape(tail)),
        os.path.join(glob.escape(folder), glob.escape(_directory_staging_prefix(path)) + "*"),
    )
    return sorted({p for pattern in patterns for p in glob.glob(pattern)})


def remove_staging_leftovers(path: str) -> list[str]:
    """Removes `staging_leftovers(path)`; returns what it removed. Call it
    only while no other writer of `path` can be running (e.g. holding the
    lock that guards `path`): a live writer's staging entry looks the same."""
    leftovers = staging_leftovers(path)
    for leftover in leftovers:
        if os.path.isdir(leftover) and not os.path.islink(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
    return leftovers


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yields a staging path beside `path` with the same file suffixes
    (writers such as Keras check them); on success it is flushed and
    replaces `path`, on failure it is removed and `path` stays as it was."""
    folder, head, tail = _file_staging_parts(path)
    os.makedirs(folder, exist_ok=True)
    # Unique per process and thread: concurrent writers never share one.
    staging = os.path.join(folder, f"{head}{os.getpid()}-{threading.get_ident()}{tail}")
    try:
        yield staging
        fsync_path(staging)
        os.replace(staging, path)
        fsync_path(folder)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


@contextlib.contextmanager
def atomic_file_with_companions(path: str) -> Iterator[str]:
    """For writers that put companion files beside their main file and
    record their names in it (OpenVINO's `.bin`, ONNX's external weights):
    yields `path`'s name inside a hidden staging folder beside it. On
    success every file written there is flushed and moved beside `path`,
    the companions first and the main file last (it appears only once its
    companions are complete); on failure the folder is removed and nothing
    beside `path` changes."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=folder)
    try:
        staged = os.path.join(staging, name)
        yield staged
        _fsync_tree(staging)
        for companion in sorted(os.listdir(staging)):
            if companion != name:
                os.replace(os.path.join(staging, companion), os.path.join(folder, companion))
        os.replace(staged, path)
        fsync_path(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str, replace: bool = False) -> Iterator[str]:
    """Yields a hidden staging folder beside `path`; on success its files are
    flushed and it is renamed to `path`, on failure it is removed.

    An existing `path` is kept (the staging folder is discarded: someone
    else finished first) unless `replace`; then the old folder is swapped
    out, the new one renamed in, and the old one deleted. If the swap itself
    fails, the old folder is put back.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=_directory_staging_prefix(path), dir=parent)
    try:
        yield staging
        _ordinary_permissions(staging, directory=True)
        _fsync_tree(staging)
        if not os.path.exists(path):
            os.rename(staging, path)
        elif replace:
            retired = f"{staging}.old"
            os.rename(path, retired)
            try:
                os.rename(staging, path)
            except BaseException:
                os.rename(retired, path)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        fsync_path(parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
