"""``evf eval``: mean IoU and cIoU of a model over a manifest with ground-truth masks.

The model runs through the batch job itself (``pipelines.run_job``, the local config by default), so
what is measured is exactly what ``evf run`` writes. Then each written mask is compared with the
row's ground truth:

* prediction: the mask PNG of the metadata row, binarised at 128 (the alpha channel of an RGBA
  output); ground truth: the manifest's ``mask_url`` (relative paths are resolved against the
  Parquet file's folder, like ``image_url``), read as grayscale and binarised at > 127;
* a row's IoU is ``|P & G| / |P | G|``; **an empty prediction of an empty ground truth scores 1**
  (the right answer to "the cross" in a scene without one);
* ``error`` rows (the job could not produce a mask) score 0 and are counted apart;
* mIoU is the mean of the rows' IoUs; cIoU, as the EVF-SAM paper reports it, is the cumulative
  intersection over the cumulative union of all rows (an error row adds its ground truth's area to
  the union). cIoU is 1 when the union of every row is empty.

Results are broken down by prompt kind: the manifest's ``kind`` column where a row has one, else
``semantic`` (``semantic_type`` true), ``negative`` (``negative_prompt`` set) or ``referring``.

Python: ``evaluate(manifest, model=None, output=None, config=None, overrides=None) -> EvalReport``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("evf.eval")

KIND_ORDER = ("referring", "semantic", "negative")
GT_COLUMNS = ("id", "kind", "semantic_type", "negative_prompt", "mask_url")  # what is read of the manifest


class EvalError(RuntimeError):
    """The evaluation cannot be done (no ground truth, unreadable mask, stale outputs...)."""


# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowResult:
    """One manifest row: its kind, the job's status, and the intersection/union (pixels) behind its IoU."""

    id: str
    kind: str
    status: str
    intersection: int
    union: int
    mask_url: str | None
    gt_url: str

    @property
    def iou(self) -> float:
        """``intersection / union``; 1.0 when both masks are empty; 0.0 for error rows."""
        if self.status == "error":
            return 0.0
        return self.intersection / self.union if self.union else 1.0


@dataclass(frozen=True)
class Scores:
    """Aggregate of some rows: count, error rows, mIoU and cIoU."""

    rows: int
    errors: int
    miou: float
    ciou: float

    @classmethod
    def of(cls, rows: Sequence[RowResult]) -> Scores:
        intersection = sum(r.intersection for r in rows)
        union = sum(r.union for r in rows)
        return cls(
            rows=len(rows),
            errors=sum(r.status == "error" for r in rows),
            miou=float(np.mean([r.iou for r in rows])) if rows else 0.0,
            ciou=intersection / union if union else 1.0,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "errors": self.errors, "mIoU": self.miou, "cIoU": self.ciou}


@dataclass
class EvalReport:
    """The result of :func:`evaluate`. ``output`` is None when the masks went to a (deleted) temp dir."""

    model: str
    manifest: str
    output: str | None
    rows: list[RowResult]
    job_s: float
    score_s: float
    by_kind: dict[str, Scores] = field(init=False)
    total: Scores = field(init=False)

    def __post_init__(self) -> None:
        self.total = Scores.of(self.rows)
        kinds = {r.kind for r in self.rows}
        ordered = [k for k in KIND_ORDER if k in kinds] + sorted(kinds - set(KIND_ORDER))
        self.by_kind = {k: Scores.of([r for r in self.rows if r.kind == k]) for k in ordered}

    @property
    def miou(self) -> float:
        return self.total.miou

    @property
    def ciou(self) -> float:
        return self.total.ciou

    @property
    def errors(self) -> int:
        return self.total.errors

    def to_dict(self) -> dict[str, Any]:
        """The machine-readable summary (the last line ``evf eval`` prints)."""
        return {
            "model": self.model,
            "manifest": self.manifest,
            "rows": self.total.rows,
            "errors": self.total.errors,
            "mIoU": self.total.miou,
            "cIoU": self.total.ciou,
            "by_kind": {k: s.to_dict() for k, s in self.by_kind.items()},
            "job_s": round(self.job_s, 2),
            "score_s": round(self.score_s, 2),
        }

    def format_table(self) -> str:
        """A readable table: one line per kind, then the total."""
        lines = [f"{'kind':<12}{'rows':>7}{'errors':>8}{'mIoU':>9}{'cIoU':>9}"]
        entries = [*self.by_kind.items(), ("all", self.total)]
        for i, (kind, s) in enumerate(entries):
            if i == len(entries) - 1:
                lines.append("-" * len(lines[0]))
            lines.append(f"{kind:<12}{s.rows:>7}{s.errors:>8}{s.miou:>9.4f}{s.ciou:>9.4f}")
        return "\n".join(lines)


def mask_counts(prediction: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """``(|P & G|, |P | G|)`` of two boolean masks of the same shape."""
    if prediction.shape != truth.shape:
        raise ValueError(f"mask shape {prediction.shape} differs from ground truth shape {truth.shape}")
    return int(np.count_nonzero(prediction & truth)), int(np.count_nonzero(prediction | truth))


# --------------------------------------------------------------------------------------------------
# Ground truth from the manifest
# --------------------------------------------------------------------------------------------------


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value) and value == value  # NaN is not true


