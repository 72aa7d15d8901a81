"""A finished job's masks as COCO instance segmentation and as Label Studio tasks.

Both exports read the job's output only (``evf.pipelines.job_rows``); ``ok`` rows give annotations,
``empty`` rows give images without annotations, ``error`` rows are left out. A row run with
``use_grounding_dino`` gives one annotation per GroundingDINO instance (that box's own SAM 2 mask, as
the metadata's ``instances`` record it); any other row gives one annotation: its final mask.

Coordinates are pixels of the original image, origin top-left; ``bbox`` is ``[x, y, w, h]``.
Every number in the results is a plain Python ``int``/``float`` (``json.dump`` takes them as they are).

COCO: ``images`` (``id``, ``file_name``, ``width``, ``height``, ``coco_url``), ``annotations``
(``segmentation`` as COCO compressed RLE ``{"size": [H, W], "counts": str}``, ``area``, ``bbox``,
``iscrowd: 0``, ``score``, ``evf_id``), ``categories``. Loads in pycocotools' ``COCO()``; CVAT's and
FiftyOne's COCO importers read compressed RLE segmentations as masks.

Label Studio: one task per image, ``data.image`` = the image URL; ``predictions`` hold one
``brushlabels`` result per annotation in Label Studio's own brush RLE (encoded with
``label_studio_converter.brush.mask2rle``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from pycocotools import mask as mask_util

from evf.io import write_bytes
from evf.pipelines.job_rows import attach_manifest_columns, category_names, read_job_rows
from evf.postprocess import decode_rle, pycoco_rle

__all__ = [
    "export_coco",
    "export_labelstudio",
    "image_location",
    "write_coco",
    "write_labelstudio",
]

_EXPORTED = ("ok", "empty")


def image_location(url: str, image_root: str | None = None, base_url: str | None = None) -> str:
    """The name an annotation tool should know an image by.

    ``url`` as the job recorded it, unless ``image_root`` is given: then the path relative to it
    (``ValueError`` for an image outside it), prefixed with ``base_url`` when given (e.g. Label
    Studio's ``/data/local-files/?d=images/``).
    """
    if image_root is None:
        return url
    if "://" not in image_root:
        image_root = os.path.abspath(image_root)  # the job records local images by absolute path
    root = image_root.rstrip("/") + "/"
    if not url.startswith(root):
        raise ValueError(f"image {url!r} is not under image_root {image_root!r}")
    relative = url[len(root) :]
    return f"{base_url}{relative}" if base_url is not None else relative


def _segments(row: Mapping[str, Any]) -> Iterator[tuple[dict[str, Any], float, dict[str, Any]]]:
    """(COCO RLE, score, extra fields) of each annotation of an ``ok`` row."""
    if row["status"] != "ok":
        return
    if row["instances"] is None:
        if row["rle"] is not None:
            yield row["rle"], float(row["score"]), {}
        return
    for index, instance in enumerate(row["instances"]):
        extra = {"instance": index, "detector_score": float(instance["detector_score"])}
        yield instance["rle"], float(instance["mask_score"]), extra


def _area_and_box(rle: Mapping[str, Any]) -> tuple[int, list[int]]:
    compressed = pycoco_rle(rle)
    x, y, w, h = (int(round(float(v))) for v in mask_util.toBbox(compressed))
    return int(mask_util.area(compressed)), [x, y, w, h]


def _exported_rows(
    output: str,
    categories: Mapping[str, str] | None,
    category_column: str | None,
    manifest: str | None,
    storage_options: Mapping[str, Any] | None,
) -> tuple[list[dict[str, Any]], list[str | None]]:
    """The ok/empty rows of the job and the category name of each ok row (None for empty rows,
    which give no annotation and so need no category)."""
    rows = [r for r in read_job_rows(output, storage_options) if r["status"] in _EXPORTED]
    if category_column:
        if not manifest:
            raise ValueError("category_column needs the manifest the job ran on")
        attach_manifest_columns(rows, manifest, {category_column: category_column}, storage_options)
    annotated = [r for r in rows if r["status"] == "ok"]
    names = iter(category_names(annotated, categories, category_column))
    return rows, [next(names) if r["status"] == "ok" else None for r in rows]


def export_coco(
    output: str,
    categories: Mapping[str, str] | None = None,
    category_column: str | None = None,
    manifest: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    image_root: str | None = None,
) -> dict[str, Any]:
    """The job's masks as one COCO instance-segmentation dict (see the module docstring).

    ``categories``: ``{prompt: category}`` (or ``{column value: category}`` with ``category_column``,
    a column of ``manifest``); without either the prompt is the category. ``image_root``: write
    ``file_name`` relative to this folder (what CVAT matches against a task's image names and
    FiftyOne joins onto ``data_path``); by default ``file_name`` is the image's full path or URI.
    Category ids are 1..K in order of first appearance; image ids 1..N, annotation ids 1..M.
    """
    rows, names = _exported_rows(output, categories, category_column, manifest, storage_options)
    category_ids: dict[str, int] = {}
    image_ids: dict[str, int] = {}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for row, name in zip(rows, names, strict=True):
        url = row["image_url"]
        if url not in image_ids:
            image_ids[url] = len(image_ids) + 1
            images.append(
                {
                    "id": image_ids[url],
                    "file_name": image_location(url, image_root),
                    "width": int(row["width"]),
                    "height": int(row["height"]),
                    "coco_url": url,
                }
            )
        for rle, score, extra in _segments(row):
            area, box = _area_and_box(rle)
            if area == 0:
                continue
            category_ids.setdefault(name, len(category_ids) + 1)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_ids[url],
                    "category_id": category_ids[name],
                    "segmentation": {"size": [int(v) for v in rle["size"]], "counts": str(rle["counts"])},
                    "area": area,
                    "bbox": box,
                    "iscrowd": 0,
                    "score": score,
                    "evf_id": row["id"],
                    **extra,
                }
            )
    return {
        "info": {
            "description": f"evf-sam masks of {output}",
            "version": "1.0",
            "date_created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": ""} for n, i in category_ids.items()],
    }


def _write_json(destination: str, data: Any, storage_options: Mapping[str, Any] | None) -> None:
    write_bytes(destination, json.dumps(data, ensure_ascii=False).encode("utf-8"), storage_options)


def write_coco(destination: str, output: str, **options: Any) -> dict[str, Any]:
    """:func:`export_coco` of ``output`` written as JSON to ``destination`` (any fsspec URI, with the
    same ``storage_options``). Returns the COCO dict."""
    coco = export_coco(output, **options)
    _write_json(destination, coco, options.get("storage_options"))
    return coco


def _mask2rle(alpha: np.ndarray) -> list[int]:
    """Label Studio's brush RLE of a uint8 (H, W) alpha mask (label-studio-converter's encoder)."""
    try:
        from label_studio_converter.brush import mask2rle
    except ImportError as error:
        raise ImportError(
            "the Label Studio export needs label-studio-converter: pip install 'evf-sam[labelstudio]'"
        ) from error
    return [int(v) for v in mask2rle(alpha)]


def _brush_result(
    region_id: str, rle: Mapping[str, Any], label: str, score: float, from_name: str, to_name: str
) -> dict[str, Any]:
    height, width = (int(v) for v in rle["size"])
    alpha = decode_rle(rle).astype(np.uint8) * 255  # Label Studio draws the brush's alpha channel
    return {
        "id": region_id,
        "from_name": from_name,
        "to_name": to_name,
        "type": "brushlabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "score": score,
        "value": {"format": "rle", "rle": _mask2rle(alpha), "brushlabels": [label]},
    }


def export_labelstudio(
    output: str,
    from_name: str = "label",
    to_name: str = "image",
    categories: Mapping[str, str] | None = None,
    category_column: str | None = None,
    manifest: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    image_root: str | None = None,
    image_base_url: str | None = None,
) -> list[dict[str, Any]]:
    """The job's masks as Label Studio tasks with pre-annotations (see the module docstring).

    One task per image: ``{"data": {"image": URL, "evf_ids": "id1, id2"}, "predictions":
    [{"model_version", "score", "result": [...]}]}``; each result is a ``brushlabels`` region whose
    label is the row's category (as in :func:`export_coco`) and whose ``score`` is the mask's.
    ``from_name``/``to_name`` must match the ``<BrushLabels name=...>`` and ``<Image name=...>`` of
    the project's labeling config. ``data.image`` is the image URL as the job recorded it, or
    ``image_base_url`` + its path relative to ``image_root`` when both are given.
    """
    rows, names = _exported_rows(output, categories, category_column, manifest, storage_options)
    tasks: dict[str, dict[str, Any]] = {}
    for row, name in zip(rows, names, strict=True):
        url = row["image_url"]
        if url not in tasks:
            location = image_location(url, image_root, image_base_url) if image_root else url
            tasks[url] = {
                "data": {"image": location, "evf_ids": []},
                "predictions": [{"model_version": row["model_id"] or "", "score": 0.0, "result": []}],
            }
        task = tasks[url]
        task["data"]["evf_ids"].append(row["id"])
        prediction = task["predictions"][0]
        for rle, score, extra in _segments(row):
            if _area_and_box(rle)[0] == 0:
                continue
            key = f"{row['id']}\n{extra.get('instance', '')}".encode()
            region_id = hashlib.sha256(key).hexdigest()[:10]
            prediction["result"].append(_brush_result(region_id, rle, name, score, from_name, to_name))
    for task in tasks.values():
        task["data"]["evf_ids"] = ", ".join(task["data"]["evf_ids"])
        results = task["predictions"][0]["result"]
        task["predictions"][0]["score"] = min((r["score"] for r in results), default=0.0)
    return list(tasks.values())


def write_labelstudio(destination: str, output: str, **options: Any) -> list[dict[str, Any]]:
    """:func:`export_labelstudio` of ``output`` written as a JSON list of tasks to ``destination``
    (any fsspec URI, with the same ``storage_options``). Returns the tasks."""
    tasks = export_labelstudio(output, **options)
    _write_json(destination, tasks, options.get("storage_options"))
    return tasks
