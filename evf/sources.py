"""Files named by a folder, a glob or an object-store prefix, on any fsspec storage.

``evf run --images SOURCE`` lists its images here, and a manifest folder its ``*.parquet`` files:

- a folder or prefix (``./photos``, ``s3://bucket/imgs/``): every matching file below it, at any
  depth, hidden ones (``.x``, ``_x``) left out;
- a glob (``./photos/*.jpg``, ``s3://bucket/imgs/**/*.png``): the matching files;
- a single file: itself.

Each file comes with its name relative to the root (the folder, or a glob's part before its first
wildcard), ``/``-separated: a stable name across runs, from which a job's row ids are made.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from evf.errors import UserError
from evf.storage import display_url, open_filesystem

__all__ = ["IMAGE_SUFFIXES", "FoundFile", "NoFilesError", "find_files"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
"""The image files ``--images`` takes (case-insensitive)."""

_WILDCARDS = ("*", "?", "[")


class NoFilesError(UserError, ValueError):
    """A source names no file of the kind asked for (or cannot be listed); the message says which."""


@dataclass(frozen=True)
class FoundFile:
    """uri: the file's absolute path or URI; name: relative to the source's root, ``/``-separated."""

    uri: str
    name: str


def _hidden(name: str) -> bool:
    return any(part.startswith((".", "_")) for part in name.split("/") if part)


def find_files(
    source: str, suffixes: tuple[str, ...], storage_options: Mapping[str, Any] | None = None, *, what: str
) -> list[FoundFile]:
    """The files under ``source`` whose names end with one of ``suffixes``, sorted by name.

    ``what`` names the files in errors ("images", "*.parquet files"). Raises ``NoFilesError`` when the
    source cannot be listed or holds no such file."""
    shown = display_url(source)
    try:
        fs, path = open_filesystem(source, storage_options)
        if hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache()
        wildcard = min((i for i in (path.find(w) for w in _WILDCARDS) if i >= 0), default=-1)
        if wildcard >= 0:
            root = posixpath.dirname(path[:wildcard]).rstrip("/")
            paths = [p for p in fs.glob(path) if not fs.isdir(p)]
        elif fs.isdir(path):
            root = path.rstrip("/")
            paths = fs.find(root)
        elif fs.exists(path):
            root, paths = posixpath.dirname(path.rstrip("/")), [path]
        else:
            raise NoFilesError(f"{shown!r} not found")
    except NoFilesError:
        raise
    except Exception as error:
        raise NoFilesError(f"cannot list {shown!r}: {type(error).__name__}: {error}") from None
    lowered = tuple(s.lower() for s in suffixes)
    found = []
    for file in sorted(paths):
        name = file[len(root) :].lstrip("/") if file.startswith(root) else posixpath.basename(file)
        if file.lower().endswith(lowered) and not _hidden(name):
            uri = file if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(file)
            found.append(FoundFile(uri, name))
    if not found:
        raise NoFilesError(f"{shown!r} holds no {what} ({', '.join(suffixes)})")
    return found
