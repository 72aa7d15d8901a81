"""Time to check 3 GB checkpoints with ``check_weights`` (issue 12: "well under a second").

Builds, in a temporary folder, sparse 3 GB weights files with 1,500 F16 tensors (the size and tensor
count of the official EVF-SAM2 checkpoints; sparse, so they take a few MB of disk): a good
``model.safetensors``, the same cut 1 MB short, a good ``pytorch_model.bin`` (torch zip format) and
one whose pickle carries code. Prints the median time of each check against the 1 s target.

    .venv/bin/python benchmarks/bench_weights_check.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from evf.checkpoints import CheckpointError, check_weights

TARGET_S = 1.0
TENSORS = 1500
TOTAL_BYTES = 3 * 2**30


def write_sparse_safetensors(path: Path) -> None:
    """A valid safetensors header for TENSORS F16 tensors, then a hole up to the implied size."""
    per_tensor = TOTAL_BYTES // TENSORS // 2 * 2
    header = {
        f"model.layers.{i}.weight": {
            "dtype": "F16",
            "shape": [per_tensor // 2],
            "data_offsets": [i * per_tensor, (i + 1) * per_tensor],
        }
        for i in range(TENSORS)
    }
    encoded = json.dumps(header).encode()
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        file.truncate(8 + len(encoded) + TENSORS * per_tensor)


def write_sparse_bin(path: Path, payload: bool) -> None:
    """torch.save of TENSORS uninitialised F16 tensors with the data left as a hole (skip_data)."""
    state: dict[str, object] = {
        f"model.layers.{i}.weight": torch.empty(TOTAL_BYTES // TENSORS // 2, dtype=torch.float16)
        for i in range(TENSORS)
    }
    if payload:
        state["extra"] = _Payload()
    with torch.serialization.skip_data():
        torch.save(state, path)


class _Payload:
    def __reduce__(self):
        return (os.getpid, ())  # harmless, but a call: code the weights-only unpickler must refuse


def median_seconds(check: Callable[[], None], repeats: int) -> float:
    check()  # warm-up (imports, page cache)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        check()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def expect_failure(folder: Path) -> Callable[[], None]:
    def check() -> None:
        try:
            check_weights(folder)
        except CheckpointError:
            return
        raise AssertionError(f"{folder} passed the check")

    return check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        cases: dict[str, Callable[[], None]] = {}
        for name in ("safetensors", "truncated", "bin", "bin-with-code"):
            folder = Path(root) / name
            folder.mkdir()
            if name in ("safetensors", "truncated"):
                write_sparse_safetensors(folder / "model.safetensors")
                if name == "truncated":
                    os.truncate(
                        folder / "model.safetensors", (folder / "model.safetensors").stat().st_size - 2**20
                    )
            else:
                write_sparse_bin(folder / "pytorch_model.bin", payload=name == "bin-with-code")
            good = name in ("safetensors", "bin")
            cases[name] = (lambda f=folder: check_weights(f)) if good else expect_failure(folder)
        size = f"{TOTAL_BYTES / 2**30:.0f} GiB"
        print(f"{TENSORS} F16 tensors, {size} per file (sparse), median of {args.repeats}")
        worst = 0.0
        for name, check in cases.items():
            seconds = median_seconds(check, args.repeats)
            worst = max(worst, seconds)
            print(f"  {name:<14} {seconds * 1000:8.1f} ms")
    verdict = "PASS" if worst <= TARGET_S else "FAIL"
    print(f"slowest / target = {worst:.3f} s / {TARGET_S} s = {worst / TARGET_S:.3f} -> {verdict}")


if __name__ == "__main__":
    main()
