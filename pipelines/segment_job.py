"""The batch job: ``run_job(config) -> JobSummary`` (Ray Data, streaming end to end).

Stages (CPU reservations per task/actor come from the config, see ``describe_reservations``)::

    read manifest (tasks)  ->  fetch + decode + resize (tasks)  ->  model (actor pool)
        ->  post-process + PNG + write masks, then commit metadata (tasks)  ->  driver counts

Before anything runs the driver scans the manifest (footers and ids only), reads the committed ids
under ``metadata/`` and probes the model's preprocessing (config and tokenizer, no weights). After
the run it re-reads ``metadata/`` to account for every manifest row (input rows = ok + empty + error)
and writes ``_job.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from evf.io import open_filesystem, redact, write_bytes
from evf.model.checkpoint import DEMO_MODEL_ID
from pipelines.commit import STATUSES, Committed, OutputLayout, clear_outputs, load_committed
from pipelines.config import ConfigError, JobConfig
from pipelines.manifest import Manifest, ManifestError, display_url, grounding_id, scan_manifest
from pipelines.stages import (
    FinishSettings,
    FinishStage,
    InferenceSettings,
    InferenceStage,
    ModelInfo,
    Storage,
    decode_batch,
    make_datasource,
    probe_model,
)

log = logging.getLogger("evf.run")

__all__ = ["JobError", "JobSummary", "describe_reservations", "format_summary", "run_job"]

DEMO_HINT = (
    "For real images point --model at a real checkpoint: a Hub id (YxZhang/evf-sam2-multitask), "
    "a local folder, or an object-store URI (s3://bucket/evf-sam2-multitask/)."
)


class JobError(RuntimeError):
    """The job itself failed (not a row): bad manifest, model not loadable, storage down, Ray failure."""


@dataclass
class JobSummary:
    """The outcome of ``run_job``.

    counts: committed rows per status over the whole manifest after this run (``ok``, ``empty``,
    ``error``); ``input_rows == ok + empty + error`` when ``missing == 0``. this_run: rows processed
    by this run per status. skipped: rows already committed before this run (resume).
    """

    run_id: str
    manifest: str
    output: str
    model_id: str
    is_demo_model: bool
    input_rows: int
    counts: dict[str, int]
    missing: int
    this_run: dict[str, int]
    skipped: int
    stale: int
    elapsed_s: float
    reservations: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return self.counts.get("ok", 0)

    @property
    def empty(self) -> int:
        return self.counts.get("empty", 0)

    @property
    def error(self) -> int:
        return self.counts.get("error", 0)

    @property
    def processed(self) -> int:
        return sum(self.this_run.values())

    @property
    def rows_per_s(self) -> float:
        return self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def layout(self) -> OutputLayout:
        return OutputLayout(self.output)

    @property
    def masks_uri(self) -> str:
        return self.layout.masks

    @property
    def metadata_uri(self) -> str:
        return self.layout.metadata

    @property
    def job_json_uri(self) -> str:
        return self.layout.job_json

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(rows_per_s=round(self.rows_per_s, 3), processed=self.processed)
        return data


# --------------------------------------------------------------------------------------------------
# Ray and resources
# --------------------------------------------------------------------------------------------------


@contextmanager
def _ray_session(config: JobConfig) -> Iterator[bool]:
    """Reuse an initialised Ray, else start one (local, or the configured address); shut it after."""
    import ray

    if ray.is_initialized():
        yield False
        return
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": True,
    }
    if config.ray.runtime_env:
        kwargs["runtime_env"] = config.ray.runtime_env
    if config.ray.address:
        ray.init(address=config.ray.address, **kwargs)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(num_cpus=config.ray.num_cpus, object_store_memory=config.ray.object_store_memory, **kwargs)
    try:
        yield True
    finally:
        ray.shutdown()


def _stage_cpus(config: JobConfig) -> float:
    return config.cpu.num_cpus


def describe_reservations(config: JobConfig) -> dict[str, Any]:
    """Logical CPUs/GPUs each stage reserves (per task or actor) and the actor pool's total."""
    inference = config.inference
    return {
        "read_manifest": {"num_cpus": _stage_cpus(config), "kind": "tasks"},
        "decode": {"num_cpus": config.cpu.num_cpus, "kind": "tasks", "batch_rows": config.cpu.batch_size},
        "inference": {
            "num_cpus": inference.num_cpus,
            "num_gpus": inference.num_gpus,
            "kind": f"{inference.actors} actor(s)",
            "batch_images": inference.batch_size,
            "total_cpus": inference.actors * inference.num_cpus,
            "total_gpus": inference.actors * inference.num_gpus,
        },
        "finish_write": {"num_cpus": config.cpu.num_cpus, "kind": "tasks"},
    }


