"""``images`` jobs (``evf run --images SOURCE --prompt TEXT``): the image files as the job's manifest.

The files under the source (``evf.sources.find_files``) times the prompts become manifest rows:
``id`` is the file's path relative to the source (``name|prompt`` when there are several prompts),
so ids are stable across runs and a re-run resumes. A WebDataset shard among the files stands for its
samples (``evf.sources.find_images``): id ``<shard>/<key>``, the prompt from ``--prompt`` or from a
member of the sample (``columns: {prompt: txt}``). The listing is written as a Parquet manifest
under the output (``inputs/images.parquet``), where the review page and exports find the rows again;
it is listed anew at every run, so images added since are picked up and committed ones skipped.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from evf.io import write_bytes
from evf.pipelines.config import JobConfig
from evf.sources import find_images
from evf.storage import Storage, join_uri

__all__ = ["IMAGES_MANIFEST", "default_output", "image_rows", "with_images_manifest"]

IMAGES_MANIFEST = "inputs/images.parquet"
"""Where an ``images`` job writes its listing, under the output."""
_SCHEMA = pa.schema([("id", pa.string()), ("image_url", pa.string()), ("prompt", pa.string())])


def image_rows(
    images: str, prompts: list[str], storage: Storage, prompt_member: str | None = None
) -> pa.Table:
    """One row (``id``, ``image_url``, ``prompt``) per image file under ``images`` and prompt; with
    ``prompt_member`` (WebDataset shards: ``txt``), one row per image, its prompt that member (a
    sample without it is a row without a prompt: an error row naming the field)."""
    files = find_images(images, storage.options(images), prompt_member)
    if prompt_member:
        rows = [{"id": f.name, "image_url": f.uri, "prompt": f.texts.get(prompt_member)} for f in files]
        return pa.Table.from_pylist(rows, schema=_SCHEMA)
    several = len(prompts) > 1
    rows = [
        {"id": f"{file.name}|{prompt}" if several else file.name, "image_url": file.uri, "prompt": prompt}
        for file in files
        for prompt in prompts
    ]
    return pa.Table.from_pylist(rows, schema=_SCHEMA)


def default_output(source: str) -> str:
    """Where a job over the user's input writes when no output is named: beside the input, never into
    it nor into the sample's output (``./photos`` -> ``./photos-evf``; a glob's folder likewise;
    ``s3://b/imgs/`` -> ``s3://b/imgs-evf``; a manifest ``runs/mine.parquet`` -> ``runs/mine-evf``)."""
    root = source
    for wildcard in ("*", "?", "["):
        root = root.split(wildcard, 1)[0]
    if root != source:  # a glob: the folder its pattern starts in
        root = root.rsplit("/", 1)[0] if "/" in root else "."
    root = root.rstrip("/") or "."
    stem, dot, suffix = root.rpartition(".")
    if dot and "/" not in suffix and suffix.lower() in ("parquet", "csv", "jsonl", "ndjson", "json"):
        root = stem
    return f"{root}-evf" if root not in (".", "..") else f"{root}/evf-output"


def with_images_manifest(config: JobConfig, storage: Storage, uri: str | None = None) -> JobConfig:
    """``config`` itself, or for an ``images`` job a copy whose ``manifest`` is the listing, written to
    ``uri`` (default: ``inputs/images.parquet`` under the output). Raises ``NoFilesError`` (exit 2)
    when the source holds no image."""
    if config.images is None:
        return config
    table = image_rows(config.images, config.prompts, storage, config.columns.get("prompt"))
    target = uri or join_uri(config.output, IMAGES_MANIFEST)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(target, buffer.getvalue(), storage.options(target), storage.commit_retry)
    return config.model_copy(update={"manifest": target, "columns": {}})
