"""Million-row jobs: what a re-run costs, the driver's memory, and reading the commit record on S3.

Targets (issue 13), on the project's 2-core machine, with committed outputs fabricated in the real
layout (one metadata file per 32 rows, as the job writes them, with the keys the job computes):

(a) a run with N committed rows and 100 new ones, over a fresh job of those 100 rows alone, for
    N = 200,000 and 1,000,000: <= 2.0 (the two jobs alternate; one Ray instance serves them all);
(b) the driver's peak RSS for a 1,000,000-row manifest with every row committed, minus its peak for
    a 1,000-row one (each in its own process): <= 300 MB;
(c) the time to read the commit record of 1,000,000 rows from an S3 server on loopback (moto),
    before and after ``evf compact``.

    .venv/bin/python benchmarks/bench_scale.py [--sizes 200000 1000000] [--skip-s3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from common import FIXTURE_CHECKPOINT  # noqa: E402

FIXTURE = FIXTURE_CHECKPOINT
NEW_ROWS = 100
ROWS_PER_COMMIT = 32
IMAGES = 4


def write_images(folder: Path) -> None:
    from evf.io import encode_png

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        (folder / f"{i}.png").write_bytes(encode_png(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)))


def write_manifest(path: Path, rows: int) -> None:
    """Rows ``r0000000``.. naming one of a few images each (relative paths, as a dataset ships)."""
    index = np.arange(rows)
    table = pa.table(
        {
            "id": pa.array([f"r{i:07d}" for i in range(rows)]),
            "image_url": pa.array([f"images/{i}.png" for i in index % IMAGES]),
            "prompt": pa.array(["the red circle"] * rows),
        }
    )
    pq.write_table(table, path, row_group_size=65536)


def job_keys(manifest: Path, model: str) -> list[str]:
    """The key the job gives each image's rows (a key depends on the image, prompt, options, model)."""
    from evf.manifest import scan_manifest
    from evf.pipelines.config import load_config
    from evf.pipelines.read import parse_row

    config = load_config(None, None, {"manifest": str(manifest), "output": "-", "model": model})
    file = scan_manifest(str(manifest)).files[0]
    rows = pq.read_table(manifest).slice(0, IMAGES).to_pylist()
    return [
        parse_row({**row, "_row": i}, file=file, defaults=config.defaults, model_id=model).key
        for i, row in enumerate(rows)
    ]


def fabricate_commits(output: Path, manifest: Path, committed: int, model: str) -> None:
    """Metadata for the first ``committed`` manifest rows, 32 rows a file, in ``METADATA_SCHEMA``."""
    from evf.pipelines.commit import METADATA_SCHEMA, OutputLayout
    from evf.pipelines.metadata import conform_metadata

    keys = job_keys(manifest, model)
    index = np.arange(committed)
    table = pa.table(
        {
            "id": pa.array([f"r{i:07d}" for i in range(committed)]),
            "key": pa.array([keys[i % IMAGES] for i in range(committed)]),
            "image_url": pa.array([str(manifest.parent / f"images/{i}.png") for i in index % IMAGES]),
            "prompt": pa.array(["the red circle"] * committed),
            "status": pa.array(["ok"] * committed),
            "width": pa.array(np.full(committed, 128, np.int32)),
            "height": pa.array(np.full(committed, 96, np.int32)),
            "area": pa.array(np.full(committed, 1000, np.int64)),
            "score": pa.array(np.full(committed, 0.9, np.float32)),
            "model_id": pa.array([model] * committed),
            "run_id": pa.array(["20260101T000000Z-fabricated"] * committed),
            "manifest_file": pa.array(["manifest.parquet"] * committed),
            "manifest_row": pa.array(index.astype(np.int64)),
        }
    )
    table = conform_metadata(table, METADATA_SCHEMA)
    folder = Path(OutputLayout(str(output)).metadata)
    folder.mkdir(parents=True, exist_ok=True)
    for number, start in enumerate(range(0, committed, ROWS_PER_COMMIT)):
        pq.write_table(table.slice(start, ROWS_PER_COMMIT), folder / f"part-fab{number:07d}.parquet")


def run(manifest: Path, output: Path, model: str) -> float:
    """Seconds of one job (the Ray instance is already up, as a cluster's would be)."""
    from evf.pipelines.config import load_config
    from evf.pipelines.job import run_job

    flags = {"manifest": str(manifest), "output": str(output), "model": model, "progress": False}
    start = time.perf_counter()
    summary = run_job(load_config(None, None, flags))
    seconds = time.perf_counter() - start
    assert summary.missing == 0 and summary.this_run["ok"] + summary.this_run["empty"] == NEW_ROWS, summary
    return seconds