def derive_kind(kind: Any, semantic_type: Any, negative_prompt: Any) -> str:
    """The row's ``kind`` if set, else semantic / negative / referring from its options."""
    if isinstance(kind, str) and kind.strip():
        return kind.strip()
    if _truthy(semantic_type):
        return "semantic"
    if isinstance(negative_prompt, str) and negative_prompt.strip():
        return "negative"
    return "referring"


def read_ground_truth(manifest: str, storage_options: Any = None) -> dict[str, tuple[str, str]]:
    """``{row id: (kind, resolved mask_url)}`` for every manifest row (ids as the job derives them).

    ``storage_options``: a mapping, or a callable ``uri -> options`` (as ``pipelines.stages.Storage``).
    Raises ``EvalError`` when a file has no ``mask_url`` column or a row has no ground truth.
    """
    from evf.io import open_filesystem
    from evf.parquet import read_parquet
    from pipelines.manifest import ManifestError, display_url, resolve_image_url, row_id, scan_manifest

    def options(uri: str) -> Any:
        return storage_options(uri) if callable(storage_options) else storage_options

    truth: dict[str, tuple[str, str]] = {}
    try:
        files = scan_manifest(manifest, options(manifest)).files
    except ManifestError as error:
        raise EvalError(str(error)) from None
    for file in files:
        if "mask_url" not in file.columns:
            raise EvalError(f"manifest file {display_url(file.uri)!r} has no mask_url column (ground truth)")
        wanted = [c for c in GT_COLUMNS if c in file.columns]
        fs, path = open_filesystem(file.uri, options(file.uri))
        with fs.open(path, "rb") as handle:
            columns = read_parquet(handle, wanted).to_pydict()
        nothing = [None] * file.num_rows
        for index in range(file.num_rows):
            rid = row_id(columns.get("id", nothing)[index], file.name, index)
            url = columns["mask_url"][index]
            if not isinstance(url, str) or not url.strip():
                raise EvalError(f"manifest row {rid!r} has no mask_url (ground truth)")
            kind = derive_kind(
                columns.get("kind", nothing)[index],
                columns.get("semantic_type", nothing)[index],
                columns.get("negative_prompt", nothing)[index],
            )
            truth[rid] = (kind, resolve_image_url(url.strip(), file.base))
    return truth


# --------------------------------------------------------------------------------------------------
# Reading masks
# --------------------------------------------------------------------------------------------------


def _decode(data: bytes, uri: str, flags: int) -> np.ndarray:
    import cv2

    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None:
        raise EvalError(f"cannot decode mask {uri!r}")
    return image


