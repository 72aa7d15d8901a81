"""The Ray Data job vs a bare predictor loop on the same rows and model; peak memory vs manifest size.

Targets (issue 4), on the project's 2-core machine:
- throughput: pipeline rows/s over bare-loop rows/s >= 0.8 (same rows, same model, same batching);
- memory: peak memory of the job for 2,000 rows within 15% of the peak for 200 rows.

The bare loop is what one would write without Ray, doing the same work per row in one process:
read + decode each image once per batch, ``InferenceEngine.infer`` per batch of images, ``finish``, PNG
encode, write the mask, and one metadata Parquet at the end. Its torch uses all cores.

The job's time is ``run_job``'s wall time (manifest scan, model probe, actor start and model load,
every row, the final accounting); the Ray cluster is started before the clock starts, as a cluster
normally already runs. Peak memory is the peak of the summed PSS (proportional set size, so shared
pages such as Ray's object store count once) of this process and every process under it (Ray's
raylet, GCS, workers, actors), sampled every 0.2 s; each job gets a fresh Ray instance.

Timed runs and memory runs are separate: reading PSS walks every page of every process, which took
~40% of a core from the 20 processes of a job (and almost nothing from the bare loop's one), so a
sampled run is not a fair clock. The large job therefore runs twice: once timed, once sampled.

    .venv/bin/python benchmarks/bench_pipeline.py [--model PATH] [--rows 200 2000]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from evf.cli import add_overrides_argument  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "evf-sam2-tiny" / "checkpoint"
THROUGHPUT_TARGET = 0.8
MEMORY_TARGET = 0.15


# --------------------------------------------------------------------------------------------------
# Memory: summed PSS of a process tree (Linux /proc)
# --------------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(c) for c in handle.read().split()]
    except OSError:
        pass
    return found


def _tree(root: int) -> list[int]:
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(_children(pid))
    return pids


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakMemory:
    """Samples the summed PSS of this process tree in a thread; ``peak_mb`` after ``stop``."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        total = sum(_pss_kib(pid) for pid in _tree(os.getpid()))
        self.peak_kib = max(self.peak_kib, total)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def peak_mb(self) -> float:
        return self.peak_kib / 1024


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def make_manifests(folder: Path, sizes: list[int], per_image: int) -> dict[int, str]:
    """One synthetic dataset; the manifest for N rows is its first N rows."""
    from evf.synthetic import write_dataset

    scenes = -(-max(sizes) // per_image) + 2
    full = pq.read_table(write_dataset(3, scenes, str(folder / "data"), expressions_per_scene=per_image))
    manifests = {}
    for size in sizes:
        assert full.num_rows >= size, (full.num_rows, size)
        path = folder / f"manifest-{size}.parquet"
        pq.write_table(full.slice(0, size), path)
        manifests[size] = str(path)
    return manifests


# --------------------------------------------------------------------------------------------------
# The bare loop
# --------------------------------------------------------------------------------------------------


def bare_loop(manifest: str, model: str, output: Path, rows_per_batch: int, images_per_call: int) -> float:
    """Same work as the job, sequential in this process; returns seconds (model load included)."""
    import torch

    from evf.engine import InferenceEngine
    from evf.io import encode_png, load_image, write_bytes
    from evf.request import parse_request
    from evf.segment import finish
    from evf.settings import ModelSettings

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    engine = InferenceEngine.load(ModelSettings(model=model, device="cpu"))  # dtype auto, as the job
    rows = pq.read_table(manifest).to_pylist()
    metadata = []
    for begin in range(0, len(rows), rows_per_batch):
        batch = rows[begin : begin + rows_per_batch]
        groups: dict[str, list[dict]] = {}
        for row in batch:
            groups.setdefault(row["image_url"], []).append(row)
        urls = list(groups)
        for chunk in range(0, len(urls), images_per_call):
            chunk_urls = urls[chunk : chunk + images_per_call]
            images = [load_image(url) for url in chunk_urls]
            prepared = [engine.prepare(image) for image in images]
            items, owners = [], []
            for index, url in enumerate(chunk_urls):
                for row in groups[url]:
                    request = parse_request(
                        {k: row[k] for k in ("prompt", "negative_prompt", "semantic_type")}
                    )
                    items.append((index, request))
                    owners.append((row, images[index]))
            for (row, image), (_, request), raw in zip(
                owners, items, engine.infer(prepared, items), strict=True
            ):
                result = finish(request, raw, image)
                path = output / "masks" / f"{row['id']}.png"
                write_bytes(str(path), encode_png(result.image))
                metadata.append({"id": row["id"], "area": result.area, "score": result.score})
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(metadata), buffer)
    write_bytes(str(output / "metadata.parquet"), buffer.getvalue())
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


