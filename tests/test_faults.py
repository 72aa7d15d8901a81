"""Faults a scheduled job meets, end to end through ``evf run``: storage outages in front of the S3
server (a fault-injecting proxy, ``tests/faultproxy.py``), a driver killed and re-run at once, a
corrupt or unsafe checkpoint, bad bytes in the manifest, and the exit codes a scheduler acts on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from faultproxy import FaultProxy

from evf.pipelines.metadata import read_metadata
from evf.synthetic import write_dataset

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "fixtures" / "evf-sam2-tiny" / "checkpoint"
SMALL_BATCHES = ["--set", "cpu.batch_size=2", "--set", "inference.batch_size=1", "--no-progress"]


def _evf(argv: list[str], env: dict[str, str], cwd: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "evf.cli", *argv], cwd=cwd, env=env, **kwargs)


def _evf_done(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "evf.cli", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _s3_dataset(bucket: str, options: dict[str, Any], tmp_path: Path, scenes: int) -> tuple[str, list[str]]:
    data = tmp_path / "data"
    write_dataset(21, scenes, str(data), expressions_per_scene=2)
    fs, _ = fsspec.core.url_to_fs(f"s3://{bucket}", **options)
    fs.put(str(data), f"{bucket}/data", recursive=True)
    return f"s3://{bucket}/data/manifest.parquet", pq.read_table(data / "manifest.parquet")["id"].to_pylist()


def _wait_for_a_commit(fs: Any, metadata: str, run: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 300
    while not (fs.exists(metadata) and fs.ls(metadata, refresh=True)):
        assert run.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no commit within 5 minutes"
        time.sleep(0.2)


def _exactly_once(output: str, options: dict[str, Any], ids: list[str]) -> list[dict[str, Any]]:
    """Every manifest row once through ``read_metadata``; and once for a raw Parquet reader too."""
    rows = read_metadata(output, options).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(ids)
    fs, path = fsspec.core.url_to_fs(f"{output}/metadata", **options)
    fs.invalidate_cache()  # this test process listed metadata/ while the job wrote it
    raw = ds.dataset(path, filesystem=fs, format="parquet").to_table(columns=["id"])["id"].to_pylist()
    assert set(raw) == set(ids)
    return rows


@pytest.fixture
def proxied(s3_server, s3_bucket, tmp_path: Path):
    """A fault proxy in front of the moto server; the job's environment points at the proxy."""
    bucket, options = s3_bucket
    with FaultProxy(s3_server.endpoint_url, lifetime_s=900) as proxy:
        env = {**os.environ, **s3_server.env, "AWS_ENDPOINT_URL": proxy.url, "PYTHONPATH": str(REPO)}
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        yield proxy, env, bucket, options


def test_an_outage_mid_job_is_ridden_out_by_the_retries(proxied, tmp_path: Path) -> None:
    proxy, env, bucket, options = proxied
    manifest, ids = _s3_dataset(bucket, options, tmp_path, scenes=10)
    output = f"s3://{bucket}/out"
    log = tmp_path / "run.log"
    argv = ["run", "--manifest", manifest, "--output", output, "--model", str(TINY), *SMALL_BATCHES]
    with open(log, "wb") as sink:
        run = _evf(argv, env, tmp_path, stdout=sink, stderr=subprocess.STDOUT)
        fs, _ = fsspec.core.url_to_fs(output, **options)
        _wait_for_a_commit(fs, f"{bucket}/out/metadata", run, log)
        proxy.set_mode("reset", for_s=12)  # for 12 s every connection to the endpoint is reset
        code = run.wait(timeout=600)
    text = log.read_text()
    assert code == 0, text[-3000:]
    rows = _exactly_once(output, options, ids)
    assert all(r["status"] in ("ok", "empty") for r in rows), [r["error"] for r in rows if r["error"]]
    assert proxy.counts["reset"] > 0, "the outage met the job's requests"
    # Ray's own noise stays behind -v: the C++ core worker's actor-argument line, token auth.
    assert "object store and max_restarts" not in text and "token" not in text.lower(), text[-3000:]
    assert "logging.cc" not in text, text[-3000:]  # nor lines about Ray's log level


