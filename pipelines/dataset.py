"""The job's Ray Data pipeline: the four stages wired with their batch sizes and reservations."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from evf.manifest import Manifest
from evf.manifest_file import ManifestFile
from evf.pipelines.commit import JobOutput
from evf.pipelines.config import JobConfig
from evf.pipelines.decode import DecodeSettings, decode_batch
from evf.pipelines.finish import FinishSettings, finish_batch
from evf.pipelines.infer import InferenceSettings, InferenceStage
from evf.pipelines.read import ReadSettings, grounding_id, make_datasource, read_task, task_ranges
from evf.registry import CheckpointInfo
from evf.settings import GroundingSettings

__all__ = ["build_dataset", "data_context", "describe_reservations", "none_valid"]


def describe_reservations(config: JobConfig) -> dict[str, Any]:
    """Logical CPUs/GPUs each stage reserves (per task or actor) and the actor pool's total."""
    inference = config.inference
    return {
        "read_decode_finish": {
            "num_cpus": config.cpu.num_cpus,
            "kind": "tasks",
            "batch_rows": config.cpu.batch_size,
        },
        "inference": {
            "num_cpus": inference.num_cpus,
            "num_gpus": inference.num_gpus,
            "kind": f"{inference.min_actors}-{inference.max_actors} actor(s)"
            if inference.min_actors != inference.max_actors
            else f"{inference.min_actors} actor(s)",
            "batch_images": inference.batch_size,
            "total_cpus": inference.min_actors * inference.num_cpus,
            "total_gpus": inference.min_actors * inference.num_gpus,
        },
    }


@contextmanager
def data_context(config: JobConfig) -> Iterator[None]:
    """Ray Data settings for this job, restored afterwards: the buffer cap between stages and
    Ray's own per-operator progress bars (off unless ``ray.progress_bars``: the job draws its own line)."""
    import ray

    context = ray.data.DataContext.get_current()
    if not config.ray.progress_bars:  # it would say so on every run
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    if not logging.getLogger("evf.run").isEnabledFor(logging.DEBUG):  # Ray Data's INFO notes: with -v
        for handler in logging.getLogger("ray.data").handlers:
            if not isinstance(handler, logging.FileHandler):  # its log file keeps everything
                handler.setLevel(logging.WARNING)
    saved = (
        context.enable_progress_bars,
        context.print_on_execution_start,
        context.execution_options.resource_limits,
    )
    try:
        context.enable_progress_bars = config.ray.progress_bars
        context.print_on_execution_start = config.ray.progress_bars
        context.execution_options.resource_limits = context.execution_options.resource_limits.copy(
            object_store_memory=config.cpu.max_buffered_mb * 2**20
        )
        yield
    finally:
        (
            context.enable_progress_bars,
            context.print_on_execution_start,
            context.execution_options.resource_limits,
        ) = saved


def _inference_settings(
    config: JobConfig, checkpoint: CheckpointInfo, output: JobOutput
) -> InferenceSettings:
    import ray

    node_cpus = ray.cluster_resources().get("CPU") if not config.ray.address else None
    grounding = config.grounding
    return InferenceSettings(
        checkpoint=checkpoint,
        storage=output.storage,
        torch_threads=config.torch_threads(node_cpus),
        grounding=GroundingSettings(
            grounding.model,
            grounding.box_threshold,
            grounding.text_threshold,
            output.storage.options(grounding.model or ""),
        ),
        counters=output.counters,
    )


# Rows per read task at most where the manifest holds its images: a task holds its rows' images
# (a few hundred MB at 1 MB an image) until its blocks are taken.
EMBEDDED_ROWS_PER_READ = 256


def rows_per_read_task(config: JobConfig, manifest: Manifest) -> int:
    """Rows per read task: enough tasks (64) that a small manifest's rows still flow through the
    stages in parallel, at most ``cpu.read_rows`` so that a huge one is read in large steps (and
    ``EMBEDDED_ROWS_PER_READ`` when it holds its images)."""
    most = config.cpu.read_rows
    if any(file.embedded for file in manifest.files):
        most = min(most, EMBEDDED_ROWS_PER_READ)
    return max(config.cpu.batch_size, min(most, manifest.num_rows // 64))


# Manifests this small are validated in the driver before Ray starts (``none_valid``).
PREFLIGHT_ROWS = 10_000


def _read_plan(
    config: JobConfig,
    manifest: Manifest,
    output: JobOutput,
    committed: Any,
    committed_rows: np.ndarray | None,
) -> tuple[ReadSettings, list[tuple[ManifestFile, int, int]]]:
    """The read stage's settings and its tasks' ranges of rows (``read.task_ranges``)."""
    grounding = grounding_id(
        config.grounding.model, config.grounding.box_threshold, config.grounding.text_threshold
    )
    read = ReadSettings(output, dict(config.defaults), grounding, committed)
    return read, task_ranges(manifest.files, rows_per_read_task(config, manifest), committed_rows)


def none_valid(
    config: JobConfig,
    manifest: Manifest,
    output: JobOutput,
    committed: Any,
    committed_rows: np.ndarray | None,
) -> bool:
    """Whether none of the rows left to do is valid, found in the driver for a manifest of at most
    ``PREFLIGHT_ROWS`` rows: their error rows are then committed here and the run needs neither
    Ray nor the model. Stops at the first range of rows holding a valid one (the read task of that
    range writes the same commit file again)."""
    if manifest.num_rows > PREFLIGHT_ROWS:
        return False
    read, ranges = _read_plan(config, manifest, output, committed, committed_rows)
    return not any(read_task(file, start, stop, read).num_rows for file, start, stop in ranges)


def build_dataset(
    config: JobConfig,
    manifest: Manifest,
    checkpoint: CheckpointInfo,
    output: JobOutput,
    committed: Any,
    committed_rows: np.ndarray | None = None,
) -> Any:
    """The lazy dataset of the run; iterating it runs the job. ``committed``: the ``CommittedIndex``'s
    object ref or None; ``committed_rows``: one bool per manifest row (``read.task_ranges``)."""
    import ray

    read, ranges = _read_plan(config, manifest, output, committed, committed_rows)
    # One read task per range of rows (Ray Data would otherwise choose its own split).
    ds = ray.data.read_datasource(
        make_datasource(ranges, config.cpu.batch_size, read),
        num_cpus=config.cpu.num_cpus,
        override_num_blocks=max(1, len(ranges)),
    )
    ds = ds.map_batches(
        decode_batch,
        batch_size=config.cpu.batch_size,
        batch_format="pyarrow",
        num_cpus=config.cpu.num_cpus,
        fn_kwargs={"settings": DecodeSettings(output, checkpoint.preprocessor, config.cpu.io_threads)},
    )
    inference = config.inference
    ds = ds.map_batches(
        InferenceStage,
        batch_size=inference.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(
            min_size=inference.min_actors,
            max_size=inference.max_actors,
            max_tasks_in_flight_per_actor=inference.max_tasks_in_flight,
        ),
        num_cpus=inference.num_cpus,
        num_gpus=inference.num_gpus or None,
        fn_constructor_kwargs={"settings": _inference_settings(config, checkpoint, output)},
    )
    # Several model batches per finish task: fewer, larger commit files (each is one atomic write).
    return ds.map_batches(
        finish_batch,
        batch_size=config.cpu.batch_size,
        batch_format="pyarrow",
        num_cpus=config.cpu.num_cpus,
        fn_kwargs={"settings": FinishSettings(output, config.cpu.io_threads)},
    )
