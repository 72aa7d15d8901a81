"""Compaction merges a job's commit files crash-safely: killed at any step, no row is lost and none
is seen twice by ``read_metadata``; run again, it leaves one row per id on disk, for raw readers too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds

from evf.pipelines.commit import OutputLayout, write_metadata
from evf.pipelines.metadata import load_committed, read_metadata

REPO = Path(__file__).resolve().parent.parent
ROWS, PER_COMMIT = 20_000, 32


def _committed_output(root: Path) -> list[str]:
    """An output with ROWS rows in 32-row commit files, a few ids committed twice by a later run."""
    layout = OutputLayout(str(root))
    ids = [f"r{i:06d}" for i in range(ROWS)]
    for start in range(0, ROWS, PER_COMMIT):
        rows = [
            {"id": i, "key": "k", "status": "ok", "run_id": "20260101T000000Z-a"}
            for i in ids[start : start + PER_COMMIT]
        ]
        write_metadata(layout, rows, None)
    retried = [{"id": i, "key": "k", "status": "empty", "run_id": "20260102T000000Z-b"} for i in ids[:5]]
    write_metadata(layout, retried, None)
    return ids


def _check(root: Path, ids: list[str]) -> None:
    table = read_metadata(str(root))
    assert table.column("id").to_pylist() == ids, "every row exactly once"
    assert table.column("status").to_pylist()[:6] == ["empty"] * 5 + ["ok"], "the newest row wins"
    assert load_committed(OutputLayout(str(root))).table.num_rows == len(ids)


def _files(folder: Path) -> tuple[int, int]:
    names = os.listdir(folder)
    return sum(n.startswith("compact-") for n in names), sum(n.startswith("part-") for n in names)


def test_compaction_killed_at_each_step_loses_and_doubles_nothing(tmp_path: Path) -> None:
    root = tmp_path / "out"
    ids = _committed_output(root)
    metadata = root / "metadata"
    parts = _files(metadata)[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "evf.cli", "compact", str(root), "--rows-per-file", "25"]
    steps = {  # kill the moment the compaction reaches...
        "merged files being written": lambda merged, left: merged >= 1,
        "sources being deleted": lambda merged, left: 0 < left < parts,
    }
    killed = {}
    for step, reached in steps.items():
        run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while run.poll() is None and not reached(*_files(metadata)) and time.monotonic() < deadline:
            time.sleep(0.001)
        run.send_signal(signal.SIGKILL)
        killed[step] = run.wait() == -signal.SIGKILL
        _check(root, ids)  # whatever the step, every reader still sees every row once
        parts = _files(metadata)[1] or parts
    assert any(killed.values()), f"at least one compaction was killed part-way: {killed}"

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _check(root, ids)
    raw = ds.dataset(str(metadata), format="parquet").to_table(columns=["id"])["id"]
    assert sorted(raw.to_pylist()) == ids, "on disk: one row per id"
    assert _files(metadata)[1] == 0
