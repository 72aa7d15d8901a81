"""The driver's stderr filter: Ray's actor-argument line is dropped, everything else passes whole."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import os, sys
from evf.pipelines.native_stderr import filtered_native_stderr
noise = (b"[2026-12-07 01:19:25,723 E 1895 1895] core_worker.cc:2465: Actor with class name: "
         b"'MapWorker(MapBatches(InferenceStage))' and ID: 'ab' has constructor arguments in the "
         b"object store and max_restarts > 0. See https://github.com/ray-project/ray/issues/53727\n")
with filtered_native_stderr():
    os.write(2, b"\revf run 0/24 rows")
    os.write(2, noise[:25])  # a C++ line written in pieces, after a progress update on the same line
    os.write(2, noise[25:])
    os.write(2, b"\revf run 24/24 rows\n")
    os.write(2, b"[2026-12-07 01:19:26,001 E 1895 1895] raylet_client.cc:60: a real error\n")
    print("a Python log record", file=sys.stderr)
    os.write(2, b"unfinished at exit [20")
print("after", file=sys.stderr)
"""


def test_only_the_actor_argument_line_is_dropped() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, timeout=60, check=True
    )
    assert done.stderr == (
        b"\revf run 0/24 rows\revf run 24/24 rows\n"
        b"[2026-12-07 01:19:26,001 E 1895 1895] raylet_client.cc:60: a real error\n"
        b"a Python log record\n"
        b"unfinished at exit [20"
        b"after\n"
    )
