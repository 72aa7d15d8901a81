"""evf.parquet reads Parquet file handles on the calling thread only, so no Arrow pool thread can be
left holding a Python-backed buffer when the interpreter exits (the abort of apache/arrow#34314)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evf.parquet import open_parquet, read_parquet

# Counts the process's threads before and after reading through an fsspec handle, in a fresh process
# (Arrow starts its thread pools on first use and keeps them).
_CHILD = """
import os, sys, fsspec, pyarrow.parquet as pq
from evf.parquet import open_parquet, read_parquet
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
with fsspec.filesystem("file").open(sys.argv[1], "rb") as handle:
    if sys.argv[2] == "evf":
        read_parquet(handle, ["id"])
        open_parquet(handle).read_row_group(1, columns=["id", "prompt"], use_threads=False)
    else:
        pq.read_table(handle, columns=["id"])
print(threads() - before, flush=True)
if sys.argv[2] != "evf":
    os._exit(0)  # skip the interpreter's exit, which those pool threads may abort (the hazard itself)
"""


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    rows = 5000
    table = pa.table({"id": [f"row-{i}" for i in range(rows)], "prompt": ["the red car"] * rows})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=1000)
    return tmp_path / "m.parquet"


def test_reads_return_the_data(manifest: Path) -> None:
    with open(manifest, "rb") as handle:
        assert read_parquet(handle, ["id"]).column(0).to_pylist() == [f"row-{i}" for i in range(5000)]
    with open(manifest, "rb") as handle:
        group = open_parquet(handle).read_row_group(2, use_threads=False)
    assert group.column("id").to_pylist() == [f"row-{i}" for i in range(2000, 3000)]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
def test_no_arrow_pool_thread_is_started(manifest: Path) -> None:
    def new_threads(mode: str) -> int:
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, str(manifest), mode], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        return int(result.stdout.strip())

    assert new_threads("evf") == 0
    assert new_threads("arrow-defaults") > 0  # the hazard the helpers avoid is real here
