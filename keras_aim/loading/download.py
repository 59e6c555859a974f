"""Verified, resumable, atomic HTTP(S) downloads of released checkpoints."""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request

from keras_aim.version import __version__

CHUNK_BYTES = 1 << 20


class DownloadError(OSError):
    """A file could not be downloaded (after retries)."""


class ChecksumError(ValueError):
    """A downloaded file does not have the published SHA-256 digest."""


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


def verify_sha256(
    path: str, expected_prefix: str, source: str, delete: bool = True
) -> None:
    """Raises `ChecksumError` unless the file's SHA-256 starts with
    `expected_prefix`; with `delete`, the bad file is removed first."""
    actual = sha256_file(path)
    if actual.startswith(expected_prefix.lower()):
        return
    if delete:
        os.remove(path)
        fix = (
            "The corrupt file was deleted; run again to download it anew, "
            "or check KERAS_AIM_BASE_URL if you use a mirror."
        )
    else:
        fix = f"Replace {path} with the released file."
    raise ChecksumError(
        f"Checksum mismatch for {os.path.basename(source)} (from {source}): "
        f"expected SHA-256 starting with {expected_prefix}, got {actual}. "
        + fix
    )


def download_file(
    url: str,
    destination: str,
    sha256_prefix: str,
    retries: int = 4,
    timeout: float = 60.0,
    progress: bool = True,
) -> str:
    """Downloads `url` to `destination`, verified and atomically.

    Data goes to `destination + ".part"`; an interrupted download resumes
    from there (HTTP Range) on the next attempt or call. Only a file whose
    SHA-256 starts with `sha256_prefix` is renamed to `destination`; a
    mismatch deletes it and raises `ChecksumError`. Connection failures are
    retried `retries` times with backoff, then raise `DownloadError`.
    """
    if offline():
        raise OfflineError(
            f"KERAS_AIM_OFFLINE is set and {os.path.basename(destination)} "
            f"is not on disk. Download it from {url} and put it at "
            f"{destination}, or unset KERAS_AIM_OFFLINE."
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
                    f"Downloading {url} failed after {retries + 1} attempts "
                    f"({error}). The partial file {partial} is kept; run "
                    "again to resume."
                ) from error
        time.sleep(min(0.5 * 2**attempt, 8.0))
    else:
        raise DownloadError(f"Downloading {url} failed after {retries + 1} attempts.")
    verify_sha256(partial, sha256_prefix, url)
    os.replace(partial, destination)
    return destination


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
