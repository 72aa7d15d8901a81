"""Diagnostic (issue 12): how often a process aborts at exit after reading a manifest's id column.

Each run is a fresh Python process that loads what the job's driver loads (``evf.pipelines.manifest``:
torch, OpenCV, pyarrow...), reads the ``id`` column of a 200,000-row, 10-row-group Parquet file on a
local moto S3 server through an fsspec handle, and exits. Runs alternate between Arrow's defaults
(``pre_buffer=True``, ``use_threads=True``, as ``scan_manifest`` reads) and ``evf.parquet``; the
script prints each side's exit codes. -6 is the abort of apache/arrow#34314 ("terminate called
without an active exception"). It is timing-dependent: more frequent on a busy machine.

    .venv/bin/python benchmarks/parquet_exit_abort.py [--runs 40]
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

_CHILD = """
import os, sys
import evf.pipelines.manifest  # noqa: F401  (the modules the job's driver has loaded)
import pyarrow.parquet as pq
from evf.io import open_filesystem
from evf.parquet import open_parquet
fs, path = open_filesystem(sys.argv[1])
with fs.open(path, "rb") as handle:
    if sys.argv[2] == "evf.parquet":
        rows = open_parquet(handle).read(columns=["id"], use_threads=False).num_rows
    else:
        rows = pq.ParquetFile(handle).read(columns=["id"]).num_rows
print(rows)
"""
VARIANTS = ("arrow-defaults", "evf.parquet")


def start_moto(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("moto server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=40, help="runs of each variant")
    args = parser.parse_args()
    repo = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    server, endpoint = start_moto(env)
    env["AWS_ENDPOINT_URL"] = endpoint
    try:
        import s3fs

        rows = 200_000
        table = pa.table({"id": [f"row-{i:07d}" for i in range(rows)], "prompt": ["the red car"] * rows})
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / "manifest.parquet"
            pq.write_table(table, local, row_group_size=20_000)
            fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint})
            fs.mkdir("exit-abort")
            fs.put(str(local), "exit-abort/manifest.parquet")
        codes = {variant: collections.Counter() for variant in VARIANTS}
        started = time.monotonic()
        for _ in range(args.runs):
            for variant in VARIANTS:
                run = subprocess.run(
                    [sys.executable, "-c", _CHILD, "s3://exit-abort/manifest.parquet", variant],
                    capture_output=True,
                    env=env,
                    timeout=300,
                )
                codes[variant][run.returncode] += 1
        print(f"{args.runs} runs of each, alternated, {time.monotonic() - started:.0f} s")
        for variant in VARIANTS:
            aborts = codes[variant][-6]
            print(f"  {variant:<15} exit codes {dict(codes[variant])}: {aborts}/{args.runs} aborted")
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