def _check_resources(config: JobConfig) -> dict[str, float]:
    import ray

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    actors = config.inference
    need_cpu = actors.actors * actors.num_cpus
    need_gpu = actors.actors * actors.num_gpus
    problems = []
    if need_cpu + config.cpu.num_cpus > cpus + 1e-9:
        problems.append(
            f"the actor pool reserves {need_cpu:g} CPU ({actors.actors} actor(s) x inference.num_cpus="
            f"{actors.num_cpus:g}) of the cluster's {cpus:g}, leaving less than cpu.num_cpus="
            f"{config.cpu.num_cpus:g} for the read/decode/write tasks: the job would hang. Use fractional "
            "CPUs (e.g. inference.num_cpus: 0.5), fewer actors, or a smaller cpu.num_cpus"
        )
    if need_gpu > gpus + 1e-9:
        problems.append(
            f"the actor pool needs {need_gpu:g} GPU ({actors.actors} x inference.num_gpus="
            f"{actors.num_gpus:g}) but the cluster has {gpus:g}; set inference.num_gpus: 0 for CPU inference"
        )
    if problems:
        message = "; ".join(problems)
        if config.ray.address:  # a cluster may autoscale: warn only
            log.warning("%s (continuing: the cluster may add nodes)", message)
        else:
            raise ConfigError(message)
    return {"CPU": cpus, "GPU": gpus}


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


def _log_model(config: JobConfig) -> None:
    if config.model == DEMO_MODEL_ID:
        log.warning(
            "Using the demo model %r: a small model trained on synthetic coloured shapes, shipped for "
            "trying the pipeline. Its masks on real photos are meaningless. %s",
            DEMO_MODEL_ID,
            DEMO_HINT,
        )
    else:
        log.info("Model: %s", display_url(config.model))


