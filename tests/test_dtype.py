"""``dtype="auto"``: bfloat16 exactly where the CPU has native bf16 instructions, explicit dtypes win,
the choice is logged once, and the CLI and the job config offer the same names."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evf import EvfSam2Predictor
from evf.model import hardware
from evf.model.hardware import resolve_dtype
from evf.settings import DTYPES as DTYPE_NAMES

FIXTURE = Path(__file__).parent / "fixtures" / "evf-sam2-tiny"
CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_has_native_bf16() -> bool:
    """An independent reading of the CPU flags (the kernel's, not torch's cpuinfo library)."""
    flags = next(line for line in CPUINFO.read_text().splitlines() if line.startswith("flags")).split()
    return "amx_bf16" in flags or "avx512_bf16" in flags


@pytest.mark.skipif(not CPUINFO.exists(), reason="needs Linux /proc/cpuinfo to cross-check")
def test_auto_on_cpu_follows_the_kernel_cpu_flags() -> None:
    expected = torch.bfloat16 if cpuinfo_has_native_bf16() else torch.float32
    assert resolve_dtype("auto", "cpu") == expected
    assert (hardware.fast_bf16_reason("cpu") is not None) == cpuinfo_has_native_bf16()


def test_explicit_dtypes_win_and_unknown_names_fail() -> None:
    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype(torch.float32, "cpu") == torch.float32
    with pytest.raises(ValueError, match="allowed: auto, float32"):
        resolve_dtype("fp8", "cpu")


def test_auto_is_logged_once_per_device(caplog: pytest.LogCaptureFixture) -> None:
    hardware._auto_dtype.cache_clear()
    with caplog.at_level(logging.INFO, logger="evf.model.hardware"):
        first = resolve_dtype("auto", "cpu")
        assert resolve_dtype("auto", torch.device("cpu")) == first
    messages = [r.getMessage() for r in caplog.records if r.name == "evf.model.hardware"]
    assert len(messages) == 1 and messages[0].startswith(f"dtype auto -> {str(first)[6:]} on cpu")


def test_from_pretrained_auto_runs_the_chosen_dtype_and_stays_close() -> None:
    image = np.asarray(Image.open(FIXTURE / "images" / "shapes_320x240.png").convert("RGB"))
    auto = EvfSam2Predictor.from_pretrained(FIXTURE / "checkpoint", dtype="auto")
    chosen = resolve_dtype("auto", "cpu")
    assert auto.dtype == chosen
    assert {p.dtype for p in auto.model.parameters()} == {chosen}
    exact = EvfSam2Predictor.from_pretrained(FIXTURE / "checkpoint", dtype="float32")
    got, want = (p.predict(image, "the red car on the left").mask for p in (auto, exact))
    assert (got & want).sum() / max((got | want).sum(), 1) > 0.95


def test_cli_and_job_config_offer_the_library_names() -> None:
    import argparse

    from evf.cli.options import add_model_arguments
    from evf.pipelines.config import InferenceConfig

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    dtype = next(a for a in parser._actions if a.dest == "dtype")
    assert tuple(dtype.choices) == DTYPE_NAMES and dtype.default == "auto"
    assert InferenceConfig().dtype == "auto"
    assert set(InferenceConfig.model_fields["dtype"].annotation.__args__) == set(DTYPE_NAMES)
