"""A static HTML review page of a finished job: every row's image with its mask, prompt and status.

Layout (beside the output unless the caller names the page)::

    <output>/review.html              the page (opened from disk; no server)
    <output>/review_files/rows.js     the rows as one JavaScript array, plus the summary
    <output>/review_files/thumbs/<hash of the row id>.jpg

A thumbnail is the image scaled so that its longer side is at most ``thumbnail_size`` pixels, with
the row's mask over it (``evf.overlay``: magenta fill at 45 % and a contour drawn
black-under-white, visible on any image) and, when the manifest has ground truth (``mask_url``),
the ground-truth contour in cyan.
Thumbnails are made by a thread pool, one task per distinct image (an image is read and scaled once
for all its rows). The page holds the row data as one array and renders one page of rows at a time
(200), so it stays responsive at 100,000 rows.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any
from urllib.parse import quote

import cv2
import numpy as np
from tqdm.auto import tqdm

from evf.errors import error_kind
from evf.io import load_image, load_mask, write_bytes
from evf.overlay import outline, paint_mask
from evf.pipelines.job_rows import OutputRowsError, attach_manifest_columns, image_name, read_job_rows
from evf.postprocess import decode_rle
from evf.storage import join_uri

log = logging.getLogger(__name__)

__all__ = ["PAGE_SIZE", "review_rows", "thumbnail", "write_review"]

PAGE_SIZE = 200
HISTOGRAM_BINS = 20
GROUND_TRUTH_RGB = (0, 255, 255)
ROW_COLUMNS = (
    "id",
    "name",
    "thumb",
    "prompt",
    "negative_prompt",
    "status",
    "score",
    "area",
    "error",
    "reason",
)


def _scaled_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool (h, w) of a bool (H, W) mask scaled to ``size`` = (w, h) by area averaging."""
    scaled = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    return scaled >= 0.5


def thumbnail(
    image: np.ndarray, mask: np.ndarray | None, ground_truth: np.ndarray | None, size: int = 256
) -> np.ndarray:
    """The review thumbnail of one row.

    Args:
        image: uint8 (H, W, 3) RGB.
        mask: bool (H, W) predicted mask, or None (error rows).
        ground_truth: bool (H, W) ground-truth mask, or None.
        size: the thumbnail's longer side in pixels (images that are smaller keep their size).

    Returns:
        uint8 (h, w, 3) RGB with the mask filled and outlined (white) and the ground truth outlined
        (cyan).
    """
    height, width = image.shape[:2]
    scale = min(1.0, size / max(height, width))
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    canvas = cv2.resize(image, target, interpolation=cv2.INTER_AREA) if scale < 1 else image.copy()
    if mask is not None:
        paint_mask(canvas, _scaled_mask(mask, target))
    if ground_truth is not None:
        outline(canvas, _scaled_mask(ground_truth, target), GROUND_TRUTH_RGB)
    return canvas


def _row_mask(row: Mapping[str, Any]) -> np.ndarray | None:
    rle = row.get("rle")
    if row["status"] == "error" or rle is None:
        return None
    return decode_rle(rle)


def _ground_truth(url: str | None, shape: tuple[int, int], storage_options: Any) -> np.ndarray | None:
    """bool (H, W) ground truth of a row (``evf.io.load_mask``), None when there is none
    or it cannot be read (logged) or its size differs from the image's."""
    if not url:
        return None
    try:
        mask = load_mask(url, storage_options)
    except (OSError, ValueError) as error:
        log.warning("ground truth %s cannot be read: %s", url, error)
        return None
    if mask.shape != shape:
        log.warning("ground truth %s is not a %dx%d mask image", url, shape[1], shape[0])
        return None
    return mask


def _thumbnail_name(row_id: str) -> str:
    return hashlib.sha256(row_id.encode("utf-8")).hexdigest()[:24] + ".jpg"


def _write_image_thumbnails(
    rows: Sequence[Mapping[str, Any]], assets: str, size: int, storage_options: Any
) -> dict[str, str]:
    """Thumbnails of the rows of one image: {row id: path relative to ``assets``}. An image that
    cannot be read gives none (its rows show "no image"; their errors say why)."""
    try:
        image = load_image(rows[0]["image_url"], storage_options)
    except (OSError, ValueError) as error:
        log.info("no thumbnail for %s: %s", rows[0]["image_url"], error)
        return {}
    written = {}
    for row in rows:
        mask = _row_mask(row)
        if mask is not None and mask.shape != image.shape[:2]:
            mask = None  # cannot happen for a job's own rows; never draw a mask at the wrong place
        truth = _ground_truth(row.get("ground_truth_url"), image.shape[:2], storage_options)
        pixels = cv2.cvtColor(thumbnail(image, mask, truth, size), cv2.COLOR_RGB2BGR)
        ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 88])
        if not ok:
            continue
        name = f"thumbs/{_thumbnail_name(row['id'])}"
        write_bytes(join_uri(assets, name), encoded.tobytes(), storage_options)
        written[row["id"]] = name
    return written