def forget_new_rows(output: Path) -> None:
    """Remove what a run added (its commit files, masks, records) so the next run has 100 rows to do;
    the fabricated rows are in the ``compact-*`` files by then."""
    for path in (output / "metadata").iterdir():
        if not path.name.startswith("compact-"):
            path.unlink()
    for name in ("masks", "runs", "_job.json"):
        target = output / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def resume_ratio(work: Path, committed: int, model: str, repeats: int) -> tuple[float, float, float, float]:
    """(first resumed s, fresh s, resumed s, ratio). The first re-run meets the 32-row commit files
    and compacts them at its end; the others (medians, alternated with fresh jobs) are the steady
    state of a scheduled job."""
    from evf.pipelines.compact import compact

    data = work / f"data-{committed}"
    write_images(data / "images")
    full, fresh = data / "manifest.parquet", data / "new" / "manifest.parquet"
    write_manifest(full, committed + NEW_ROWS)
    fresh.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(data / "images", fresh.parent / "images", dirs_exist_ok=True)
    pq.write_table(pq.read_table(full).slice(committed, NEW_ROWS), fresh)
    print(f"... fabricating {committed:,} committed rows", flush=True)
    output = work / f"out-{committed}"
    fabricate_commits(output, full, committed, model)
    first_resume = run(full, output, model)
    print(f"    first re-run over {committed:,} rows in 32-row files (compacts them): {first_resume:.1f} s")
    shutil.rmtree(output)  # again, compacted as that run left it, but without its 100 new rows
    fabricate_commits(output, full, committed, model)
    compact(str(output))
    times: tuple[list[float], list[float]] = ([], [])
    for attempt in range(repeats):
        fresh_out = work / f"fresh-{committed}-{attempt}"
        times[0].append(run(fresh, fresh_out, model))
        shutil.rmtree(fresh_out)
        times[1].append(run(full, output, model))
        forget_new_rows(output)
        print(f"    fresh {times[0][-1]:.1f} s, resumed {times[1][-1]:.1f} s", flush=True)
    fresh_s, resumed_s = float(np.median(times[0])), float(np.median(times[1]))
    return first_resume, fresh_s, resumed_s, resumed_s / fresh_s


def peak_rss_mb(manifest: Path, output: Path, model: str) -> float:
    """Peak RSS (MB) of a driver process that runs the job over a fully committed output.

    Read as the process's own ``VmHWM``: ``ru_maxrss`` would not do, as Linux carries the parent's
    high-water mark into a child through fork and exec (this script's own 1M-row fabrication would
    be measured)."""
    code = (
        "from evf.pipelines.config import load_config; from evf.pipelines.job import run_job;"
        f"s = run_job(load_config(None, None, {{'manifest': {str(manifest)!r}, 'output': {str(output)!r}, "
        f"'model': {model!r}, 'progress': False}}));"
        "assert s.missing == 0 and s.processed == 0;"
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def memory_delta(work: Path, model: str) -> tuple[float, float]:
    sizes = {}
    for rows in (1_000, 1_000_000):
        data = work / f"mem-{rows}"
        data.mkdir(parents=True, exist_ok=True)
        write_manifest(data / "manifest.parquet", rows)
        fabricate_commits(data / "out", data / "manifest.parquet", rows, model)
        sizes[rows] = peak_rss_mb(data / "manifest.parquet", data / "out", model)
        print(f"    {rows:>9,} rows: driver peak RSS {sizes[rows]:.0f} MB", flush=True)
    return sizes[1_000], sizes[1_000_000]


def s3_read_times(work: Path, model: str, rows: int) -> tuple[float, float, int, int]:
    """Seconds to read the commit record of ``rows`` rows on a moto S3 server, before and after
    compaction, and the file counts."""
    import s3fs

    from evf.pipelines.commit import OutputLayout
    from evf.pipelines.compact import compact
    from evf.pipelines.metadata import load_committed

    data = work / "s3"
    data.mkdir(parents=True, exist_ok=True)
    write_manifest(data / "manifest.parquet", rows)
    fabricate_commits(data / "out", data / "manifest.parquet", rows, model)
    port = 50000 + os.getpid() % 1000
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
        }
        fs = s3fs.S3FileSystem(**options)
        for _ in range(100):
            try:
                fs.mkdir("bench")
                break
            except Exception:
                time.sleep(0.2)
        print(
            f"... uploading {rows:,} committed rows ({rows // ROWS_PER_COMMIT:,} files) to moto", flush=True
        )
        fs.put(str(data / "out" / "metadata"), "bench/out/metadata", recursive=True)
        layout = OutputLayout("s3://bench/out")
        start = time.perf_counter()
        before = load_committed(layout, options)
        before_s = time.perf_counter() - start
        assert before.table.num_rows == rows
        done = compact("s3://bench/out", options)
        start = time.perf_counter()
        after = load_committed(layout, options)
        after_s = time.perf_counter() - start
        assert after.table.num_rows == rows
        return before_s, after_s, done.files_read, done.files_written
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default=str(FIXTURE))
    parser.add_argument("--s3-rows", type=int, default=1_000_000)
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    args = parser.parse_args()
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    results: dict[str, object] = {}
    try:
        if "a" in args.parts:
            ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
        for size in args.sizes if "a" in args.parts else []:
            first, fresh, resumed, ratio = resume_ratio(work, size, args.model, args.repeats)
            results[f"resume_{size}"] = {
                "first_s": first,
                "fresh_s": fresh,
                "resumed_s": resumed,
                "ratio": ratio,
            }
            print(
                f"(a) N={size:,}: resumed {resumed:.1f} s / fresh {fresh:.1f} s = {ratio:.2f} (target <= 2.0)"
            )
        ray.shutdown()
        if "b" in args.parts:
            small, large = memory_delta(work, args.model)
            results["driver_rss_mb"] = {"1000": small, "1000000": large, "delta": large - small}
            print(f"(b) driver peak RSS, 1M rows - 1k rows: {large - small:.0f} MB (target <= 300)")
        if "c" in args.parts and not args.skip_s3:
            before, after, files_in, files_out = s3_read_times(work, args.model, args.s3_rows)
            results["s3_commit_record_s"] = {"before": before, "after": after}
            print(
                f"(c) reading the commit record of {args.s3_rows:,} rows on moto S3: {before:.1f} s "
                f"({files_in:,} files) -> {after:.1f} s after compaction ({files_out} file(s))"
            )
        print(json.dumps(results))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
