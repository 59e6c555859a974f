"""Listing an image folder: names, labels and a fingerprint, nothing decoded.

A folder `ROOT/<class>/**/<image>` (or images directly in `ROOT`) is walked
once with `os.scandir`: every class folder to any depth, symbolic links
followed once (a link back to a folder already on the path is a loop: it is
reported and left out, never fatal), files filtered by extension. No image
is opened, so listing ImageNet's 1.28M files takes seconds, not hours; a
file that turns out unreadable is skipped by the pipeline when it is met
(see `keras_aim.data.pipelines`).

The same walk gives the fingerprint (each file's relative path, size and
modification time, stat'ed once): it changes whenever an image is added,
removed or edited.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

from keras_aim.data.images import is_image_file


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """What `list_folder` found.

    Attributes:
        paths: image file paths, class by class, each class in sorted order.
        labels: the class number of each path.
        class_names: sorted class folder names (the folder's own name when
            the images lie directly in it).
        fingerprint: SHA-256 over relative paths, sizes and modification times.
        problems: one message per entry left out (a link loop, a file that
            cannot be stat'ed), naming it.
    """

    paths: list[str]
    labels: list[int]
    class_names: list[str]
    fingerprint: str
    problems: list[str]


def list_folder(directory: str) -> FolderListing:
    """Lists `directory` (see the module docstring).

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: it holds no image, or a class folder holds none (the
            message names every empty class: a class the classifier would
            never see is a silent wrong result).
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Image folder {directory!r} does not exist.")
    with os.scandir(directory) as entries:
        top = sorted(entries, key=lambda e: e.name)
    classes = [e.name for e in top if _is_dir(e)]
    digest = hashlib.sha256()
    problems: list[str] = []
    paths: list[str] = []
    labels: list[int] = []
    if not classes:
        roots = [(directory, 0)]
    else:
        roots = [(os.path.join(directory, name), i) for i, name in enumerate(classes)]
        loose = [e.name for e in top if not _is_dir(e) and is_image_file(e.name)]
        if loose:
            problems.append(
                f"{directory}: {len(loose)} image(s) beside the class folders "
                f"(e.g. {loose[0]}) belong to no class and are left out"
            )
    empty = []
    for root, label in roots:
        found = _walk(root, directory, digest, problems)
        if not found:
            empty.append(os.path.relpath(root, directory) if classes else directory)
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise ValueError(
            f"No image files in {directory!r} (keras_aim reads .jpg, .jpeg, .png, "
            ".bmp, .gif and .webp); put them in one sub-folder per class."
        )
    if empty:
        raise ValueError(
            f"{directory}: the class folder(s) {', '.join(sorted(empty))} hold no "
            "image file at any depth; a class without images cannot be learned "
            "or scored. Add its images, or remove the folder."
        )
    return FolderListing(paths, labels, classes or [os.path.basename(os.path.normpath(directory))],
                         digest.hexdigest(), problems)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:
        return False


def _walk(root: str, base: str, digest, problems: list[str]) -> list[str]:
    """Image files under `root` in sorted order, depth first; links are
    followed, a folder already on the current path (a loop) is reported in
    `problems` and skipped. Each file's stat goes into `digest`."""
    found: list[str] = []
    stack = [(root, (os.path.realpath(root),))]
    while stack:
        folder, ancestors = stack.pop()
        try:
            with os.scandir(folder) as entries:
                children = sorted(entries, key=lambda e: e.name)
        except OSError as error:
            problems.append(f"{folder}: cannot be listed ({error.strerror or error})")
            continue
        subfolders = []
        for entry in children:
            if _is_dir(entry):
                real = os.path.realpath(entry.path)
                if real in ancestors:
                    problems.append(f"{entry.path}: a link back to {real} (a loop); left out")
                else:
                    subfolders.append((entry.path, ancestors + (real,)))
                continue
            if not is_image_file(entry.name):
                continue
            try:
                stat = entry.stat()
            except OSError as error:  # e.g. a dangling link
                problems.append(f"{entry.path}: cannot be read ({error.strerror or error})")
                continue
            relative = os.path.relpath(entry.path, base)
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            found.append(entry.path)
        stack.extend(reversed(subfolders))  # sorted order, depth first
    return found