def _build_dataset(
    config: JobConfig,
    manifest: Manifest,
    committed: Committed,
    model: ModelInfo,
    storage: Storage,
    run_id: str,
) -> Any:
    import ray

    committed_ref = ray.put(dict(committed.keys)) if committed.keys else None
    source = make_datasource(
        manifest.files,
        rows_per_task=config.cpu.batch_size,
        storage=storage,
        defaults=config.defaults,
        model_id=config.model,
        committed=committed_ref,
        grounding=grounding_id(
            config.grounding.model, config.grounding.box_threshold, config.grounding.text_threshold
        ),
    )
    inference = config.inference
    node_cpus = ray.cluster_resources().get("CPU") if not config.ray.address else None
    settings = InferenceSettings(
        model=config.model,
        device=config.device,
        dtype=inference.dtype,
        mode=model.mode,
        torch_threads=config.torch_threads(node_cpus),
        compile=inference.compile,
        grounding_model=config.grounding.model,
        box_threshold=config.grounding.box_threshold,
        text_threshold=config.grounding.text_threshold,
    )
    finish_settings = FinishSettings(config.output, config.model, run_id, config.cpu.io_threads)
    read_tasks = sum(-(-f.num_rows // config.cpu.batch_size) for f in manifest.files)
    # One block per read task (Ray Data would otherwise split them into tiny blocks).
    ds = ray.data.read_datasource(
        source, num_cpus=_stage_cpus(config), override_num_blocks=max(1, read_tasks)
    )
    ds = ds.map_batches(
        decode_batch,
        batch_size=config.cpu.batch_size,
        batch_format="pyarrow",
        num_cpus=config.cpu.num_cpus,
        fn_kwargs={"model": model, "storage": storage, "io_threads": config.cpu.io_threads},
    )
    ds = ds.map_batches(
        InferenceStage,
        batch_size=inference.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(
            size=inference.actors, max_tasks_in_flight_per_actor=inference.max_tasks_in_flight
        ),
        num_cpus=inference.num_cpus,
        num_gpus=inference.num_gpus or None,
        fn_constructor_kwargs={"settings": settings, "storage": storage},
    )
    ds = ds.map_batches(
        _finish_batch,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=config.cpu.num_cpus,
        fn_kwargs={"settings": finish_settings, "storage": storage},
    )
    return ds


def _finish_batch(table: Any, *, settings: FinishSettings, storage: Storage) -> Any:
    return FinishStage(settings, storage)(table)


@contextmanager
def _data_context(config: JobConfig) -> Iterator[None]:
    """Ray Data settings for this job (progress bars, the buffer cap), restored afterwards."""
    import ray

    context = ray.data.DataContext.get_current()
    saved = (
        context.enable_progress_bars,
        context.execution_options.resource_limits,
        context.print_on_execution_start,
    )
    try:
        context.enable_progress_bars = config.progress
        context.print_on_execution_start = config.progress
        context.execution_options.resource_limits = context.execution_options.resource_limits.copy(
            object_store_memory=config.cpu.max_buffered_mb * 2**20
        )
        yield
    finally:
        (
            context.enable_progress_bars,
            context.execution_options.resource_limits,
            context.print_on_execution_start,
        ) = saved


def _write_job_json(layout: OutputLayout, payload: dict[str, Any], storage: Storage) -> None:
    data = json.dumps(payload, indent=2, sort_keys=False, default=str).encode("utf-8")
    write_bytes(layout.job_json, data, storage.options(layout.job_json))


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def run_job(config: JobConfig) -> JobSummary:
    """Run a segmentation job to completion and return its summary.

    Raises:
        ConfigError: the config cannot run here (e.g. the actor pool would take every CPU).
        JobError: the job failed as a whole (manifest unusable, model not loadable, storage or Ray
            failure). Rows that fail are not errors of the job: they are committed as ``error`` rows.
    """
    config = config.resolved()
    started = time.time()
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started)) + "-" + uuid.uuid4().hex[:8]
    storage = Storage.from_environment(config.storage_options)
    layout = OutputLayout(config.output)
    _log_model(config)
    log.info(
        "Run %s: manifest %s -> output %s", run_id, display_url(config.manifest), display_url(config.output)
    )

    try:
        manifest = scan_manifest(config.manifest, storage.options(config.manifest))
    except ManifestError as error:
        raise JobError(str(error)) from None
    try:
        if config.overwrite:
            log.info("--overwrite: deleting previous metadata/, masks/ and _job.json under the output")
            clear_outputs(layout, storage.options(layout.root))
            committed = Committed()
        else:
            committed = load_committed(layout, storage.options(layout.metadata))
    except OSError as error:
        raise JobError(str(error)) from None
    todo = len(manifest.ids - committed.keys.keys())
    skipped = manifest.num_rows - todo
    if committed.duplicate_rows:
        log.warning("metadata/ already holds %d duplicate row(s) for some ids", committed.duplicate_rows)
    log.info(
        "Manifest: %d row(s) in %d file(s); %d already committed, %d to do",
        manifest.num_rows,
        len(manifest.files),
        skipped,
        todo,
    )

    this_run: Counter[str] = Counter()
    stale = 0
    reservations = describe_reservations(config)
    model_info: ModelInfo | None = None
    failure: str | None = None
    with _ray_session(config):
        try:
            if todo:
                model_info, stale = _run_pipeline(
                    config, manifest, committed, storage, run_id, reservations, this_run
                )
        except (ConfigError, JobError) as error:
            failure = str(error)
            raise
        except BaseException as error:
            failure = f"the job was interrupted or crashed: {_cause(error)}"
            raise
        finally:
            summary = _finish_run(
                config,
                manifest,
                layout,
                storage,
                run_id,
                started,
                skipped,
                stale,
                this_run,
                reservations,
                model_info,
                committed,
                failure,
            )
    if summary.missing:
        raise JobError(f"{summary.missing} manifest row(s) have no metadata row after the run")
    if stale:
        log.warning(
            "%d committed row(s) were computed from different inputs (manifest row or model changed) and "
            "were kept; use --overwrite or a new output to recompute them",
            stale,
        )
    return summary


