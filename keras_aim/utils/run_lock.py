"""One run per work folder: an exclusive lock file.

Two runs writing one folder interleave their logs and checkpoints and one
of them fails late, with a raw error from the checkpoint library. A run
takes `LOCK_FILE` in its folder first: the file is created with
`O_CREAT | O_EXCL` (atomic on local and network file systems that honour
it) and holds the owner's process id, host and start time. A second run
finds it and stops at once, touching nothing. A lock left by a process
that died on this host (its process id no longer runs) is taken over with
a message; one from another host is reported with the command to remove
it, since this host cannot tell whether that process still runs.

Why not `fcntl.flock`: its locks are not visible across the hosts of a
shared file system on every system, and they leave no record of who
holds the folder; the lock file says who, and where, in plain JSON.
"""

from __future__ import annotations

import json
import os
import socket
import time

LOCK_FILE = ".run.lock"


class RunFolderBusyError(RuntimeError):
    """Another run holds the work folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class RunLock:
    """Context manager holding `folder`'s lock (the folder must exist).

    Raises `RunFolderBusyError` if a live process holds it. The lock file
    is removed on exit, also after an error; a killed process leaves it,
    and the next run on this host takes it over."""

    def __init__(self, folder: str, say=print):
        self.path = os.path.join(folder, LOCK_FILE)
        self._say = say
        self._held = False

    def _create(self) -> bool:
        try:
            descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as handle:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, handle)
        return True

    def _owner(self) -> dict:
        try:
            with open(self.path) as handle:
                owner = json.load(handle)
            return owner if isinstance(owner, dict) else {}
        except (OSError, ValueError):
            return {}  # being written, or damaged

    def acquire(self) -> None:
        for _ in range(3):
            if self._create():
                self._held = True
                return
            owner = self._owner()
            pid, host = owner.get("pid"), owner.get("host")
            if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
                self._say(f"taking over the lock of process {pid}, which ended "
                          f"without releasing it ({self.path})")
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue  # another run may take it first: O_EXCL decides
            if not owner:
                time.sleep(0.1)  # its owner may be writing it
                continue
            folder = os.path.dirname(self.path)
            raise RunFolderBusyError(
                f"{folder} is in use by another run (process {pid} on {host}, "
                f"started {owner.get('started', '?')}). Wait for it to end or "
                "choose another folder. If that process no longer runs (e.g. its "
                f"host failed), remove {self.path} and start again."
            )
        raise RunFolderBusyError(
            f"Could not take {self.path}: it is unreadable or keeps changing. "
            "Check that no other run uses the folder, remove the file, and start again."
        )

    def release(self) -> None:
        if self._held:
            self._held = False
            try:
                if self._owner().get("pid") == os.getpid():
                    os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
