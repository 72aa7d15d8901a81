"""The progress line of a real ``evf run`` on a terminal moves while the job runs (issue 28).

The job runs in a subprocess whose stdin/stdout/stderr are a pseudo-terminal, so ``isatty()`` is
true as on a user's screen; the test reads the terminal's master side as the line is redrawn.
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from evf.pipelines.config import DEFAULT_CONFIG
from evf.synthetic import write_dataset

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "fixtures" / "evf-sam2-tiny" / "checkpoint"
ROWS = 16
LINE = re.compile(r"evf run (\d+)/(\d+) rows")


def _read_terminal(master: int, process: subprocess.Popen, limit: float) -> list[tuple[float, str]]:
    """Everything the job writes to the terminal, as (seconds since start, chunk), until it exits."""
    chunks: list[tuple[float, str]] = []
    start = time.monotonic()
    while time.monotonic() - start < limit:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's slave side has closed it
                break
            if not data:
                break
            chunks.append((time.monotonic() - start, data.decode("utf-8", "replace")))
        elif process.poll() is not None:
            break
    return chunks


def test_progress_line_moves_on_a_terminal(tmp_path):
    write_dataset(7, ROWS, str(tmp_path / "data"), expressions_per_scene=1)
    manifest = tmp_path / "data" / "manifest.parquet"
    assert pq.read_metadata(manifest).num_rows == ROWS
    command = [
        sys.executable,
        "-m",
        "evf.cli",
        "run",
        str(DEFAULT_CONFIG),
        "--manifest",
        str(manifest),
        "--output",
        str(tmp_path / "out"),
        "--model",
        str(TINY),
        "--set",
        "inference.dtype=float32",
        "--set",
        "cpu.batch_size=2",
        "--set",
        "inference.batch_size=1",
        "--set",
        "ray.num_cpus=2",
    ]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(REPO)}
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        slave = -1
        try:
            chunks = _read_terminal(master, process, limit=240)
            code = process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # Ray's leftover helper processes, if any
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)

    text = "".join(chunk for _, chunk in chunks)
    assert code == 0, text[-3000:]
    # Each redraw starts with '\r': the line's successive texts, with the time each arrived.
    seen: list[tuple[float, int, int]] = []
    for when, chunk in chunks:
        for piece in re.split(r"[\r\n]", chunk):
            match = LINE.search(piece)
            if match:
                seen.append((when, int(match.group(1)), int(match.group(2))))
    assert seen, text[-3000:]
    assert all(total == ROWS for _, _, total in seen), seen
    changes = [seen[0]] + [b for a, b in zip(seen, seen[1:], strict=False) if b[1] != a[1]]
    print(f"{len(changes)} distinct progress lines over {seen[-1][0] - seen[0][0]:.1f} s: {changes}")
    assert len(changes) >= 4, f"the line changed {len(changes) - 1} time(s): {changes}"
    assert seen[-1][1] == ROWS, seen[-1]
    # It moved while the job ran, not in one burst at the end, redrawn on its timer (every second,
    # a poll that times out after 5 s at worst; with slack for a busy machine) even between commits.
    assert changes[-1][0] - changes[1][0] >= 2.0, changes
    gaps = [b[0] - a[0] for a, b in zip(seen, seen[1:], strict=False)]
    assert max(gaps) < 10.0, f"the line stood still for {max(gaps):.1f} s: {seen}"