def read_prediction(uri: str, storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
    """A written mask as bool (H, W): grayscale >= 128, or the alpha channel of an RGBA image >= 128."""
    import cv2

    from evf.io import read_bytes

    image = _decode(read_bytes(uri, storage_options), uri, cv2.IMREAD_UNCHANGED)
    if image.ndim == 3:
        image = image[:, :, 3] if image.shape[2] == 4 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return image >= 128


def read_truth(uri: str, storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
    """A ground-truth mask as bool (H, W): the image in grayscale (8 bits) > 127."""
    import cv2

    from evf.io import read_bytes

    return _decode(read_bytes(uri, storage_options), uri, cv2.IMREAD_GRAYSCALE) > 127


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def score_output(
    truth: Mapping[str, tuple[str, str]], output: str, storage_options: Any = None, threads: int = 8
) -> list[RowResult]:
    """Score the job output under ``output`` against ``truth`` (from :func:`read_ground_truth`).

    One :class:`RowResult` per ``truth`` row, in its order; masks are read ``threads`` at a time.
    ``storage_options``: a mapping, or a callable ``uri -> options``.
    """
    from pipelines.commit import read_metadata

    def options(uri: str) -> Any:
        return storage_options(uri) if callable(storage_options) else storage_options

    metadata = read_metadata(output, options(output)).select(["id", "status", "mask_url"]).to_pydict()
    done = dict(zip(metadata["id"], zip(metadata["status"], metadata["mask_url"], strict=True), strict=True))
    missing = [rid for rid in truth if rid not in done]
    if missing:
        raise EvalError(f"{len(missing)} manifest row(s) have no metadata row, e.g. {missing[0]!r}")

    def score(rid: str) -> RowResult:
        kind, gt_url = truth[rid]
        status, mask_url = done[rid]
        try:
            gt = read_truth(gt_url, options(gt_url))
        except OSError as error:
            raise EvalError(f"row {rid!r}: ground truth: {error}") from None
        if status == "error" or not mask_url:
            return RowResult(rid, kind, "error", 0, int(np.count_nonzero(gt)), mask_url, gt_url)
        try:
            counts = mask_counts(read_prediction(mask_url, options(mask_url)), gt)
        except (OSError, ValueError) as error:
            raise EvalError(f"row {rid!r}: {error}") from None
        return RowResult(rid, kind, status, *counts, mask_url, gt_url)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return list(pool.map(score, truth))


def _job_config(
    manifest: str,
    model: str | None,
    output: str | None,
    config: str | os.PathLike[str] | None,
    overrides: Mapping[str, Any] | Sequence[str] | None,
    temp: str,
) -> tuple[Any, bool]:
    """The job config (output: ``output``, an ``output`` override, else ``temp``) and whether the
    output was chosen by the caller."""
    from pipelines.config import DEFAULT_CONFIG, apply_overrides, config_from_dict, read_config_data

    data = read_config_data(config)
    data.pop("output", None)  # the config file's output is not used: a temp dir unless one is given
    data = apply_overrides(data, overrides or {})
    data = apply_overrides(data, {"manifest": manifest, "model": model, "output": output})
    chosen = "output" in data
    data.setdefault("output", temp)
    return config_from_dict(data, source=repr(str(config or DEFAULT_CONFIG))).resolved(), chosen


def evaluate(
    manifest: str,
    model: str | None = None,
    output: str | None = None,
    config: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> EvalReport:
    """Run ``model`` over ``manifest`` with the batch job and score its masks against ``mask_url``.

    Args:
        manifest: Parquet manifest (file or folder, any fsspec URI) with a ``mask_url`` column.
        model: checkpoint (as ``evf run --model``); None: the config's model.
        output: where the job writes masks and metadata; None: a temp dir, deleted afterwards. An
            existing output resumes (rows already there are not recomputed).
        config: job config YAML; None: ``configs/local.yaml``.
        overrides: config overrides, ``{"inference.batch_size": 4}`` or ``["inference.batch_size=4"]``.

    Raises:
        pipelines.ConfigError: invalid config. pipelines.JobError: the job failed.
        EvalError: missing ground truth, a mask that cannot be read or does not match its ground
            truth's size, or outputs computed from other inputs (other model, prompt or options).
    """
    from pipelines.manifest import display_url
    from pipelines.segment_job import run_job
    from pipelines.stages import Storage

    with tempfile.TemporaryDirectory(prefix="evf-eval-") as temp:
        job, chosen = _job_config(manifest, model, output, config, overrides, temp)
        storage = Storage.from_environment(job.storage_options)
        truth = read_ground_truth(job.manifest, storage.options)  # fail early, before the model runs
        started = time.perf_counter()
        summary = run_job(job)
        job_s = time.perf_counter() - started
        if summary.stale:
            raise EvalError(
                f"{summary.stale} row(s) under {summary.output!r} were computed from other inputs (model, "
                "prompt or options) and were kept: use a new --output or --set overwrite=true"
            )
        started = time.perf_counter()
        rows = score_output(truth, summary.output, storage.options, threads=job.cpu.io_threads)
        report = EvalReport(
            model=summary.model_id,
            manifest=display_url(job.manifest),
            output=summary.output if chosen else None,
            rows=rows,
            job_s=job_s,
            score_s=time.perf_counter() - started,
        )
    log.info("Scored %d row(s) in %.1f s (job: %.1f s)", len(rows), report.score_s, report.job_s)
    return report


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipelines.cli import add_overrides_argument

    parser.add_argument(
        "--manifest", required=True, help="Parquet manifest with a mask_url column (ground truth)"
    )
    parser.add_argument(
        "--model", help="checkpoint: evf-sam2-demo, a Hub id, a folder or s3://... (default: the config's)"
    )
    parser.add_argument(
        "--output", help="keep the job's masks and metadata here (default: a temp dir, deleted)"
    )
    parser.add_argument("--config", help="job config YAML (default: configs/local.yaml)")
    add_overrides_argument(
        parser, "override a job config field, e.g. --set inference.batch_size=4 --set progress=false"
    )


def command(args: argparse.Namespace) -> int:
    """Print the table, then the JSON summary as the last line. Exit 0, 1 (job/eval failed) or 2 (config)."""
    from pipelines.cli import QUIET_LIBRARIES
    from pipelines.config import ConfigError
    from pipelines.segment_job import JobError

    for name in QUIET_LIBRARIES:
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.getEffectiveLevel(), logging.INFO))
    try:
        report = evaluate(args.manifest, args.model, args.output, args.config, args.overrides)
    except ConfigError as error:
        print(f"evf eval: {error}", file=sys.stderr)
        return 2
    except (JobError, EvalError) as error:
        print(f"evf eval: {error}", file=sys.stderr)
        return 1
    print(f"model {report.model}  manifest {report.manifest}")
    print(f"job {report.job_s:.1f} s, scoring {report.score_s:.1f} s")
    print(report.format_table())
    print(json.dumps(report.to_dict()), flush=True)
    return 0


__all__ = [
    "EvalError",
    "EvalReport",
    "RowResult",
    "Scores",
    "derive_kind",
    "evaluate",
    "mask_counts",
    "read_ground_truth",
    "score_output",
]
