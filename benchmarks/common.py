"""Shared set-up for the CPU benchmarks: a real-size EVF-SAM2 architecture with random weights.

SAM 2 hiera-tiny at 1024 px + BEiT-3 base at 224 px: the smallest official-size combination, small
enough for a laptop CPU. Random weights cost exactly what trained ones do.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from evf.model.config import BEIT3_SCALES, SAM2_SCALES, EvfSam2Config
from evf.model.evf_sam2 import EvfSam2Model
from evf.predictor import EvfSam2Predictor
from evf.tokenizer import EvfTokenizer

FIXTURE_CHECKPOINT = (
    Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "evf-sam2-tiny" / "checkpoint"
)
PROMPTS = [
    "the cat on the left",
    "the red car parked next to the tree",
    "a dog",
    "the tall man in a blue jacket holding an umbrella",
]


def real_size_predictor(threads: int = 2) -> EvfSam2Predictor:
    """hiera-tiny (1024) + BEiT-3 base (224), random weights; the fixture's tokenizer (ids < 330)."""
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    config = EvfSam2Config(BEIT3_SCALES["base"], SAM2_SCALES["tiny"], hidden_size=768, out_dim=256)
    model = EvfSam2Model(config)
    return EvfSam2Predictor(model, EvfTokenizer.from_folder(FIXTURE_CHECKPOINT), mode="multitask")


def test_image(height: int = 480, width: int = 640) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def paired_median_seconds(
    first: Callable[[], object], second: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median wall times of two workloads, run alternately after one warm-up each.

    Alternating keeps both exposed to the same background load on a shared machine.
    """
    first()
    second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, bucket in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])
