"""What the hardware runs fast: the compute dtype behind ``dtype="auto"``, and ``torch.compile`` set-up.

``dtype="auto"`` picks bfloat16 where the hardware has native bf16 arithmetic and float32
elsewhere:

- CUDA: GPUs with native bf16 (compute capability 8.0+, Ampere and later);
- CPU: AMX tiles (Intel Sapphire Rapids and later) or AVX-512-BF16 (Intel Cooper Lake, AMD Zen 4
  and later), which oneDNN uses for bf16 matmuls, convolutions and attention (measured on a 2-core
  AVX-512-BF16 machine: a bf16 matmul runs ~3.8x the float32 one, see benchmarks/README.md).

bf16 runs under ``torch.autocast`` with bf16 weights (see ``EvfSam2Predictor``); its speed and mask
agreement with float32 on the real architecture are measured by ``benchmarks/bench_real_size.py``.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from evf.settings import DTYPES

if TYPE_CHECKING:
    from evf.model.evf_sam2 import EvfSam2Model

log = logging.getLogger(__name__)


def _cpu_bf16_units() -> str | None:
    """The CPU's native bf16 instruction set (AMX or AVX-512-BF16), or None."""
    cpu = torch.cpu
    # Private but stable helpers (torch >= 2.3) over the cpuinfo library; absent -> not detected.
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX tiles"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX-512-BF16"
    return None


def fast_bf16_reason(device: torch.device | str) -> str | None:
    """Why bf16 runs natively fast on ``device`` (a sentence for the log), or None when it does not."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            return None
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} has native bf16 (compute capability {major}.{minor})"
    if device.type == "cpu":
        units = _cpu_bf16_units()
        return f"the CPU has native bf16 ({units})" if units else None
    return None


@functools.cache
def _auto_dtype(device: torch.device) -> torch.dtype:
    """``auto`` for one device, decided and logged once per process."""
    reason = fast_bf16_reason(device)
    chosen = torch.bfloat16 if reason else torch.float32
    why = reason or f"no native bf16 found on {device.type}"
    log.info("dtype auto -> %s on %s: %s", str(chosen).removeprefix("torch."), device, why)
    return chosen


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """``"auto"``, a dtype name (``"bfloat16"``) or a ``torch.dtype`` -> the compute dtype on ``device``.

    Explicit dtypes always win; only ``"auto"`` looks at the hardware.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
    if dtype == "auto":
        return _auto_dtype(torch.device(device))
    return getattr(torch, dtype)


def compile_cache_dir() -> Path:
    """Where inductor keeps compiled graphs and kernels: ``$EVF_CACHE_DIR/inductor`` (or
    ``~/.cache/evf-sam/inductor``), unless ``TORCHINDUCTOR_CACHE_DIR`` is set."""
    from evf.checkpoints import default_cache_dir  # the evf cache root lives there

    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir().parent / "inductor")


def enable_compile_cache() -> Path:
    """Point inductor's on-disk caches (FX graph cache, AOTAutograd cache, C++/Triton kernels)
    at ``compile_cache_dir()``, so a second job on the machine reuses the first one's compilation."""
    folder = compile_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    return folder


def compile_encoders(model: EvfSam2Model) -> None:
    """Wrap SAM 2's image encoder and BEiT-3 (the two big encoders) in ``torch.compile`` (inductor).

    The image encoder starts with static shapes (one compile per images-per-call count until
    dynamo marks the batch dimension dynamic); BEiT-3 is dynamic from the start (prompts per call
    and text length vary). On CPU the weights are frozen into the graphs, so inductor prepacks them
    for oneDNN and fuses bias and GELU into the matmuls (inference only: the predictor never trains).
    Compilation is lazy: ``EvfSam2Predictor.warm_up`` triggers it.
    """
    enable_compile_cache()
    on_cpu = next(model.parameters()).device.type == "cpu"
    options = {"freezing": True} if on_cpu else None
    model.visual_model.image_encoder = torch.compile(model.visual_model.image_encoder, options=options)
    model.mm_extractor["beit3"] = torch.compile(model.mm_extractor["beit3"], dynamic=True, options=options)
