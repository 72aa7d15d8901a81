"""Files named by a folder, a glob or an object-store prefix, on any fsspec storage.

``evf run --images SOURCE`` lists its images here, and a manifest folder its manifest files
(``*.parquet``, ``*.csv``, ``*.jsonl``, ``*.ndjson``):

- a folder or prefix (``./photos``, ``s3://bucket/imgs/``): every matching file below it, at any
  depth, hidden ones (``.x``, ``_x``) left out;
- a glob (``./photos/*.jpg``, ``s3://bucket/imgs/**/*.png``): the matching files;
- a single file: itself.

Each file comes with its name relative to the root (the folder, or a glob's part before its first
wildcard), ``/``-separated: a stable name across runs, from which a job's row ids are made.

:func:`find_images` also opens WebDataset shards (``*.tar``, as img2dataset and ``webdataset``'s
``TarWriter`` write them): each sample's image is a file of its own, named ``<shard>/<key>`` and
read through an fsspec chained URL (``tar://<member>::<shard URI>``); the sample's text members
(``txt``, ``json``...) come with it, for prompts.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from evf.errors import UserError
from evf.storage import display_url, open_filesystem

__all__ = ["IMAGE_SUFFIXES", "SHARD_SUFFIX", "FoundFile", "NoFilesError", "find_files", "find_images"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
"""The image files ``--images`` takes (case-insensitive)."""

SHARD_SUFFIX = ".tar"
"""A WebDataset shard: a tar of samples, each a group of members sharing a key (``key.ext``)."""
_WILDCARDS = ("*", "?", "[")


class NoFilesError(UserError, ValueError):
    """A source names no file of the kind asked for (or cannot be listed); the message says which."""


@dataclass(frozen=True)
class FoundFile:
    """uri: the file's absolute path or URI; name: relative to the source's root, ``/``-separated;
    texts: a WebDataset sample's text members by extension (``{"txt": "a cat"}``)."""

    uri: str
    name: str
    texts: Mapping[str, str] = field(default_factory=dict)


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


def find_images(
    source: str, storage_options: Mapping[str, Any] | None = None, text_member: str | None = None
) -> list[FoundFile]:
    """The image files under ``source``, each WebDataset shard among them expanded into its samples'
    images (see the module docstring), in name order; ``text_member`` (``"txt"``): the samples'
    member of that extension read into ``FoundFile.texts``."""
    found = []
    for file in find_files(source, (*IMAGE_SUFFIXES, SHARD_SUFFIX), storage_options, what="images or shards"):
        if file.uri.lower().endswith(SHARD_SUFFIX):
            found += shard_images(file, storage_options, text_member)
        else:
            found.append(file)
    if not found:
        raise NoFilesError(f"{display_url(source)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


def shard_images(
    shard: FoundFile, storage_options: Mapping[str, Any] | None = None, text_member: str | None = None
) -> list[FoundFile]:
    """One file per sample of a WebDataset shard that has an image member (the first, by name); the
    key is the member name up to its first dot in the last path segment, as ``webdataset`` splits it."""
    fs, _ = open_filesystem(f"tar://::{shard.uri}", storage_options)
    samples: dict[str, dict[str, str]] = {}
    for member in sorted(fs.find("")):
        folder, _, base = member.rpartition("/")
        stem, dot, extension = base.partition(".")
        if dot:
            key = f"{folder}/{stem}" if folder else stem
            samples.setdefault(key, {}).setdefault(extension.lower(), member)
    prefix = shard.name[: -len(SHARD_SUFFIX)]
    images = []
    for key, members in samples.items():
        image = next((m for ext, m in members.items() if f".{ext}" in IMAGE_SUFFIXES), None)
        if image is None:
            continue
        texts = {
            ext: fs.cat_file(m).decode("utf-8", "replace").strip()
            for ext, m in members.items()
            if ext in ("txt", "text", "caption", "json")
        }
        images.append(FoundFile(f"tar://{image}::{shard.uri}", f"{prefix}/{key}", texts))
    return images
