"""Verified, resumable, atomic HTTP(S) downloads of released checkpoints."""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable

from keras_aim.version import __version__

CHUNK_BYTES = 1 << 20


class DownloadError(OSError):
    """A file could not be downloaded (after retries)."""


class ChecksumError(ValueError):
    """A downloaded file does not have the published SHA-256 digest."""


class CorruptDownloadError(ValueError):
    """A downloaded file failed the structural check given for it (where no
    SHA-256 digest is recorded); it was deleted."""


class OfflineError(FileNotFoundError):
    """`KERAS_AIM_OFFLINE=1` and a needed file is not on disk."""


def offline() -> bool:
    """True when `KERAS_AIM_OFFLINE` is set to a true value."""
    return os.environ.get("KERAS_AIM_OFFLINE", "").lower() in ("1", "true", "yes")


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES * 8), b""):
            digest.update(chunk)
    return digest.hexdigest()


FULL_DIGEST_LENGTH = 64
MIN_PREFIX_LENGTH = 8


def check_digest(expected: str) -> str:
    """`expected` (a SHA-256 hex digest, or a prefix of at least 8 hex
    digits) in lower case; raises `ValueError` for anything else."""
    text = str(expected).lower()
    if not (MIN_PREFIX_LENGTH <= len(text) <= FULL_DIGEST_LENGTH) or any(
        c not in "0123456789abcdef" for c in text
    ):
        raise ValueError(
            f"{expected!r} is not a SHA-256 digest: give its 64 hex digits "
            f"(or at least the first {MIN_PREFIX_LENGTH})."
        )
    return text


def digest_strength(expected: str) -> str:
    """How much a published checksum pins the file down, in words."""
    if len(expected) == FULL_DIGEST_LENGTH:
        return "full SHA-256"
    return f"SHA-256 prefix ({4 * len(expected)} bits)"


def verify_sha256(path: str, expected: str, source: str, fix: str | None = None) -> None:
    """Raises `ChecksumError` unless the file's SHA-256 equals `expected`
    (a full digest) or starts with it (a prefix). `fix` ends the message;
    by default the file (a download in progress) is deleted and the
    message says to run again."""
    expected = check_digest(expected)
    actual = sha256_file(path)
    if actual.startswith(expected):
        return
    if fix is None:
        os.remove(path)
        fix = (
            "The corrupt file was deleted; run again to download it anew, "
            "or check KERAS_AIM_BASE_URL if you use a mirror."
        )
    what = "SHA-256" if len(expected) == FULL_DIGEST_LENGTH else "SHA-256 starting with"
    raise ChecksumError(
        f"Checksum mismatch for {os.path.basename(source)} (from {source}): "
        f"expected {what} {expected}, got {actual}. " + fix
    )


def download_file(
    url: str,
    destination: str,
    sha256: str | None,
    retries: int = 4,
    timeout: float = 60.0,
    progress: bool = True,
    verify: Callable[[str], None] | None = None,
) -> str:
    """Downloads `url` to `destination`, verified and atomically.

    Data goes to `destination + ".part"`; an interrupted download resumes
    from there (HTTP Range) on the next attempt or call. Only a file whose
    SHA-256 matches `sha256` (a full digest or a prefix) is renamed
    to `destination`; a mismatch deletes it and raises `ChecksumError`.
    Connection failures are retried `retries` times with backoff, then
    raise `DownloadError`, which says how to work offline.

    `sha256=None` means no digest is recorded: then `verify(path)` (which
    raises on a bad file) is what checks the download; a file it rejects
    is deleted and `CorruptDownloadError` raised.
    """
    if sha256 is not None:
        check_digest(sha256)
    if offline():
        raise OfflineError(
            f"KERAS_AIM_OFFLINE is set and {os.path.basename(destination)} "
            f"is not on disk. Download it from {url} and put it at "
            f"{destination} (it is verified before use), or unset "
            "KERAS_AIM_OFFLINE."
        )
    os.makedirs(os.path.dirname(destination) or ".", exist_ok=True)
    partial = destination + ".part"
    for attempt in range(retries + 1):
        try:
            _fetch_into(url, partial, timeout, progress)
            break
        except urllib.error.HTTPError as error:
            if error.code == 416 and os.path.exists(partial):
                os.remove(partial)  # not a prefix of the file: start over
                continue
            if error.code < 500 or attempt == retries:
                raise DownloadError(
                    f"Downloading {url} failed: HTTP {error.code} "
                    f"{error.reason}. Check the URL (KERAS_AIM_BASE_URL for "
                    "mirrors) and your network."
                ) from error
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            if attempt == retries:
                raise DownloadError(
                    _failure_message(url, destination, partial, retries + 1, error)
                ) from error
        time.sleep(min(0.5 * 2**attempt, 8.0))
    else:
        raise DownloadError(f"Downloading {url} failed after {retries + 1} attempts.")
    if sha256 is not None:
        verify_sha256(partial, sha256, url)
    if verify is not None:
        try:
            verify(partial)
        except Exception as error:
            os.remove(partial)
            raise CorruptDownloadError(
                f"The download of {url} is damaged and was deleted: {error} "
                "Run again to download it anew, or check KERAS_AIM_HUB_URL / "
                "KERAS_AIM_BASE_URL if you use a mirror."
            ) from error
    os.replace(partial, destination)
    return destination


def _failure_message(url, destination, partial, attempts, error) -> str:
    """What went wrong and what to do: resume a partial file, or work
    offline with a file fetched elsewhere."""
    reason = getattr(error, "reason", None) or error
    kept = os.path.getsize(partial) if os.path.exists(partial) else 0
    if kept:
        return (
            f"Downloading {url} failed after {attempts} attempts ({reason}). "
            f"The {kept:,} bytes received so far are kept in {partial}; run "
            "again to resume."
        )
    host = urllib.parse.urlsplit(url).netloc
    return (
        f"Could not download {url} after {attempts} attempts ({reason}): no "
        f"network, or {host} cannot be reached. To work without a network, "
        f"download that file on another machine, put it at {destination} "
        "and set KERAS_AIM_OFFLINE=1 (the file is verified before use); "
        "KERAS_AIM_BASE_URL points at a mirror."
    )


def _fetch_into(url: str, partial: str, timeout: float, progress: bool) -> None:
    """One attempt: appends the missing bytes of `url` to `partial`."""
    start = os.path.getsize(partial) if os.path.exists(partial) else 0
    headers = {"User-Agent": f"keras-aim/{__version__}"}
    if start:
        headers["Range"] = f"bytes={start}-"
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if start and response.status != 206:  # server ignored the range
            start = 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        bar = _progress_bar(os.path.basename(url), total, start, progress)
        written = start
        with open(partial, "ab" if start else "wb") as handle:
            while chunk := response.read1(CHUNK_BYTES):  # what has arrived
                handle.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
        bar.close()
    if total is not None and written != total:
        raise http.client.IncompleteRead(b"", total - written)


def _progress_bar(name: str, total, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=name,
        disable=not enabled,
        file=sys.stderr,
    )
