"""``evf run --dry-run``: the counts a run would have, with Ray never imported and no weights read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from evf.manifest import scan_manifest
from evf.pipelines.commit import OutputLayout, write_metadata
from evf.pipelines.read import parse_row

REPO = Path(__file__).resolve().parent.parent


def test_dry_run_counts_rows_without_ray_or_weights(tmp_path: Path) -> None:
    rows = [
        {"id": f"r{i}", "image_url": f"images/{i % 3}.png", "prompt": f"thing {i}", "blur_mask": None}
        for i in range(10)
    ]
    rows[7]["blur_mask"] = 4  # invalid
    rows[8]["blur_mask"] = 2  # invalid
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    model = str(tmp_path / "no-such-checkpoint")  # never read by a dry run
    file = scan_manifest(str(tmp_path / "m.parquet")).files[0]
    keys = {
        r["id"]: parse_row({**r, "_row": i}, file=file, defaults={}, model_id=model).key
        for i, r in enumerate(rows)
    }
    output = tmp_path / "out"
    committed = [
        {"id": "r0", "key": keys["r0"], "status": "ok", "run_id": "1"},
        {"id": "r1", "key": "an older key", "status": "ok", "run_id": "1"},  # stale
        {"id": "r2", "key": keys["r2"], "status": "error", "retryable": True, "run_id": "1"},  # redone
    ]
    write_metadata(OutputLayout(str(output)), committed, None)

    no_ray = tmp_path / "no-ray" / "ray"
    no_ray.mkdir(parents=True)
    (no_ray / "__init__.py").write_text("raise ImportError('a dry run must not import ray')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(no_ray.parent), str(REPO)])}
    argv = ["run", "--dry-run", "--manifest", str(tmp_path / "m.parquet"), "--output", str(output)]
    done = subprocess.run(
        [sys.executable, "-m", "evf.cli", *argv, "--model", model],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    assert "to do        6 row(s) on 3 distinct image(s)" in text  # r2..r9 less two invalid
    assert "committed    2 row(s)" in text and "stale        1 committed" in text
    assert "invalid      2 row(s)" in text and "r7: invalid request: blur_mask=4" in text
    assert "at 0.50 rows/s (default)" in text and "$0.03 for the same rows" in text
