"""Counting and naming the unreadable images a stream skips.

A stream (`keras_aim.data.pipelines`) calls `BadImages.record` for each
image it could not read or decode; past the limit, `BadImagesError` stops
it with the names of the first ones and the fix.
"""

from __future__ import annotations

import sys
import threading

DEFAULT_MAX_BAD_FRACTION = 0.01


class BadImagesError(RuntimeError):
    """Too many unreadable images; the message names them and the fix."""


class BadImages:
    """Counts and names the unreadable images a stream skipped (thread-safe;
    pass one to a pipeline to read the count)."""

    def __init__(self, max_fraction: float = DEFAULT_MAX_BAD_FRACTION, most_named: int = 20,
                 stream=None):
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1]; received {max_fraction}.")
        self.max_fraction = max_fraction
        self.most_named = most_named
        self.names: list[str] = []
        self.count = 0
        self._lock = threading.Lock()
        self._stream = stream  # None: sys.stderr at the time of writing

    def record(self, names: list[str], read: int, all_failed: bool) -> None:
        """Notes the unreadable images `names` met after about `read` images;
        raises `BadImagesError` past the limits."""
        with self._lock:
            self.count += len(names)
            out = self._stream or sys.stderr
            for name in names:
                if len(self.names) < self.most_named:
                    self.names.append(name)
                    out.write(f"warning: skipping unreadable image {name}\n")
                elif self.count % 1000 == 0:
                    out.write(f"warning: {self.count} unreadable images skipped so far\n")
            out.flush()
            count = self.count
        if all_failed:
            raise BadImagesError(
                f"{len(names)} images in a row are unreadable ({', '.join(names)}); "
                "check the data (a truncated copy, a wrong folder?)."
            )
        if count > 10 and count > self.max_fraction * max(read, 1):
            raise BadImagesError(
                f"{count} of about {read} images read are unreadable (more than "
                f"{self.max_fraction:.2%}), e.g. {', '.join(self.names[:5])}. Repair or "
                "remove them, or raise the limit (max_bad_fraction / --max-bad-images)."
            )
