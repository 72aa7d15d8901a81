"""A finished job's rows, as the review page and the exports read them.

The rows are the job's metadata (``evf.pipelines.commit.read_metadata``: one dict per manifest row in
``METADATA_SCHEMA``), optionally joined with columns of the manifest the job ran on (ground-truth
``mask_url``, a category column...). The join is on ``(manifest_file, manifest_row)``, which every
metadata row records, so derived ids and column mappings play no part in it.

Categories: a row's category name is its prompt, or its value in a manifest column, mapped through an
optional ``{value: category}`` map (autodistill's ontology idea: ``{"the red car": "car"}``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from evf.errors import UserError
from evf.io import read_bytes
from evf.manifest import read_rows, resolve_url, scan_manifest
from evf.pipelines.metadata import read_metadata
from evf.storage import uri_name

__all__ = [
    "CategoryError",
    "OutputRowsError",
    "attach_manifest_columns",
    "category_names",
    "image_name",
    "load_category_map",
    "read_job_rows",
]


class CategoryError(UserError, ValueError):
    """A row's category cannot be found (prompt missing from the map, empty manifest value...)."""


class OutputRowsError(UserError, LookupError):
    """The job's output or its manifest lacks what was asked for (no committed row, no such column)."""


def read_job_rows(output: str, storage_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every metadata row of the job's ``output``, ordered as in the manifest (file, then row).

    Raises ``OutputRowsError`` when the output has no committed row at all.
    """
    rows = read_metadata(output, storage_options).to_pylist()
    if not rows:
        raise OutputRowsError(f"no committed rows under {output!r} (metadata/ is missing or empty)")
    rows.sort(key=lambda r: (r["manifest_file"] or "", r["manifest_row"] or 0, r["id"]))
    return rows


def attach_manifest_columns(
    rows: Sequence[dict[str, Any]],
    manifest: str,
    columns: Mapping[str, str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    resolve: Sequence[str] = (),
) -> None:
    """Copy manifest columns onto ``rows`` in place: ``row[target] = manifest value of column source``
    for each ``{target: source}`` in ``columns`` (``None`` where the manifest row has none).

    ``resolve``: targets holding paths that are resolved like image URLs (relative to the folder of
    the manifest file). Raises ``OutputRowsError`` when no manifest file has a requested column.
    """
    wanted = {(r["manifest_file"], r["manifest_row"]) for r in rows}
    wanted_files = {name for name, _ in wanted}
    values: dict[tuple[str, int], dict[str, Any]] = {}
    found: set[str] = set()
    for file in scan_manifest(manifest, storage_options).files:
        present = {target: source for target, source in columns.items() if source in file.columns}
        if not present or file.name not in wanted_files:
            continue
        found.update(present.values())
        for record in read_rows(file, 0, file.num_rows, sorted(set(present.values())), storage_options):
            index = record["_row"]
            if (file.name, index) not in wanted:
                continue
            entry = {}
            for target, source in present.items():
                value = record[source]
                if target in resolve and isinstance(value, str) and value.strip():
                    value = resolve_url(value.strip(), file.base)
                entry[target] = value
            values[(file.name, index)] = entry
    missing = sorted(set(columns.values()) - found)
    if missing:
        raise OutputRowsError(f"manifest {manifest!r} has no column(s) {', '.join(missing)}")
    for row in rows:
        entry = values.get((row["manifest_file"], row["manifest_row"]), {})
        for target in columns:
            row[target] = entry.get(target)


def image_name(row: Mapping[str, Any]) -> str:
    """What a person calls a row's image: the last path segment of its ``image_url``
    (``evf.storage.uri_name``: ``s3://b/shots/cat.jpg`` -> ``cat.jpg``), or the row's id when the
    image has no such name (a ``data:`` URI, an invalid row without a URL)."""
    url = row.get("image_url")
    return (uri_name(url) if isinstance(url, str) else "") or str(row.get("id") or "")


def load_category_map(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """A ``{prompt (or column value): category}`` map from a YAML or JSON file (any fsspec URI)."""
    data = yaml.safe_load(read_bytes(uri, storage_options).decode("utf-8")) if uri else None
    if not isinstance(data, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in data.items()
    ):
        raise CategoryError(
            f"category map {uri!r} must be a mapping of text to non-empty text, "
            'e.g. {"the red car": "car"}; got ' + json.dumps(data, default=str)[:200]
        )
    return {str(k): str(v).strip() for k, v in data.items()}


def category_names(
    rows: Sequence[Mapping[str, Any]],
    categories: Mapping[str, str] | None = None,
    category_column: str | None = None,
) -> list[str]:
    """The category name of each row: its prompt, or ``row[category_column]`` when given (attached
    with :func:`attach_manifest_columns`), mapped through ``categories`` when given.

    Raises ``CategoryError`` naming the first few values without a category.
    """
    names: list[str] = []
    unmapped: dict[str, int] = {}
    for row in rows:
        value = row.get(category_column) if category_column else row.get("prompt")
        value = "" if value is None else str(value)
        name = categories.get(value) if categories is not None else value.strip()
        if not name:
            unmapped[value] = unmapped.get(value, 0) + 1
        names.append(name or "")
    if unmapped:
        source = f"column {category_column!r}" if category_column else "prompt"
        shown = ", ".join(f"{k!r} ({n} rows)" for k, n in list(unmapped.items())[:5])
        more = f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else ""
        hint = "add them to the category map" if categories is not None else "fill in the values"
        raise CategoryError(f"{len(unmapped)} {source} value(s) have no category: {shown}{more}; {hint}")
    return names