def _plain_score(score: float | None) -> float | None:
    return None if score is None or math.isnan(score) else round(float(score), 4)


def review_rows(rows: Sequence[Mapping[str, Any]], thumbs: Mapping[str, str]) -> dict[str, Any]:
    """The page's data: ``columns``, ``rows`` (one list per row, in ``ROW_COLUMNS`` order; ``name``
    is the image's file name, ``evf.pipelines.job_rows.image_name``, the card's title),
    ``status_counts``, ``error_kinds`` ([kind, count], most frequent first), ``score_histogram``
    (``HISTOGRAM_BINS`` counts over [0, 1] of the ok and empty rows' scores) and ``page_size``."""
    statuses = Counter(r["status"] for r in rows)
    kinds = Counter(error_kind(r["error"]) for r in rows if r["status"] == "error" and r["error"])
    histogram = [0] * HISTOGRAM_BINS
    for row in rows:
        if row["status"] != "error" and _plain_score(row["score"]) is not None:
            histogram[min(HISTOGRAM_BINS - 1, max(0, int(row["score"] * HISTOGRAM_BINS)))] += 1
    table = [
        [
            row["id"],
            image_name(row),
            thumbs.get(row["id"]),
            row["prompt"],
            row["negative_prompt"],
            row["status"],
            _plain_score(row["score"]),
            row["area"],
            row["error"],
            row.get("reason"),
        ]
        for row in rows
    ]
    return {
        "columns": list(ROW_COLUMNS),
        "rows": table,
        "status_counts": {s: statuses[s] for s in ("ok", "empty", "error") if s in statuses}
        | {s: n for s, n in statuses.items() if s not in ("ok", "empty", "error")},
        "error_kinds": [[kind, count] for kind, count in kinds.most_common()],
        "score_histogram": histogram,
        "page_size": PAGE_SIZE,
    }


def _page_locations(output: str, page: str | None) -> tuple[str, str, str]:
    """(page URI, assets folder URI, assets folder as the page links to it)."""
    page = page or join_uri(output, "review.html")
    if "://" in page:
        folder, _, name = page.rpartition("/")
    else:
        page = os.path.abspath(page)
        folder, name = os.path.split(page)
    stem = name[:-5] if name.endswith(".html") else name
    return page, join_uri(folder, f"{stem}_files"), quote(f"{stem}_files")


def write_review(
    output: str,
    manifest: str | None = None,
    page: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    threads: int = 8,
    thumbnail_size: int = 256,
    ground_truth_column: str = "mask_url",
    progress: bool = False,
) -> str:
    """Write the review page of the job's ``output`` (see the module docstring); returns its URI.

    ``manifest``: the manifest the job ran on; when it has ``ground_truth_column`` (relative paths
    resolve like image URLs) the ground truth is drawn too. ``page``: where the page goes (default
    ``<output>/review.html``); its thumbnails go to a ``<page name>_files`` folder beside it.
    """
    rows = read_job_rows(output, storage_options)
    if manifest:
        try:
            attach_manifest_columns(
                rows,
                manifest,
                {"ground_truth_url": ground_truth_column},
                storage_options,
                resolve=("ground_truth_url",),
            )
        except OutputRowsError:
            log.info(
                "manifest %s has no %r column: no ground truth on the page", manifest, ground_truth_column
            )
    page_uri, assets, assets_link = _page_locations(output, page)
    by_image: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["image_url"]:
            by_image[row["image_url"]].append(row)
    thumbs: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        tasks = [
            pool.submit(_write_image_thumbnails, group, assets, thumbnail_size, storage_options)
            for group in by_image.values()
        ]
        for task in tqdm(tasks, desc="thumbnails", unit="image", disable=not progress):
            thumbs.update(task.result())
    data = json.dumps(review_rows(rows, thumbs), ensure_ascii=False, allow_nan=False)
    write_bytes(join_uri(assets, "rows.js"), f"window.EVF_REVIEW = {data};\n".encode(), storage_options)
    template = resources.files("evf.pipelines").joinpath("review_page/review.html").read_text("utf-8")
    text = template.replace("__ASSETS__", assets_link).replace("__TITLE__", html.escape(output))
    write_bytes(page_uri, text.encode("utf-8"), storage_options)
    return page_uri