def _asks_for_semantic(config: JobConfig, manifest: Manifest, storage: Storage) -> bool:
    """True when the job default or any manifest row sets ``semantic_type`` (reads that column only)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if config.defaults.get("semantic_type"):
        return True
    for file in manifest.files:
        if "semantic_type" not in file.columns:
            continue
        fs, path = open_filesystem(file.uri, storage.options(file.uri))
        with fs.open(path, "rb") as handle:
            column = pq.read_table(handle, columns=["semantic_type"]).column(0)
        if pc.any(pc.equal(column.cast("bool"), True)).as_py():
            return True
    return False


def _warn_if_semantic_unsupported(
    config: JobConfig, manifest: Manifest, model_info: ModelInfo, storage: Storage
) -> None:
    """Once per job: semantic rows with a checkpoint whose tokenizer has no ``[semantic]`` token."""
    if not model_info.supports_semantic and _asks_for_semantic(config, manifest, storage):
        log.warning(
            "Rows ask for semantic_type=true but model %s has no [semantic] token: the prefix is read "
            "as plain text. Semantic-level segmentation needs a -multitask checkpoint "
            "(e.g. YxZhang/evf-sam2-multitask).",
            display_url(config.model),
        )


def _run_pipeline(
    config: JobConfig,
    manifest: Manifest,
    committed: Committed,
    storage: Storage,
    run_id: str,
    reservations: dict[str, Any],
    this_run: Counter[str],
) -> tuple[ModelInfo, int]:
    """Probe the model, run the stages, count the rows as they come back. Returns (model, stale)."""
    import ray

    reservations["cluster"] = _check_resources(config)
    _log_reservations(reservations)
    try:
        if config.ray.address:  # the model may only be reachable (or worth caching) on the cluster
            probe = ray.remote(num_cpus=min(0.25, config.cpu.num_cpus))(probe_model)
            model_info = ray.get(probe.remote(config.model, config.inference.mode, storage))
        else:
            model_info = probe_model(config.model, config.inference.mode, storage)
    except Exception as error:
        raise JobError(f"cannot load model {display_url(config.model)!r}: {_cause(error)}") from None
    log.info(
        "Model %s: mode %s, SAM input %d px%s",
        display_url(config.model),
        model_info.mode,
        model_info.sam_image_size,
        " (demo model)" if model_info.is_demo_model else "",
    )
    _warn_if_semantic_unsupported(config, manifest, model_info, storage)
    stale = 0
    with _data_context(config):
        dataset = _build_dataset(config, manifest, committed, model_info, storage, run_id)
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                statuses = batch.column("status").to_pylist()
                stale_flags = batch.column("stale").to_pylist()
                for status, is_stale in zip(statuses, stale_flags, strict=True):
                    this_run["skipped" if status == "skip" else status] += 1
                    stale += bool(is_stale)
        except Exception as error:
            raise JobError(f"the pipeline failed: {_cause(error)}") from None
    return model_info, stale


def _finish_run(
    config: JobConfig,
    manifest: Manifest,
    layout: OutputLayout,
    storage: Storage,
    run_id: str,
    started: float,
    skipped: int,
    stale: int,
    this_run: Counter[str],
    reservations: dict[str, Any],
    model_info: ModelInfo | None,
    committed: Committed,
    failure: str | None,
) -> JobSummary:
    """Account for every manifest row from metadata/, write _job.json, return the summary."""
    elapsed = time.time() - started
    counts = _final_accounting(layout, storage, committed).counts(manifest.ids)
    missing = manifest.num_rows - sum(counts.values())
    summary = JobSummary(
        run_id=run_id,
        manifest=display_url(config.manifest),
        output=display_url(config.output),
        model_id=config.model,
        is_demo_model=config.model == DEMO_MODEL_ID,
        input_rows=manifest.num_rows,
        counts={s: counts.get(s, 0) for s in STATUSES},
        missing=missing,
        this_run={s: this_run.get(s, 0) for s in STATUSES},
        skipped=skipped,
        stale=stale,
        elapsed_s=elapsed,
        reservations=reservations,
    )
    if failure is None and missing:
        failure = f"{missing} manifest row(s) have no metadata row after the run"
    payload = {
        "run_id": run_id,
        "status": "failed" if failure else "succeeded",
        "error": failure,
        "started_at": _utc(started),
        "finished_at": _utc(time.time()),
        "elapsed_s": round(elapsed, 3),
        "manifest": summary.manifest,
        "output": summary.output,
        "model": asdict(model_info) if model_info else {"model_id": config.model},
        "counts": {"input_rows": manifest.num_rows, **summary.counts, "missing": missing},
        "this_run": {
            **summary.this_run,
            "processed": summary.processed,
            "skipped_committed": skipped,
            "stale": stale,
        },
        "rows_per_s": round(summary.rows_per_s, 3),
        "resources": reservations,
        "outputs": {"masks": summary.masks_uri, "metadata": summary.metadata_uri},
        "config": _public_config(config),
    }
    try:
        _write_job_json(layout, payload, storage)
    except OSError as error:
        log.error("could not write %s: %s", layout.job_json, error)
    return summary


def _final_accounting(layout: OutputLayout, storage: Storage, fallback: Committed) -> Committed:
    try:
        return load_committed(layout, storage.options(layout.metadata))
    except OSError as error:
        log.error("cannot read back metadata: %s", error)
        return fallback


def _cause(error: BaseException) -> str:
    """The innermost useful message of a (possibly Ray-wrapped) exception, one line."""
    cause = getattr(error, "cause", None) or error.__cause__ or error
    text = str(cause).strip().splitlines()
    last = next((line for line in reversed(text) if line.strip()), type(cause).__name__)
    return f"{type(cause).__name__}: {last}" if type(cause).__name__ not in last else last


def _public_config(config: JobConfig) -> dict[str, Any]:
    data = config.public_dict()
    data["manifest"], data["output"] = display_url(config.manifest), display_url(config.output)
    if data.get("ray", {}).get("runtime_env"):
        data["ray"]["runtime_env"] = redact(data["ray"]["runtime_env"])
    return data


def _log_reservations(reservations: dict[str, Any]) -> None:
    inference = reservations["inference"]
    log.info(
        "Reservations: read/decode/write tasks %g CPU each; model: %s x (%g CPU, %g GPU) = %g CPU, %g GPU "
        "of the cluster's %g CPU, %g GPU",
        reservations["decode"]["num_cpus"],
        inference["kind"],
        inference["num_cpus"],
        inference["num_gpus"],
        inference["total_cpus"],
        inference["total_gpus"],
        reservations.get("cluster", {}).get("CPU", 0),
        reservations.get("cluster", {}).get("GPU", 0),
    )


def format_summary(summary: JobSummary) -> str:
    """The end-of-job table (counts per status, throughput, output locations)."""
    width = 12
    lines = [
        f"evf run {summary.run_id}",
        f"  {'manifest':<{width}} {summary.manifest} ({summary.input_rows} rows)",
        f"  {'model':<{width}} {summary.model_id}{' (demo model)' if summary.is_demo_model else ''}",
        f"  {'status':<{width}} {'all rows':>9} {'this run':>9}",
    ]
    for status in STATUSES:
        lines.append(
            f"  {status:<{width}} {summary.counts.get(status, 0):>9} {summary.this_run.get(status, 0):>9}"
        )
    total = sum(summary.counts.values())
    lines.append(f"  {'total':<{width}} {total:>9} {summary.processed:>9}")
    if summary.skipped:
        lines.append(f"  {'resumed':<{width}} {summary.skipped} row(s) were already committed and skipped")
    if summary.missing:
        lines.append(f"  {'MISSING':<{width}} {summary.missing} row(s) have no metadata row")
    lines += [
        f"  {'time':<{width}} {summary.elapsed_s:.1f} s ({summary.rows_per_s:.2f} rows/s this run)",
        f"  {'masks':<{width}} {summary.masks_uri}/",
        f"  {'metadata':<{width}} {summary.metadata_uri}/",
        f"  {'job record':<{width}} {summary.job_json_uri}",
    ]
    return "\n".join(lines)