def run_pipeline(
    manifest: str, model: str, output: Path, overrides: list[str], sample: bool = True
) -> tuple[float, int, float]:
    """(seconds, rows, peak MB) of one job on a fresh local Ray; peak 0 when not ``sample``d."""
    import ray

    from evf.pipelines.config import load_config
    from evf.pipelines.job import run_job

    flags = {"manifest": manifest, "output": str(output), "model": model, "progress": False}
    config = load_config(None, overrides, flags)
    with PeakMemory() if sample else contextlib.nullcontext() as memory:
        ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False, logging_level="WARNING")
        try:
            start = time.perf_counter()
            summary = run_job(config)
            seconds = time.perf_counter() - start
        finally:
            ray.shutdown()
    assert summary.missing == 0 and summary.error == 0, summary
    return seconds, summary.processed, memory.peak_mb if memory else 0.0


def _timed(label: str, fn: Callable[[], tuple]) -> tuple:
    print(f"... {label}", flush=True)
    return fn()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(FIXTURE), help="checkpoint (default: the tiny test fixture)")
    parser.add_argument("--rows", type=int, nargs=2, default=[200, 2000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--prompts-per-image", type=int, default=4)
    add_overrides_argument(parser, "job config overrides")
    parser.add_argument("--workdir", help="keep data and outputs here (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from evf.pipelines.config import load_config

    overrides = args.overrides
    config = load_config(None, overrides, {"manifest": "-", "output": "-"})
    small, large = sorted(args.rows)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        manifests = _timed(
            "writing the synthetic dataset",
            lambda: (make_manifests(work, [small, large], args.prompts_per_image),),
        )[0]
        (work / "bare" / "masks").mkdir(parents=True, exist_ok=True)
        bare_s = _timed(
            f"bare loop, {large} rows (timed)",
            lambda: (
                bare_loop(
                    manifests[large],
                    args.model,
                    work / "bare",
                    config.cpu.batch_size,
                    config.inference.batch_size,
                ),
            ),
        )[0]
        timed = _timed(
            f"pipeline, {large} rows (timed)",
            lambda: run_pipeline(manifests[large], args.model, work / "job-timed", overrides, sample=False),
        )
        sampled = {
            size: _timed(
                f"pipeline, {size} rows (memory sampled)",
                lambda size=size: run_pipeline(manifests[size], args.model, work / f"job-{size}", overrides),
            )
            for size in (small, large)
        }
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    cores = os.cpu_count()
    print()
    print(f"model: {args.model}; {cores} cores; {args.prompts_per_image} prompts per image")
    print(
        f"job config: {config.inference.actors} actor(s) x {config.inference.num_cpus:g} CPU, "
        f"torch threads {config.torch_threads(cores)}, {config.inference.batch_size} images per model call, "
        f"{config.cpu.batch_size} rows per decode batch, CPU tasks {config.cpu.num_cpus:g} CPU each"
    )
    print(f"{'run':<32} {'rows':>6} {'seconds':>9} {'rows/s':>8} {'peak MB':>9}")
    print(f"{'bare predictor loop (timed)':<32} {large:>6} {bare_s:>9.1f} {large / bare_s:>8.2f} {'-':>9}")
    seconds, rows, _ = timed
    print(f"{'pipeline (timed)':<32} {rows:>6} {seconds:>9.1f} {rows / seconds:>8.2f} {'-':>9}")
    for seconds, rows, peak in sampled.values():
        print(
            f"{'pipeline (memory sampled)':<32} {rows:>6} {seconds:>9.1f} {rows / seconds:>8.2f} {peak:>9.0f}"
        )
    ratio = (timed[1] / timed[0]) / (large / bare_s)
    growth = sampled[large][2] / sampled[small][2] - 1
    print(
        f"throughput pipeline/bare ({large} rows): {ratio:.2f} (target >= {THROUGHPUT_TARGET}) -> "
        f"{'PASS' if ratio >= THROUGHPUT_TARGET else 'FAIL'}"
    )
    print(
        f"peak memory {large} vs {small} rows: {growth:+.1%} (target within {MEMORY_TARGET:.0%}) -> "
        f"{'PASS' if abs(growth) <= MEMORY_TARGET else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
