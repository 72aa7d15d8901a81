"""End-to-end tests of the Ray Data job (``evf run``) with the tiny fixture checkpoint.

One local Ray instance (2 logical CPUs, like the project's machines; ``conftest.ray_session``) serves
every test of the session that needs one; the resume test runs the job in a subprocess with its own
Ray and kills that driver part-way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_text_png, make_truncated_png, rle_to_mask

from evf.config import ConfigError
from evf.io import decode_image, read_bytes
from evf.pipelines.config import DEFAULT_CONFIG, SAMPLE_MANIFEST, SAMPLE_MANIFEST_ID, load_config
from evf.pipelines.job import run_job
from evf.pipelines.metadata import read_metadata
from evf.pipelines.summary import JobSummary, format_summary
from evf.synthetic import write_dataset

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "fixtures" / "evf-sam2-tiny" / "checkpoint"
SAMPLE = REPO / "examples" / "sample" / "manifest.parquet"
# float32: the job's masks are compared with the in-process float32 predictor's
FAST = {
    "progress": False,
    "cpu.batch_size": 16,
    "inference.batch_size": 4,
    "inference.dtype": "float32",
    "model": str(TINY),
}


def job(manifest: str, output: str, **overrides: Any):
    return load_config(DEFAULT_CONFIG, {"manifest": manifest, "output": output, **FAST, **overrides})


# --------------------------------------------------------------------------------------------------
# Checking every output
# --------------------------------------------------------------------------------------------------


def _fs(uri: str, storage_options: dict[str, Any] | None):
    return fsspec.core.url_to_fs(uri, **(storage_options or {}))


def check_outputs(
    output: str,
    manifest_ids: list[str],
    summary: JobSummary,
    storage_options: dict[str, Any] | None = None,
    expected_errors: dict[str, str] | None = None,
) -> pa.Table:
    """Every manifest row has exactly one metadata row; masks exist exactly for ok/empty rows and
    agree with the metadata (size, area, bbox, RLE); _job.json agrees with the summary."""
    metadata = read_metadata(output, storage_options)
    rows = metadata.to_pylist()
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted(manifest_ids), "every manifest row: exactly one metadata row"
    statuses = Counter(r["status"] for r in rows)
    assert set(statuses) <= {"ok", "empty", "error"}
    assert summary.input_rows == len(manifest_ids) == sum(statuses.values())
    assert summary.counts == {s: statuses.get(s, 0) for s in ("ok", "empty", "error")}
    assert summary.missing == 0

    fs, root = _fs(output, storage_options)
    mask_files = {p.rsplit("/", 1)[-1] for p in fs.find(f"{root.rstrip('/')}/masks")}
    expected_masks = set()
    for row in rows:
        if row["status"] == "error":
            assert row["error"], row
            assert row["mask_url"] is None and row["area"] is None
            continue
        assert row["error"] is None
        assert row["mask_url"].endswith(f"/masks/{row['key']}.png")
        expected_masks.add(f"{row['key']}.png")
        data = read_bytes(row["mask_url"], storage_options)
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert image.shape[:2] == (row["height"], row["width"])
        if row["mask_only"]:
            assert image.ndim == 2
            mask = image
        else:
            assert image.ndim == 3 and image.shape[2] == 4
            mask = image[:, :, 3]
            source = decode_image(read_bytes(row["image_url"], storage_options))
            assert np.array_equal(cv2.cvtColor(image, cv2.COLOR_BGRA2RGB), source)
        binary = mask >= 128
        assert int(binary.sum()) == row["area"]
        assert (row["status"] == "empty") == (row["area"] == 0)
        assert np.array_equal(rle_to_mask(row["rle"]).astype(bool), binary)
        if row["area"]:
            ys, xs = np.nonzero(binary)
            assert row["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert 0.0 <= row["score"] <= 1.0
        assert row["run_id"] and row["model_id"] and row["elapsed_ms"] > 0
    assert mask_files == expected_masks, "masks/ holds exactly the ok/empty rows' masks"

    for row_id, fragment in (expected_errors or {}).items():
        row = next(r for r in rows if r["id"] == row_id)
        assert row["status"] == "error", (row_id, row)
        assert fragment.lower() in row["error"].lower(), (row_id, row["error"])

    job_json = json.loads(read_bytes(summary.layout.job_json, storage_options))
    assert job_json["status"] == "succeeded"
    assert job_json["counts"] == {
        "input_rows": len(manifest_ids),
        **summary.counts,
        "retryable": summary.retryable,
        "missing": 0,
    }
    assert job_json["config"]["manifest"] and job_json["run_id"] == summary.run_id
    return metadata


# --------------------------------------------------------------------------------------------------
# Resume after the driver is killed (the job runs in a subprocess that starts its own Ray)
# --------------------------------------------------------------------------------------------------


def _write_distinct_manifest(root: Path, rows: int) -> tuple[str, list[str]]:
    """``rows`` rows, each on its own image (so every row costs one image embedding)."""
    write_dataset(5, rows, str(root), expressions_per_scene=1)
    table = pq.read_table(root / "manifest.parquet")
    ids = table.column("id").to_pylist()
    assert len(ids) == rows
    return str(root / "manifest.parquet"), ids


def _metadata_files(output: Path) -> dict[str, int]:
    folder = output / "metadata"
    if not folder.exists():
        return {}
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.suffix == ".parquet"}


def test_resume_after_killing_the_driver(tmp_path):
    manifest, ids = _write_distinct_manifest(tmp_path / "data", 36)
    output = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "evf.cli",
        "run",
        str(DEFAULT_CONFIG),
        "--manifest",
        manifest,
        "--output",
        str(output),
        "--model",
        str(TINY),
        "--no-progress",
        "--set",
        "cpu.batch_size=2",
        "--set",
        "inference.batch_size=1",
        "--set",
        "ray.num_cpus=2",
    ]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(REPO)}
    log_path = tmp_path / "first.log"
    with open(log_path, "wb") as log:
        first = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 240
        while not _metadata_files(output):
            assert first.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no metadata file appeared"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)  # the driver dies without any cleanup
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
        _kill_group(first.pid)  # Ray's leftover helper processes of that session
    _wait_until_stable(output)

    before = _metadata_files(output)
    committed = read_metadata(str(output)).to_pylist()
    committed_ids = {r["id"] for r in committed}
    assert 0 < len(committed_ids) < len(ids), "killed part-way"
    assert len(committed) == len(committed_ids)
    first_run = {r["run_id"] for r in committed}
    assert len(first_run) == 1
    mask_times = {r["id"]: os.stat(r["mask_url"]).st_mtime_ns for r in committed if r["mask_url"]}

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert f"Masks written to {output / 'masks'}/" in second.stdout

    after = read_metadata(str(output)).to_pylist()
    assert sorted(r["id"] for r in after) == sorted(ids), "no row missing, none duplicated"
    assert all(r["status"] in ("ok", "empty") for r in after)
    for name, mtime in before.items():  # committed batches untouched
        assert _metadata_files(output)[name] == mtime
    for row in after:
        if row["id"] in committed_ids:
            assert row["run_id"] in first_run, "a committed row was recomputed"
            if row["mask_url"]:
                assert os.stat(row["mask_url"]).st_mtime_ns == mask_times[row["id"]]
        else:
            assert row["run_id"] not in first_run
    job_json = json.loads((output / "_job.json").read_text())
    assert job_json["this_run"]["skipped_committed"] == len(committed_ids)
    assert job_json["this_run"]["processed"] == len(ids) - len(committed_ids)
    assert (
        job_json["counts"]["input_rows"]
        == len(ids)
        == sum(job_json["counts"][s] for s in ("ok", "empty", "error"))
    )


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _wait_until_stable(output: Path, quiet: float = 2.0, limit: float = 30.0) -> None:
    """Wait until no new metadata file appears for ``quiet`` seconds (workers of the killed driver)."""
    last, since, deadline = _metadata_files(output), time.monotonic(), time.monotonic() + limit
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.2)
        now = _metadata_files(output)
        if now != last:
            last, since = now, time.monotonic()


# --------------------------------------------------------------------------------------------------
# (a) local folders: the README's main command on the shipped sample manifest
# --------------------------------------------------------------------------------------------------


def test_readme_command_on_sample_manifest(ray_session, tmp_path, capsys, fixture_dir):
    """``evf run`` (the README's job: the embedded configs/local.yaml) with the tiny model instead of
    the demo one, from an empty directory outside the checkout: the installed package finds its
    default config and the sample manifest wherever it runs."""
    from evf.cli import main
    from evf.predictor import EvfSam2Predictor
    from evf.segment import segment

    config = load_config(DEFAULT_CONFIG)
    assert config.manifest == SAMPLE_MANIFEST_ID and Path(config.resolved().manifest) == SAMPLE_MANIFEST
    assert config.model == "evf-sam2-demo" and config.inference.num_gpus == 0 and config.ray.address is None

    output = tmp_path / "out"
    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    cwd = os.getcwd()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    os.chdir(elsewhere)
    try:
        # float32, as the reference predictor below (the default, dtype auto, picks bf16 on AMX CPUs)
        argv = ["run", "--model", str(TINY), "--output", str(output), "--no-progress"]
        code = main([*argv, "--set", "inference.dtype=float32"])
    finally:
        os.chdir(cwd)
        for handler in root.handlers[:]:  # main() configured logging onto pytest's capture stream
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    printed = capsys.readouterr().out
    assert code == 0
    assert f"Masks written to {output / 'masks'}/" in printed
    assert "ok" in printed and "total" in printed

    manifest = pq.read_table(SAMPLE).to_pylist()
    summary = JobSummary(**{**_summary_from_job_json(output), "output": str(output)})
    metadata = check_outputs(str(output), [r["id"] for r in manifest], summary)
    assert summary.counts["error"] == 0

    # Same masks as segmenting each row directly (relative image_url resolved against the manifest).
    predictor = EvfSam2Predictor.from_pretrained(TINY)
    by_id = {r["id"]: r for r in metadata.to_pylist()}
    for row in manifest[:6] + [r for r in manifest if r["mask_only"] is False or r["blur_mask"]]:
        got = by_id[row["id"]]
        assert got["image_url"] == str(SAMPLE_MANIFEST.parent / row["image_url"])  # the installed sample
        request = {
            k: got[k] for k in ("prompt", "negative_prompt", "semantic_type", "mask_only", "revert_mask")
        }
        request.update({k: got[k] for k in ("blur_mask", "expand_mask", "fill_holes")})
        expected = segment(decode_image(read_bytes(got["image_url"])), request, predictor)
        written = cv2.imread(got["mask_url"], cv2.IMREAD_UNCHANGED)
        if written.ndim == 3:
            written = cv2.cvtColor(written, cv2.COLOR_BGRA2RGBA)
        assert np.array_equal(written, expected.image), row["id"]
        assert got["score"] == pytest.approx(expected.score, abs=1e-4)

    # Re-running the same command commits nothing new: every row is skipped, no file is rewritten.
    files_before = {p.name: p.stat().st_mtime_ns for p in (output / "metadata").iterdir()}
    again = run_job(job(str(SAMPLE_MANIFEST), str(output)))
    assert again.skipped == len(manifest) and again.processed == 0 and again.counts == summary.counts
    assert {p.name: p.stat().st_mtime_ns for p in (output / "metadata").iterdir()} == files_before


def _summary_from_job_json(output: Path) -> dict[str, Any]:
    data = json.loads((output / "_job.json").read_text())
    counts = {k: data["counts"][k] for k in ("ok", "empty", "error")}
    this_run = {k: data["this_run"][k] for k in ("ok", "empty", "error")}
    return {
        "run_id": data["run_id"],
        "manifest": data["manifest"],
        "model_id": data["model"]["model_id"],
        "is_demo_model": data["model"].get("is_demo_model", False),
        "input_rows": data["counts"]["input_rows"],
        "counts": counts,
        "missing": data["counts"]["missing"],
        "this_run": this_run,
        "skipped": data["this_run"]["skipped_committed"],
        "stale": data["this_run"]["stale"],
        "elapsed_s": data["elapsed_s"],
    }


# --------------------------------------------------------------------------------------------------
# A 60+ row manifest with a dozen bad rows
# --------------------------------------------------------------------------------------------------


def _bad_rows_manifest(
    root: str, storage_options: dict[str, Any] | None, bad_dir: Path, parts: int = 1
) -> tuple[str, list[str], dict[str, str]]:
    """A synthetic dataset (relative image URLs) plus 12 bad rows; returns (manifest URI, ids, errors).

    ``parts`` > 1: the manifest is the dataset folder itself, holding that many Parquet files.
    """
    write_dataset(11, 12, root, storage_options=storage_options, expressions_per_scene=5)
    fs, base = _fs(root, storage_options)
    base = base.rstrip("/")
    with fs.open(f"{base}/manifest.parquet", "rb") as handle:
        good = pq.read_table(handle).to_pylist()
    for row in good:  # relative paths: resolved against the manifest's folder
        row["image_url"] = "images/" + row["image_url"].rsplit("/", 1)[-1]
    for i, row in enumerate(good):
        row["mask_only"] = None if i % 7 else False
        row["expand_mask"] = 2 if i % 11 == 3 else None
        row["blur_mask"] = 5.0 if i % 13 == 4 else None  # pandas-style float for an int option
    truncated = make_truncated_png(bad_dir / "truncated.png").path.read_bytes()
    text = make_text_png(bad_dir / "text.png").path.read_bytes()
    fs.makedirs(f"{base}/bad", exist_ok=True)
    fs.pipe_file(f"{base}/bad/truncated.png", truncated)
    fs.pipe_file(f"{base}/bad/text.png", text)
    some_image = good[0]["image_url"]
    bad = [
        ("bad-missing-1", "images/does-not-exist.png", "the red circle", {}, "not found"),
        ("bad-missing-2", "images/does-not-exist.png", "the blue square", {}, "not found"),
        ("bad-text-1", "bad/text.png", "the star", {}, "not an image"),
        ("bad-text-2", "bad/text.png", "the cross", {"mask_only": False}, "not an image"),
        ("bad-trunc-1", "bad/truncated.png", "the circle", {}, "truncated"),
        ("bad-trunc-2", "bad/truncated.png", "the hexagon", {}, "truncated"),
        ("bad-blur", some_image, "the red circle", {"blur_mask": 4}, "blur_mask"),
        ("bad-expand", some_image, "the red circle", {"expand_mask": 99}, "expand_mask"),
        ("bad-empty-prompt", some_image, "", {}, "prompt"),
        ("bad-blank-prompt", some_image, "   ", {}, "prompt"),
        ("bad-no-url", None, "the star", {}, "image_url"),
        ("bad-grounding", some_image, "the star", {"use_grounding_dino": True}, "groundingdino"),
    ]
    rows = list(good)
    errors = {}
    for row_id, url, prompt, options, fragment in bad:
        row = {"id": row_id, "image_url": url, "prompt": prompt, "negative_prompt": None}
        row.update({"semantic_type": False, "kind": "bad", "mask_url": None})
        row.update({"mask_only": None, "expand_mask": None, "blur_mask": None, **options})
        rows.insert((len(rows) * 7) % (len(rows) + 1), row)
        errors[row_id] = fragment
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("image_url", pa.string()),
            ("prompt", pa.string()),
            ("negative_prompt", pa.string()),
            ("semantic_type", pa.bool_()),
            ("kind", pa.string()),
            ("mask_url", pa.string()),
            ("mask_only", pa.bool_()),
            ("expand_mask", pa.int64()),
            ("blur_mask", pa.float64()),
            ("use_grounding_dino", pa.bool_()),
        ]
    )
    for row in rows:
        row.setdefault("use_grounding_dino", None)
    table = pa.Table.from_pylist(rows, schema=schema)
    assert len(rows) >= 60 and len(errors) == 12
    if parts == 1:
        with fs.open(f"{base}/job-manifest.parquet", "wb") as handle:
            pq.write_table(table, handle, row_group_size=25)
        return root.rstrip("/") + "/job-manifest.parquet", [r["id"] for r in rows], errors
    fs.rm(f"{base}/manifest.parquet")  # the folder must hold only the job's manifest files
    step = -(-table.num_rows // parts)
    for part in range(parts):
        with fs.open(f"{base}/part-{part}.parquet", "wb") as handle:
            pq.write_table(table.slice(part * step, step), handle, row_group_size=16)
    return root, [r["id"] for r in rows], errors


def test_local_bad_rows_all_accounted_for(ray_session, tmp_path):
    root = tmp_path / "data"
    manifest, ids, errors = _bad_rows_manifest(str(root), None, tmp_path)
    summary = run_job(job(manifest, str(tmp_path / "out")))
    check_outputs(str(tmp_path / "out"), ids, summary, expected_errors=errors)
    assert summary.error == len(errors), "exactly the bad rows fail"
    assert summary.ok + summary.empty == len(ids) - len(errors)
    assert summary.this_run == summary.counts and summary.skipped == 0
    # The summary groups the error rows by kind, with counts and the first ids, and says where the rest is.
    kinds = {kind.kind: kind for kind in summary.error_kinds}
    assert sum(kind.rows for kind in kinds.values()) == len(errors)
    assert kinds["image read failed: ImageReadError"].rows == 2
    assert set(kinds["image read failed: ImageReadError"].first_ids) == {"bad-missing-1", "bad-missing-2"}
    assert kinds["invalid request"].rows == 5 and not kinds["invalid request"].retryable
    table = format_summary(summary)
    assert "image read failed: ImageReadError (bad-missing" in table and "evf review OUTPUT" in table
    record = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert sum(kind["rows"] for kind in record["error_kinds"]) == len(errors)


# --------------------------------------------------------------------------------------------------
# (b) S3 over HTTP: moto's standalone server; manifest, images and outputs all in buckets
# --------------------------------------------------------------------------------------------------


def test_s3_end_to_end(ray_session, s3_server, s3_bucket, monkeypatch, tmp_path, capfd, caplog):
    bucket, storage_options = s3_bucket
    root = f"s3://{bucket}/data"
    manifest, ids, errors = _bad_rows_manifest(root, storage_options, tmp_path, parts=2)  # a folder
    # The job gets endpoint and credentials only from the AWS environment (moto accepts any key).
    key, secret = "AKIAEVFJOBKEY0000001", "evf-Job-Secret-Value-5d1e"
    for name, value in {**s3_server.env, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}.items():
        monkeypatch.setenv(name, value)
    output = f"s3://{bucket}/runs/first"
    config = job(manifest, output, **{"cpu.io_threads": 4})
    assert config.storage_options == {}
    caplog.set_level("INFO")
    summary = run_job(config)
    metadata = check_outputs(output, ids, summary, storage_options, expected_errors=errors)
    urls = [r["image_url"] for r in metadata.to_pylist() if r["image_url"]]
    assert all(url.startswith(f"s3://{bucket}/data/") for url in urls)
    assert summary.error == len(errors)

    # Credentials never appear in _job.json, the metadata or the logs.
    fs, _ = _fs(output, storage_options)
    texts = [
        read_bytes(f"{output}/_job.json", storage_options).decode(),
        b"".join(fs.cat(p) for p in fs.find(f"{bucket}/runs/first/metadata")).decode("latin-1"),
        caplog.text,
        "".join(capfd.readouterr()),
    ]
    for text in texts:
        assert key not in text and secret not in text


# --------------------------------------------------------------------------------------------------
# --overwrite, ids, resources
# --------------------------------------------------------------------------------------------------


def test_resume_keeps_changed_rows_and_overwrite_redoes_them(ray_session, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(SAMPLE.parent / "images", data / "images")
    table = pq.read_table(SAMPLE).slice(0, 5).drop_columns(["id"])  # derived ids: "manifest.parquet:<row>"
    pq.write_table(table, data / "manifest.parquet")
    output = tmp_path / "out"
    first = run_job(job(str(data / "manifest.parquet"), str(output)))
    ids = [f"manifest.parquet:{i}" for i in range(5)]
    check_outputs(str(output), ids, first)

    # A changed row (new prompt, same id) is committed already: a plain re-run keeps it.
    rows = table.to_pylist()
    rows[0]["prompt"] = "the green triangle"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), data / "manifest.parquet")
    resumed = run_job(job(str(data / "manifest.parquet"), str(output)))
    assert resumed.skipped == 5 and resumed.processed == 0

    redo = run_job(job(str(data / "manifest.parquet"), str(output), overwrite=True))
    assert redo.skipped == 0 and redo.processed == 5
    metadata = check_outputs(str(output), ids, redo)
    assert {r["run_id"] for r in metadata.to_pylist()} == {redo.run_id}
    assert (
        metadata.filter(pa.compute.equal(metadata["id"], ids[0]))["prompt"][0].as_py() == "the green triangle"
    )


def test_actor_pool_that_would_starve_the_cpu_stages_is_refused(ray_session, tmp_path):
    """2 actors x 1 CPU on 2 CPUs would hang Ray Data (no CPU left for read/decode/write tasks)."""
    with pytest.raises(ConfigError, match="would hang"):
        run_job(job(str(SAMPLE), str(tmp_path / "out"), **{"inference.actors": 2, "inference.num_cpus": 1}))


def test_two_actors_with_fractional_cpus_finish(ray_session, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(SAMPLE.parent / "images", data / "images")
    pq.write_table(pq.read_table(SAMPLE).slice(0, 12), data / "manifest.parquet")
    summary = run_job(
        job(
            str(data / "manifest.parquet"),
            str(tmp_path / "out"),
            **{"inference.actors": 2, "inference.num_cpus": 0.5, "cpu.batch_size": 3},
        )
    )
    assert summary.reservations["inference"]["total_cpus"] == 1.0
    assert summary.input_rows == 12 and summary.ok + summary.empty == 12


def test_progress_line_says_rows_statuses_rate_and_eta(ray_session):
    """The job-level line, drawn from the counts that every stage's commits report."""
    import io

    from evf.pipelines.progress import JobProgress, start_counters

    counters = start_counters()
    screen = io.StringIO()
    progress = JobProgress(counters, 5000, enabled=True, file=screen)
    counters.add.remote({"ok": 1100, "empty": 60})
    counters.add.remote({"error": 40, "stale": 2})
    counts = progress.update()
    progress.close()
    assert counts == {"ok": 1100, "empty": 60, "error": 40, "stale": 2}
    line = screen.getvalue().split("\r")[-1].strip()
    assert line.startswith("evf run 1200/5000 rows | ok 1100 empty 60 error 40 | "), line
    assert "row/s | ETA " in line and len(line) <= 80, line


def test_committed_rows_never_reach_the_model_and_retryable_errors_are_redone(ray_session, tmp_path):
    """A re-run costs what is left: committed rows leave at the read stage (the model actors see
    only the new rows), and a row committed as a retryable error is done again and replaces it."""
    from evf.pipelines.commit import OutputLayout, write_metadata

    data = tmp_path / "data"
    shutil.copytree(SAMPLE.parent / "images", data / "images")
    table = pq.read_table(SAMPLE).slice(0, 12)
    pq.write_table(table.slice(0, 9), data / "manifest.parquet")
    output = tmp_path / "out"
    first = run_job(job(str(data), str(output)))
    assert first.processed == 9
    ids = table.column("id").to_pylist()
    # Say a storage outage had left one of them a retryable error (as a failed mask write does).
    rows = read_metadata(str(output)).to_pylist()
    for row in rows:
        if row["id"] == ids[4]:
            row.update(status="error", error="mask write failed: EndpointConnectionError", retryable=True)
            row.update(mask_url=None, rle=None, area=None, bbox=None)
    shutil.rmtree(output / "metadata")
    write_metadata(OutputLayout(str(output)), rows, None)
    pq.write_table(table.slice(9, 3), data / "more.parquet")  # three new rows

    second = run_job(job(str(data), str(output)))
    record = json.loads((output / "_job.json").read_text())
    assert second.skipped == 8 and record["this_run"]["rows_through_model"] == 4  # 3 new + 1 retried
    assert second.this_run["ok"] + second.this_run["empty"] == 4 and second.retryable == 0
    after = {r["id"]: r for r in check_outputs(str(output), ids, second).to_pylist()}
    assert after[ids[4]]["status"] in ("ok", "empty") and after[ids[4]]["run_id"] == second.run_id
    runs = sorted(p.name for p in (output / "runs").iterdir())
    assert runs == sorted([f"{first.run_id}.json", f"{second.run_id}.json"])
