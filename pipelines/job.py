"""The batch job: ``run_job(config) -> JobSummary`` (Ray Data, streaming end to end).

Stages (CPU reservations per task/actor come from the config, see ``describe_reservations``)::

    read manifest + validate (tasks)  ->  fetch + decode + prepare (tasks)  ->  model (actor pool)
        ->  post-process + PNG + write masks, then commit metadata (tasks)

Before anything runs the driver scans the manifest (footers and ids only), reads the committed ids
under ``metadata/`` and reads the checkpoint's preprocessing (config and tokenizer, no weights).
After the run it re-reads ``metadata/`` to account for every manifest row and writes ``_job.json``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from evf.checkpoints import DEMO_MODEL_ID, DEMO_MODEL_WARNING
from evf.config import ConfigError
from evf.manifest import Manifest, scan_manifest
from evf.manifest_file import ManifestError
from evf.parquet import read_parquet
from evf.pipelines.commit import JobOutput, OutputLayout, check_output_writable, clear_outputs
from evf.pipelines.compact import AUTO_COMPACT_FILES, compact, drop_superseded
from evf.pipelines.config import JobConfig
from evf.pipelines.dataset import build_dataset, data_context, describe_reservations, none_valid
from evf.pipelines.infer import MODEL_ROWS, NODE_PREFIX
from evf.pipelines.metadata import Committed, list_metadata_files, load_committed, release_arrow_memory
from evf.pipelines.native_stderr import filtered_native_stderr
from evf.pipelines.progress import JobProgress, start_counters
from evf.pipelines.read import CommittedIndex
from evf.pipelines.sources import with_images_manifest
from evf.pipelines.summary import JobSummary, RunRecord, summarize_run
from evf.registry import CheckpointInfo, describe_checkpoint
from evf.retry import call_with_retry
from evf.storage import Storage, display_url, open_filesystem

log = logging.getLogger("evf.run")

__all__ = ["JobError", "run_job"]


class JobError(RuntimeError):
    """The job itself failed (not a row): bad manifest, model not loadable, storage down, Ray failure."""


@contextmanager
def _ray_session(config: JobConfig) -> Iterator[None]:
    """Reuse an initialised Ray, else start one (local, or the configured address); shut it after."""
    # Ray's own notes (token auth, Ray Data's "execution finished", the C++ core worker's line on
    # actor constructor arguments) are noise to a user of the job: shown with -v only.
    verbose = log.isEnabledFor(logging.DEBUG)
    if not verbose:
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    quiet = contextlib.nullcontext() if verbose else filtered_native_stderr()
    import ray

    if ray.is_initialized():
        with quiet:
            yield
        return
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING if verbose else logging.ERROR,
        "log_to_driver": True,
    }
    if config.ray.runtime_env:
        kwargs["runtime_env"] = config.ray.runtime_env
    if config.ray.address:
        ray.init(address=config.ray.address, **kwargs)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # address="local": a private instance, even where another Ray runs on this machine.
        ray.init(
            address="local",
            num_cpus=config.ray.num_cpus,
            object_store_memory=config.ray.object_store_memory,
            **kwargs,
        )
    try:
        with quiet:  # entered once Ray's processes run, so that none inherits its pipe
            yield
    finally:
        ray.shutdown()


def _check_resources(config: JobConfig) -> dict[str, float]:
    import ray

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    pool = config.inference
    # An autoscaling pool needs room for its minimum; Ray Data adds actors only where resources allow.
    need_cpu, need_gpu = pool.min_actors * pool.num_cpus, pool.min_actors * pool.num_gpus
    problems = []
    if need_cpu + config.cpu.num_cpus > cpus + 1e-9:
        problems.append(
            f"the actor pool reserves {need_cpu:g} CPU ({pool.min_actors} actor(s) x inference.num_cpus="
            f"{pool.num_cpus:g}) of the cluster's {cpus:g}, leaving less than cpu.num_cpus="
            f"{config.cpu.num_cpus:g} for the read/decode/write tasks: the job would hang. Use fractional "
            "CPUs (e.g. inference.num_cpus: 0.5), fewer actors, or a smaller cpu.num_cpus"
        )
    if need_gpu > gpus + 1e-9:
        problems.append(
            f"the actor pool needs {need_gpu:g} GPU ({pool.min_actors} x inference.num_gpus="
            f"{pool.num_gpus:g}) but the cluster has {gpus:g}; set inference.num_gpus: 0 for CPU inference"
        )
    if problems:
        message = "; ".join(problems)
        if config.ray.address:  # a cluster may autoscale: warn only
            log.warning("%s (continuing: the cluster may add nodes)", message)
        else:
            raise ConfigError(message)
    return {"CPU": cpus, "GPU": gpus}


# An exception line of a traceback's text: "OSError: [Errno 30] Read-only file system: '/out'".
_EXCEPTION_LINE = re.compile(
    r"([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Failure|Timeout))(?:: (.*))?"
)
_RAY_WRAPPERS = frozenset({"RayTaskError", "UserCodeException"})  # Ray's, around the user's error


def _cause(error: BaseException) -> str:
    """The innermost cause of a (possibly Ray-wrapped) exception, in one line (``"OSError: [Errno 30]
    Read-only file system: '/out'"``, not Ray's advice on retries). A Ray task's error reaches the
    driver with its causes only as traceback text, innermost first (``__cause__`` is lost on the
    way): there the first exception line that is not Ray's wrapper is the innermost cause."""
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and all(link is not seen for seen in chain):
        chain.append(link)
        link = getattr(link, "cause", None) or link.__cause__
    for link in reversed(chain):
        for line in str(link).splitlines():
            match = _EXCEPTION_LINE.fullmatch(line.rstrip())
            name = match.group(1).rsplit(".", 1)[-1] if match else ""
            if match and name not in _RAY_WRAPPERS:
                return f"{name}: {match.group(2)}" if match.group(2) else name
    cause = chain[-1]
    text = str(cause).strip().splitlines()
    last = next((line for line in reversed(text) if line.strip()), type(cause).__name__)
    return f"{type(cause).__name__}: {last}" if type(cause).__name__ not in last else last


def _describe_checkpoint(config: JobConfig, storage: Storage) -> CheckpointInfo:
    """The checkpoint's preprocessing, with its weights file checked (``check_weights``: header and
    size, no tensor read), where the model will be read: on a cluster in a task, else right here,
    before Ray starts, so that a corrupt or unsafe checkpoint fails in seconds."""
    options = storage.options(config.model)
    if not config.ray.address:
        return describe_checkpoint(config.model, config.model_options(), options)  # CheckpointError: exit 2
    import ray

    try:
        task = ray.remote(num_cpus=min(0.25, config.cpu.num_cpus))(describe_checkpoint)
        return ray.get(task.remote(config.model, config.model_options(), options))
    except Exception as error:
        raise JobError(f"cannot load model {display_url(config.model)!r}: {_cause(error)}") from None


def _asks_for_semantic(config: JobConfig, manifest: Manifest, storage: Storage) -> bool:
    """True when the job default or any manifest row sets ``semantic_type`` (reads that column only)."""
    import pyarrow.compute as pc

    if config.defaults.get("semantic_type"):
        return True
    for file in manifest.files:
        if "semantic_type" not in file.columns:
            continue
        fs, path = open_filesystem(file.uri, storage.options(file.uri))
        with fs.open(path, "rb") as handle:
            column = read_parquet(handle, [file.source_column("semantic_type")]).column(0)
        if pc.any(pc.equal(column.cast("bool"), True)).as_py():
            return True
    return False


def warn_if_semantic_unsupported(
    config: JobConfig, manifest: Manifest, checkpoint: CheckpointInfo, storage: Storage
) -> None:
    """Once per job: semantic rows with a checkpoint whose tokenizer has no ``[semantic]`` token."""
    if not checkpoint.supports_semantic and _asks_for_semantic(config, manifest, storage):
        log.warning(
            "Rows ask for semantic_type=true but model %s has no [semantic] token: the prefix is read "
            "as plain text. Semantic-level segmentation needs a -multitask checkpoint "
            "(e.g. YxZhang/evf-sam2-multitask).",
            display_url(config.model),
        )


@dataclass(frozen=True)
class ResumePlan:
    """What a run leaves alone: ``skipped`` manifest rows, which read tasks drop by ``index``;
    ``committed_rows``, one bool per manifest row, orders the read tasks (``task_ranges``).
    ``index`` and ``committed_rows`` are None when no row is left alone or none is left to do."""

    skipped: int
    index: CommittedIndex | None = None
    committed_rows: np.ndarray | None = None


def _run_pipeline(
    config: JobConfig,
    manifest: Manifest,
    plan: ResumePlan,
    output: JobOutput,
    record: RunRecord,
    to_do: int,
    checkpoint: CheckpointInfo | None,
) -> None:
    """Run the stages (``checkpoint``: None to read it on the cluster), draw progress as rows commit."""
    import ray

    record.reservations["cluster"] = _check_resources(config)
    checkpoint = checkpoint or _describe_checkpoint(config, output.storage)
    record.model = checkpoint.facts()
    facts = ", ".join(f"{name} {value}" for name, value in checkpoint.facts().items() if name != "model_id")
    log.info("Model %s: %s", display_url(config.model), facts)
    warn_if_semantic_unsupported(config, manifest, checkpoint, output.storage)
    committed_ref = ray.put(plan.index) if plan.index is not None else None
    output = JobOutput(output.layout, output.storage, output.model_id, output.run_id, start_counters())
    progress = JobProgress(output.counters, to_do, enabled=config.progress)
    progress.start()  # redrawn on a timer from the counters, whatever the iterator below does
    try:
        with data_context(config):
            dataset = build_dataset(config, manifest, checkpoint, output, committed_ref, plan.committed_rows)
            for _ in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                pass  # the rows are committed by the stages; this only drives the stream
        counts = progress.update()
        record.stale = counts.get("stale", 0)
        record.model_rows = counts.get(MODEL_ROWS, 0)
        record.model_rows_by_node = {
            name.removeprefix(NODE_PREFIX): rows
            for name, rows in counts.items()
            if name.startswith(NODE_PREFIX)
        }
    except Exception as error:
        raise JobError(f"the pipeline failed: {_cause(error)}") from None
    finally:
        progress.close()


def _compact_if_many(layout: OutputLayout, storage: Storage) -> None:
    """Merge this output's per-batch commit files once there are many (``evf.pipelines.compact``)."""
    options = storage.options(layout.metadata)
    parts = [p for p in list_metadata_files(layout, options)[1] if p.rsplit("/", 1)[-1].startswith("part-")]
    if len(parts) > AUTO_COMPACT_FILES:
        done = compact(layout.root, options, parts_only=True)
        log.info("Compacted %d commit file(s) into %d", done.files_read, done.files_written)


def _scan(config: JobConfig, storage: Storage, layout: OutputLayout) -> tuple[Manifest, Committed]:
    """The manifest's files and ids, and what the output has committed (``--overwrite``: cleared)."""
    try:
        manifest = scan_manifest(config.manifest, storage.options(config.manifest), config.columns)
        if config.overwrite:
            log.info("--overwrite: deleting previous metadata/, masks/ and _job.json under the output")
            clear_outputs(layout, storage.options(layout.root))
            return manifest, Committed.empty()
        options = storage.options(layout.metadata)
        return manifest, call_with_retry(storage.retry, load_committed, layout, options)
    except (ManifestError, OSError) as error:
        raise JobError(str(error)) from None


def _plan_resume(committed: Committed, manifest: Manifest, retry_errors: str) -> ResumePlan:
    """Which manifest rows this run leaves alone (committed, and not errors to retry)."""
    settled = committed.settled(retry_errors)
    committed_rows = settled.contains(manifest.ids).to_numpy()
    skipped = int(committed_rows.sum())
    if not settled.table.num_rows or skipped == manifest.num_rows:
        return ResumePlan(skipped)
    return ResumePlan(skipped, CommittedIndex.build(settled.table), committed_rows)


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
    storage = config.storage()
    check_output_writable(config.output, storage)  # before Ray, the model or the images listing
    config = with_images_manifest(config, storage)
    layout = OutputLayout(config.output, config.mask_name, config.overlays)
    output = JobOutput(layout, storage, config.model, run_id)
    record = RunRecord(
        run_id,
        started,
        config.manifest,
        config.output,
        config.model,
        config.model == DEMO_MODEL_ID,
        reservations=describe_reservations(config),
        config=config.public_dict(),
    )
    if record.is_demo_model:
        log.warning("%s", DEMO_MODEL_WARNING)
    log.info(
        "Run %s: manifest %s -> output %s", run_id, display_url(config.manifest), display_url(config.output)
    )
    summary, superseding = _run_and_account(config, storage, output, record)
    if summary.missing:
        raise JobError(f"{summary.missing} manifest row(s) have no metadata row after the run")
    _compact_if_many(layout, storage)
    if superseding:  # rows committed again: each id once in the files, for readers that do not dedupe
        merged = drop_superseded(layout.root, storage.options(layout.metadata))
        if merged.duplicates_dropped:
            log.info("Dropped %d superseded metadata row(s) (ids committed again)", merged.duplicates_dropped)
    if record.stale:
        log.warning(
            "%d committed row(s) were computed from different inputs (manifest row or model changed) and "
            "were kept; use --overwrite or a new output to recompute them",
            record.stale,
        )
    return summary


def _run_and_account(
    config: JobConfig, storage: Storage, output: JobOutput, record: RunRecord
) -> tuple[JobSummary, bool]:
    """Scan, run what is left to do, account for every manifest row. Its own function so that the
    manifest's ids and the commit record are freed before the compaction reads the record again.
    Also says whether metadata/ may now hold an id twice (a committed row redone, or duplicates
    left by a crash)."""
    layout = output.layout
    manifest, committed = _scan(config, storage, layout)
    record.input_rows = manifest.num_rows
    plan = _plan_resume(committed, manifest, config.retry_errors)
    record.skipped = plan.skipped
    to_do = manifest.num_rows - record.skipped
    # Keys matter only to the index: the rest stays as the accounting's fallback, the keys (the
    # widest column at millions of rows) are freed before the pipeline runs.
    committed = Committed(committed.table.drop_columns(["key"]), committed.duplicate_rows)
    release_arrow_memory()  # the manifest scan's and the resume plan's working memory
    if committed.duplicate_rows:
        log.info(
            "metadata/ holds %d older row(s) superseded by newer ones (retried rows, or rows a crashed run "
            "committed twice); readers see the newest; `evf compact` removes them",
            committed.duplicate_rows,
        )
    log.info(
        "Manifest: %d row(s) in %d file(s); %d already committed, %d to do",
        manifest.num_rows,
        len(manifest.files),
        record.skipped,
        to_do,
    )
    if to_do and none_valid(config, manifest, output, plan.index, plan.committed_rows):
        log.info("None of the %d row(s) to do is valid (error rows written): no Ray, no model", to_do)
        to_do = 0
    checkpoint = None if config.ray.address or not to_do else _describe_checkpoint(config, storage)
    with _ray_session(config) if to_do else contextlib.nullcontext():  # nothing to do: no Ray
        try:
            if to_do:
                _run_pipeline(config, manifest, plan, output, record, to_do, checkpoint)
        except (ConfigError, JobError) as error:
            record.failure = str(error)
            raise
        except BaseException as error:
            record.failure = f"the job was interrupted or crashed: {_cause(error)}"
            raise
        finally:
            summary = summarize_run(record, manifest.ids, committed, layout, storage)
    redone = committed.table.num_rows > plan.skipped  # committed rows this run computed again
    return summary, bool(redone or committed.duplicate_rows)