def test_a_longer_outage_leaves_retryable_rows_that_the_next_run_completes(proxied, tmp_path: Path) -> None:
    proxy, env, bucket, options = proxied
    manifest, ids = _s3_dataset(bucket, options, tmp_path, scenes=10)
    output = f"s3://{bucket}/out"
    log = tmp_path / "run.log"
    # Rows give up after ~1 s of retries; commits hold on for ~40 s, longer than the outage.
    retries = [
        "--set",
        "retries.attempts=2",
        "--set",
        "retries.first_wait_s=0.2",
        "--set",
        "retries.max_wait_s=1",
    ]
    retries += ["--set", "retries.jitter_s=0.1", "--set", "retries.request_attempts=1"]
    retries += ["--set", "retries.commit_attempts=45"]
    argv = ["run", "--manifest", manifest, "--output", output, "--model", str(TINY), *SMALL_BATCHES, *retries]
    with open(log, "wb") as sink:
        run = _evf(argv, env, tmp_path, stdout=sink, stderr=subprocess.STDOUT)
        fs, _ = fsspec.core.url_to_fs(output, **options)
        _wait_for_a_commit(fs, f"{bucket}/out/metadata", run, log)
        proxy.set_mode("reset", for_s=15)
        code = run.wait(timeout=600)
    text = log.read_text()
    assert proxy.counts["reset"] > 0, "the outage met the job's requests"
    rows = _exactly_once(output, options, ids)
    retryable = [r for r in rows if r["status"] == "error" and r["retryable"]]
    if retryable:  # the outage met rows: the job says so with the distinct exit status
        assert code == 3, text[-3000:]
        assert "retryable" in text and "re-run the same command" in text
    else:  # it met only commits, which held on
        assert code == 0, text[-3000:]
    assert all(r["status"] != "error" or r["retryable"] for r in rows)

    again = _evf_done(argv, env, tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    rows = _exactly_once(output, options, ids)
    assert all(r["status"] in ("ok", "empty") for r in rows)


def test_killing_the_driver_and_rerunning_at_once_commits_every_row_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_dataset(22, 12, str(data), expressions_per_scene=3)
    ids = pq.read_table(data / "manifest.parquet")["id"].to_pylist()
    output = tmp_path / "out"
    argv = [
        "run",
        "--manifest",
        str(data / "manifest.parquet"),
        "--output",
        str(output),
        "--model",
        str(TINY),
    ]
    argv += SMALL_BATCHES
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(REPO)}
    log = tmp_path / "first.log"
    with open(log, "wb") as sink:
        first = _evf(argv, env, tmp_path, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while not (output / "metadata").exists() or not any((output / "metadata").iterdir()):
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)  # its Ray workers live on for a moment and may still commit
    again = _evf_done(argv, env, tmp_path)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(first.pid, signal.SIGKILL)  # what is left of the first run's Ray
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    rows = read_metadata(str(output)).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(ids), "every row exactly once"
    compacted = subprocess.run(
        [sys.executable, "-m", "evf.cli", "compact", str(output)], env=env, capture_output=True, text=True
    )
    assert compacted.returncode == 0, compacted.stderr
    raw = ds.dataset(str(output / "metadata"), format="parquet").to_table(columns=["id"])["id"].to_pylist()
    assert sorted(raw) == sorted(ids), "after compaction a raw Parquet reader sees every row once too"


def test_a_truncated_checkpoint_fails_in_seconds_before_ray_naming_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in TINY.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    data = tmp_path / "data"
    write_dataset(23, 1, str(data), expressions_per_scene=1)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "evf.cli", "run", "--manifest", str(data / "manifest.parquet"),
         "--output", str(tmp_path / "out"), "--model", str(broken), "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert done.returncode == 2, done.stderr[-3000:]
    assert "model.safetensors is truncated" in done.stderr and "Traceback" not in done.stderr
    assert "ray" not in done.stderr.lower().replace("array", ""), "Ray never started"
    assert seconds < 30, seconds  # process start and imports included; the check itself is milliseconds


def test_bad_bytes_in_one_manifest_file_fail_their_rows_only(tmp_path: Path) -> None:
    from evf.pipelines.config import load_config
    from evf.pipelines.job import run_job

    data = tmp_path / "data"
    write_dataset(24, 2, str(data), expressions_per_scene=2)
    table = pq.read_table(data / "manifest.parquet")
    (data / "manifest.parquet").rename(data / "good.parquet")
    rows = table.slice(0, 2).to_pylist()
    bad_prompt = pa.array([rows[0]["prompt"].encode(), b"broken \xff\xfe bytes"], pa.binary()).view(
        pa.string()
    )
    pq.write_table(
        pa.table({"id": ["u1", "u2"], "image_url": [r["image_url"] for r in rows], "prompt": bad_prompt}),
        data / "utf8.parquet",
    )
    pq.write_table(  # blur_mask as text in this one file
        pa.table({"id": ["t1"], "image_url": [rows[0]["image_url"]], "prompt": ["x"], "blur_mask": ["3"]}),
        data / "types.parquet",
    )
    flags = {"manifest": str(data), "output": str(tmp_path / "out"), "model": str(TINY), "progress": False}
    summary = run_job(load_config(None, None, flags))
    assert summary.missing == 0 and summary.input_rows == table.num_rows + 3
    metadata = {r["id"]: r for r in read_metadata(str(tmp_path / "out")).to_pylist()}
    assert metadata["u1"]["status"] in ("ok", "empty")
    assert metadata["u2"]["status"] == "error" and "utf8.parquet" in metadata["u2"]["error"]
    assert "'prompt' is not valid UTF-8" in metadata["u2"]["error"]
    assert metadata["t1"]["status"] == "error" and "blur_mask='3'" in metadata["t1"]["error"]
    good = [r for r in metadata.values() if r["manifest_file"] == "good.parquet"]
    assert len(good) == table.num_rows and all(r["status"] in ("ok", "empty") for r in good)


def test_failing_paths_exit_with_the_documented_status_every_time(tmp_path: Path) -> None:
    """Twenty runs: the documented status every time, never an abort at exit (the manifest's
    Parquet footer and id column are read before the job fails, as in the abort Arrow can cause)."""
    duplicated = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"id": ["a", "a"], "image_url": ["x.png"] * 2, "prompt": ["p"] * 2}), duplicated)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(REPO)}
    paths = [
        (["run", "--manifest", str(duplicated), "--output", str(tmp_path / "o"), "--no-progress"], 1),
        (["run", "--manifest", str(duplicated), "--set", "inference.actors=0"], 2),
    ]
    for argv, status in paths * 10:
        done = _evf_done(argv, env, tmp_path)
        assert done.returncode == status, (argv, done.returncode, done.stderr[-2000:])
