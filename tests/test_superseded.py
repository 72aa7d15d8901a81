"""One row per id for every reader: after a run that ends, ``metadata/`` holds each id once, even
for readers that do not keep the newest row themselves (``pyarrow.dataset``, pandas, DuckDB)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from PIL import Image

from evf.pipelines.commit import METADATA_SCHEMA
from evf.pipelines.compact import drop_superseded
from evf.pipelines.config import DEFAULT_CONFIG, load_config
from evf.pipelines.job import run_job
from evf.pipelines.metadata import read_metadata

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "fixtures" / "evf-sam2-tiny" / "checkpoint"


def _rows(ids: list[str], run_id: str, status: str) -> pa.Table:
    data = [{"id": i, "key": f"k-{i}", "status": status, "run_id": run_id} for i in ids]
    return pa.Table.from_pylist(data, schema=METADATA_SCHEMA)


def test_drop_superseded_merges_only_the_files_that_repeat_an_id(tmp_path: Path) -> None:
    metadata = tmp_path / "out" / "metadata"
    metadata.mkdir(parents=True)
    pq.write_table(_rows([f"r{i}" for i in range(10)], "run-1", "ok"), metadata / "compact-a-0000.parquet")
    pq.write_table(_rows(["r3", "r4"], "run-1", "error"), metadata / "compact-b-0000.parquet")
    pq.write_table(_rows(["x0", "x1"], "run-1", "ok"), metadata / "part-untouched.parquet")
    pq.write_table(_rows(["r4"], "run-2", "ok"), metadata / "part-newer.parquet")
    before = ds.dataset(metadata).to_table()
    assert before.num_rows == 15

    done = drop_superseded(str(tmp_path / "out"))
    after = ds.dataset(metadata).to_table().to_pylist()
    ids = [r["id"] for r in after]
    assert sorted(ids) == sorted({*(f"r{i}" for i in range(10)), "x0", "x1"})  # each once
    assert {r["id"]: r["run_id"] for r in after}["r4"] == "run-2"  # the newest row won
    assert done.duplicates_dropped == 3 and done.files_read == 3
    names = {p.name for p in metadata.iterdir()}
    assert "part-untouched.parquet" in names, "a file without a repeated id is left alone"
    assert drop_superseded(str(tmp_path / "out")).files_read == 0  # nothing left to do


def test_a_redone_row_stands_once_after_the_run(ray_session, tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    picture = np.full((32, 40, 3), 200, np.uint8)
    picture[4:20, 6:30] = (220, 30, 30)
    Image.fromarray(picture).save(images / "a.png")
    manifest = tmp_path / "m.parquet"

    def write_manifest(ids: list[str]) -> None:
        urls = [str(images / f"{i}.png") for i in ids]
        pq.write_table(pa.table({"id": ids, "image_url": urls, "prompt": ["x"] * len(ids)}), manifest)

    write_manifest(["a", "b"])
    flags = {
        "manifest": str(manifest),
        "output": str(tmp_path / "out"),
        "model": str(TINY),
        "progress": False,
    }
    first = run_job(load_config(DEFAULT_CONFIG, flags))
    assert first.counts["error"] == 1  # b.png is missing
    # b redone beside a new row c: its new row lands in another commit file than its error row.
    Image.fromarray(picture).save(images / "b.png")
    Image.fromarray(picture).save(images / "c.png")
    write_manifest(["a", "b", "c"])
    second = run_job(load_config(DEFAULT_CONFIG, {**flags, "retry_errors": "all"}))
    assert second.counts["error"] == 0 and second.this_run["ok"] + second.this_run["empty"] == 2

    raw = ds.dataset(tmp_path / "out" / "metadata", format="parquet").to_table(columns=["id", "status"])
    assert sorted(raw.column("id").to_pylist()) == ["a", "b", "c"], "each id once for a raw reader"
    assert read_metadata(str(tmp_path / "out")).num_rows == 3
