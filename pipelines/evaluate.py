"""``evf eval``: mean IoU and cIoU of a model over a manifest with ground-truth masks, through the job.

The model runs through the batch job itself (``run_job``, the local config by default), so what is
measured is exactly what ``evf run`` writes. Each written mask is then compared with the row's
ground truth, the manifest's ``mask_url`` (relative paths resolve like ``image_url``); both are read
with ``evf.io.load_mask`` and scored by ``evf.metrics`` (the rules are documented there).

Python: ``evaluate(manifest, model=None, output=None, config=None, overrides=None) -> EvalReport``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Mapping

import numpy as np

from evf.config import Overrides
from evf.io import load_mask
from evf.manifest import read_rows, resolve_url, scan_manifest
from evf.manifest_file import ManifestError, row_id
from evf.metrics import EvalReport, RowResult, derive_kind, mask_counts
from evf.pipelines.config import JobConfig, load_config
from evf.pipelines.job import run_job
from evf.pipelines.metadata import read_metadata
from evf.storage import Storage, display_url

log = logging.getLogger("evf.eval")

__all__ = ["EvalError", "evaluate", "read_ground_truth", "score_output"]

GT_COLUMNS = ("id", "kind", "semantic_type", "negative_prompt", "mask_url")  # what is read of the manifest


class EvalError(RuntimeError):
    """The evaluation cannot be done (no ground truth, unreadable mask, stale outputs...)."""


def read_ground_truth(
    manifest: str, storage: Storage | None = None, columns: Mapping[str, str] | None = None
) -> dict[str, tuple[str, str]]:
    """``{row id: (kind, resolved mask_url)}`` for every manifest row (ids as the job derives them).

    Raises ``EvalError`` when a file has no ``mask_url`` column or a row has no ground truth.
    """
    storage = storage or Storage()
    truth: dict[str, tuple[str, str]] = {}
    try:
        files = scan_manifest(manifest, storage.options(manifest), columns).files
    except ManifestError as error:
        raise EvalError(str(error)) from None
    for file in files:
        if "mask_url" not in file.columns:
            raise EvalError(f"manifest file {display_url(file.uri)!r} has no mask_url column (ground truth)")
        for row in read_rows(file, 0, file.num_rows, GT_COLUMNS, storage.options(file.uri)):
            rid = row_id(row.get("id"), file.name, row["_row"])
            url = row["mask_url"]
            if not isinstance(url, str) or not url.strip():
                raise EvalError(f"manifest row {rid!r} has no mask_url (ground truth)")
            kind = derive_kind(row.get("kind"), row.get("semantic_type"), row.get("negative_prompt"))
            truth[rid] = (kind, resolve_url(url.strip(), file.base))
    return truth


def score_output(
    truth: Mapping[str, tuple[str, str]], output: str, storage: Storage | None = None, threads: int = 8
) -> list[RowResult]:
    """Score the job output under ``output`` against ``truth`` (from :func:`read_ground_truth`).

    One :class:`RowResult` per ``truth`` row, in its order; masks are read ``threads`` at a time.
    """
    from concurrent.futures import ThreadPoolExecutor

    storage = storage or Storage()
    metadata = read_metadata(output, storage.options(output)).select(["id", "status", "mask_url"]).to_pydict()
    done = dict(zip(metadata["id"], zip(metadata["status"], metadata["mask_url"], strict=True), strict=True))
    missing = [rid for rid in truth if rid not in done]
    if missing:
        raise EvalError(f"{len(missing)} manifest row(s) have no metadata row, e.g. {missing[0]!r}")

    def score(rid: str) -> RowResult:
        kind, gt_url = truth[rid]
        status, mask_url = done[rid]
        try:
            gt = load_mask(gt_url, storage.options(gt_url))
        except (OSError, ValueError) as error:
            raise EvalError(f"row {rid!r}: ground truth: {error}") from None
        if status == "error" or not mask_url:
            return RowResult(rid, kind, "error", 0, int(np.count_nonzero(gt)), mask_url, gt_url)
        try:
            counts = mask_counts(load_mask(mask_url, storage.options(mask_url)), gt)
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
    overrides: Overrides | None,
    temp: str,
) -> tuple[JobConfig, bool]:
    """The job config (output: ``output``, an ``output`` override, else ``temp``) and whether the
    output was chosen by the caller (the config file's own output is not used)."""
    chosen = output is not None or _overrides_output(overrides)
    flags = {"manifest": manifest, "model": model, "output": output if chosen else temp}
    return load_config(config, overrides, flags).resolved(), chosen


def _overrides_output(overrides: Overrides | None) -> bool:
    if overrides is None:
        return False
    if isinstance(overrides, Mapping):
        return overrides.get("output") is not None
    return any(text.partition("=")[0].strip() == "output" for text in overrides)


def evaluate(
    manifest: str,
    model: str | None = None,
    output: str | None = None,
    config: str | os.PathLike[str] | None = None,
    overrides: Overrides | None = None,
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
        evf.config.ConfigError: invalid config. evf.pipelines.job.JobError: the job failed.
        EvalError: missing ground truth, a mask that cannot be read or does not match its ground
            truth's size, or outputs computed from other inputs (other model, prompt or options).
    """
    with tempfile.TemporaryDirectory(prefix="evf-eval-") as temp:
        job, chosen = _job_config(manifest, model, output, config, overrides, temp)
        storage = job.storage()
        truth = read_ground_truth(job.manifest, storage, job.columns)  # fail early, before the model runs
        started = time.perf_counter()
        summary = run_job(job)
        job_s = time.perf_counter() - started
        if summary.stale:
            raise EvalError(
                f"{summary.stale} row(s) under {summary.output!r} were computed from other inputs (model, "
                "prompt or options) and were kept: use a new --output or --set overwrite=true"
            )
        started = time.perf_counter()
        rows = score_output(truth, job.output, storage, threads=job.cpu.io_threads)
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
