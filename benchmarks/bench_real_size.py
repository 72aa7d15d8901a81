"""Real-size EVF-SAM2 speed: float32 vs bf16 vs bf16 + torch.compile (and fp16, batch sizes on CUDA).

Builds (once, into a temp folder, never into git) a random-weights checkpoint of the official
architecture (SAM 2 Hiera-L @1024 + BEiT-3 large @224, 1,875 tensors, ~898M parameters, ~3.1 GB)
and loads it strictly through ``EvfSam2Predictor.from_pretrained``, as users load the real one.
Random weights cost exactly what trained ones do.

Per prompts-per-image count (default 2, 1, 4) it times ``predict_batch`` on the same synthetic
scenes (640x480 and 400x600, alternating) for every variant, the variants alternated image by
image (order rotated) so that background load on a shared machine hits all of them alike, and
reports median s/image, images/s, achieved TFLOP/s (FLOPs counted by torch's flop counter, attention
included) and the mask agreement (IoU) of every variant against float32 on the same inputs.

Variants: ``fp32`` (eager float32, the exact reference), ``bf16`` (eager bf16 under autocast, the
``--dtype bfloat16`` path), ``auto+compile`` (what ``dtype: auto`` + ``compile: true`` choose: bf16
where the hardware runs it natively, inductor-compiled encoders; warm-up inside ``from_pretrained``,
outside the timed path). On CUDA also ``fp16``, images per call 1/4/8/16, and peak GPU memory.

Target (issue 16), on a 2-core CPU: auto+compile median s/image <= 0.20 x fp32, mean IoU >= 0.98 on
>= 8 images x 2 prompts. ``--profile`` prints where the time goes (torch.profiler, per op category).
``--job`` adds the whole job on these weights (``bench_pipeline.py``'s pipeline vs bare loop);
``--job-only`` runs just that.

    .venv/bin/python benchmarks/bench_real_size.py [--images 8] [--prompts 2 1 4] [--profile] [--job [ROWS]]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import FIXTURE_CHECKPOINT  # noqa: E402

from evf.model.checkpoint import save_checkpoint  # noqa: E402
from evf.model.config import BEIT3_SCALES, SAM2_SCALES, EvfSam2Config  # noqa: E402
from evf.model.evf_sam2 import EvfSam2Model  # noqa: E402
from evf.predictor import EvfSam2Predictor, Prediction  # noqa: E402
from evf.synthetic import generate_scene  # noqa: E402

SPEED_TARGET = 0.20
IOU_TARGET = 0.98
REAL_SIZE = EvfSam2Config(
    BEIT3_SCALES["large"], SAM2_SCALES["large"], hidden_size=1024, out_dim=256, inference_mode="multitask"
)
IMAGE_SIZES = ((480, 640), (600, 400))  # (H, W)
JOB_ROWS = 24  # default manifest rows of --job: a few dozen, as issue 16 asks
# Dense bf16/fp16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by device-name fragment.
CUDA_PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125}


def real_size_checkpoint(folder: Path) -> Path:
    """The random-weights real-size checkpoint in ``folder`` (written on first use, ~25 s, 3.1 GB)."""
    done = folder / ".complete"
    if not done.exists():
        print(f"... writing the real-size random checkpoint to {folder}", flush=True)
        torch.manual_seed(0)
        model = EvfSam2Model(REAL_SIZE)
        save_checkpoint(model, folder, FIXTURE_CHECKPOINT)  # the fixture's tokenizer: ids < 330
        done.write_text("random weights, benchmarks/bench_real_size.py\n")
        del model
    return folder


def scenes(count: int) -> list[tuple[np.ndarray, list[str]]]:
    """``count`` synthetic scenes resized to the benchmark sizes, each with its referring prompts."""
    out = []
    for index in range(count):
        scene = generate_scene(16, index)
        h, w = IMAGE_SIZES[index % len(IMAGE_SIZES)]
        image = cv2.resize(scene.image, (w, h), interpolation=cv2.INTER_LINEAR)
        prompts = [e.prompt for e in scene.expressions] + ["the object in the middle", "background"]
        out.append((image, prompts))
    return out


@dataclass
class Variant:
    """One way of running the model, with what it measured."""

    name: str
    predictor: EvfSam2Predictor
    seconds: list[float] = field(default_factory=list)  # per image
    masks: list[np.ndarray] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # predicted IoU of the chosen mask
    peak_bytes: int = 0


def load_variants(folder: Path, device: str, compile_: bool) -> list[Variant]:
    specs: list[tuple[str, str, bool]] = [("fp32", "float32", False), ("bf16", "bfloat16", False)]
    if device.startswith("cuda"):
        specs.append(("fp16", "float16", False))
    if compile_:
        specs.append(("auto+compile", "auto", True))
    variants = []
    for name, dtype, compiled in specs:
        print(f"... loading {name}" + (" (compiles during the warm-up)" if compiled else ""), flush=True)
        start = time.perf_counter()
        predictor = EvfSam2Predictor.from_pretrained(folder, device, dtype, compile=compiled)
        print(f"    {time.perf_counter() - start:.0f} s, compute dtype {predictor.dtype}", flush=True)
        variants.append(Variant(name, predictor))
    return variants


def run_once(variant: Variant, images: Sequence[np.ndarray], prompts: list[list[str]]) -> list[Prediction]:
    """One ``predict_batch`` call; records s/image and, on CUDA, the peak memory."""
    device = variant.predictor.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = variant.predictor.predict_batch(images, prompts)  # returns host arrays: synchronised
    variant.seconds.append((time.perf_counter() - start) / len(images))
    if device.type == "cuda":
        variant.peak_bytes = max(variant.peak_bytes, torch.cuda.max_memory_allocated(device))
    return [p for per_image in result for p in per_image]


def measure(
    variants: list[Variant], data: list[tuple[np.ndarray, list[str]]], prompts: int, per_call: int
) -> None:
    """Alternate the variants call by call (order rotated each call) over the same inputs."""
    for v in variants:
        v.seconds, v.masks, v.scores, v.peak_bytes = [], [], [], 0
        run_once(v, [data[0][0]] * per_call, [data[0][1][:prompts]] * per_call)  # warm-up, untimed
        v.seconds = []
    for call, begin in enumerate(range(0, len(data) - per_call + 1, per_call)):
        chunk = data[begin : begin + per_call]
        images, texts = [im for im, _ in chunk], [p[:prompts] for _, p in chunk]
        order = variants[call % len(variants) :] + variants[: call % len(variants)]
        for v in order:
            predictions = run_once(v, images, texts)
            v.masks += [p.mask for p in predictions]
            v.scores += [p.score for p in predictions]
        print(
            f"    call {call + 1}: " + ", ".join(f"{v.name} {v.seconds[-1]:.2f} s/image" for v in variants),
            flush=True,
        )


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def count_flops(predictor: EvfSam2Predictor, image: np.ndarray, prompts: list[str]) -> float:
    """FLOPs of one image with ``prompts`` (attention through the math kernel so that it is counted)."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        predictor.predict_batch([image], [prompts])
    return float(counter.get_total_flops())


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` TFLOP/s of a square matmul: what this device's matmul path reaches."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        (a @ a).sum().item()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def device_peak(device: torch.device) -> tuple[float | None, str]:
    """The half-precision peak to compare against: the data sheet on CUDA, a measured matmul on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in CUDA_PEAK_TFLOPS.items() if k in name), None)
        return peak, f"{name} data-sheet dense bf16" if peak else f"{name}: peak unknown"
    measured = matmul_tflops(device, torch.bfloat16)
    fp32 = matmul_tflops(device, torch.float32)
    return measured, f"this CPU's measured 2048^3 bf16 matmul (fp32: {fp32:.2f} TFLOP/s)"


def report(
    variants: list[Variant], prompts: int, per_call: int, flops: float, peak: tuple[float | None, str]
) -> dict[str, float]:
    """Print one table; returns each variant's median s/image."""
    reference = variants[0]
    medians = {v.name: statistics.median(v.seconds) for v in variants}
    print(
        f"\n{prompts} prompt(s)/image, {per_call} image(s)/call, {len(reference.seconds) * per_call} images"
    )
    print(
        f"{'variant':<14}{'s/image':>9}{'images/s':>10}{'vs fp32':>9}{'TFLOP/s':>9}{'of peak':>9}"
        f"{'IoU mean':>10}{'IoU min':>9}{'peak GPU MB':>13}"
    )
    for v in variants:
        ious = [iou(a, b) for a, b in zip(v.masks, reference.masks, strict=True)]
        achieved = flops / medians[v.name] / 1e12
        of_peak = f"{achieved / peak[0]:.0%}" if peak[0] else "-"
        memory = f"{v.peak_bytes / 2**20:,.0f}" if v.peak_bytes else "-"
        print(
            f"{v.name:<14}{medians[v.name]:>9.3f}{1 / medians[v.name]:>10.2f}"
            f"{medians[v.name] / medians[reference.name]:>9.3f}{achieved:>9.2f}{of_peak:>9}"
            f"{statistics.mean(ious):>10.4f}{min(ious):>9.4f}{memory:>13}"
        )
    for v in variants[1:]:  # the disagreements: IoU, and the predicted IoU each side gave its mask
        worst = sorted(
            zip(v.masks, reference.masks, v.scores, reference.scores, strict=True),
            key=lambda m: iou(m[0], m[1]),
        )[:3]
        print(
            f"  {v.name} lowest IoUs (IoU, predicted IoU {v.name} / fp32, mask px {v.name} / fp32): "
            + "; ".join(f"{iou(a, b):.3f} ({sa:.3f}/{sb:.3f}, {a.sum()}/{b.sum()})" for a, b, sa, sb in worst)
        )
    return medians


# torch.profiler op name fragments -> category, first match wins (names lower-cased, "aten::" kept).
CATEGORIES = (
    ("attention (SDPA)", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("matmul (linear/addmm/bmm)", ("addmm", "::mm", "bmm", "linear", "matmul", "gemm")),
    ("convolution", ("conv",)),
    ("layer norm", ("layer_norm", "group_norm")),
    ("GELU / ReLU", ("gelu", "relu")),
    (
        "add / mul / other elementwise",
        (
            "aten::add",
            "aten::mul",
            "aten::sub",
            "aten::div",
            "where",
            "sigmoid",
            "softmax",
            "aten::sin",
            "aten::cos",
            "aten::pow",
        ),
    ),
    ("upsample / pool", ("upsample", "pool", "interpolate")),
    (
        "layout copies (permute/window/cat)",
        ("copy_", "clone", "contiguous", "aten::cat", "repeat", "pad", "index"),
    ),
)
CAST = "dtype casts (to/_to_copy)"
COMPILED = "inductor kernels (fused, compiled)"


def _category(name: str, parent: str | None) -> str:
    lowered = name.lower()
    if lowered == "aten::copy_" and parent == "aten::_to_copy":
        return CAST  # the copy that does a .to(dtype) is a cast, not a layout change
    for category, fragments in CATEGORIES:
        if any(f in lowered for f in fragments):
            return category
    if not lowered.startswith(("aten::", "mkldnn::", "prim::")):
        return COMPILED  # inductor's C++/Triton kernels and its graph wrappers
    return "other aten ops"


def category_table(fn: Callable[[], object]) -> dict[str, float]:
    """Seconds of self CPU time per op category for one call of ``fn`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    seconds: dict[str, float] = {}
    for event in prof.events():
        parent = event.cpu_parent.name if event.cpu_parent is not None else None
        category = _category(event.name, parent)
        seconds[category] = seconds.get(category, 0.0) + event.self_cpu_time_total / 1e6
    return seconds


def profile(variants: list[Variant], image: np.ndarray, prompts: list[str]) -> None:
    """Where one image's time goes, per variant (torch.profiler self time by op category)."""
    timings = {}
    for v in variants:
        timings[v.name] = category_table(lambda v=v: v.predictor.predict_batch([image], [prompts]))
    print(
        f"\nprofile: one {image.shape[1]}x{image.shape[0]} image, {len(prompts)} prompts "
        "(torch.profiler self time; seconds and share of the total)"
    )
    names = sorted(
        {c for t in timings.values() for c in t}, key=lambda c: -timings[variants[0].name].get(c, 0)
    )
    print(f"{'category':<34}" + "".join(f"{v.name:>20}" for v in variants))
    for category in names:
        cells = []
        for v in variants:
            total = sum(timings[v.name].values())
            seconds = timings[v.name].get(category, 0.0)
            cells.append(f"{seconds:>8.3f} s {seconds / total:>6.1%}   ")
        print(f"{category:<34}" + "".join(f"{c:>20}" for c in cells))
    print(f"{'total':<34}" + "".join(f"{sum(timings[v.name].values()):>12.3f} s       " for v in variants))


def whole_job(folder: Path, rows: int) -> None:
    """The pipeline on these weights against the bare predictor loop (bench_pipeline.py's two sides)."""
    import bench_pipeline as job

    work = Path(tempfile.mkdtemp(prefix="bench-real-size-job-"))
    manifest = job.make_manifests(work, [rows], per_image=4)[rows]
    (work / "bare" / "masks").mkdir(parents=True)
    bare_s = job.bare_loop(manifest, str(folder), work / "bare", rows_per_batch=32, images_per_call=8)
    job_s, done, peak_mb = job.run_pipeline(manifest, str(folder), work / "job", {})
    print(f"\nwhole job, {rows} rows (4 prompts/image), real-size weights, dtype auto, model load included:")
    print(
        f"bare predictor loop {rows / bare_s:.3f} rows/s; pipeline {done / job_s:.3f} rows/s "
        f"(ratio {done / job_s / (rows / bare_s):.2f}, peak {peak_mb:,.0f} MB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dir", type=Path, default=Path(tempfile.gettempdir()) / "evf-real-size" / "checkpoint"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=8, help="images per measurement (CUDA: at least 16)")
    parser.add_argument("--prompts", type=int, nargs="+", default=[2, 1, 4], help="prompts per image")
    parser.add_argument("--no-compile", action="store_true", help="skip the auto+compile variant")
    parser.add_argument("--profile", action="store_true", help="print where the time goes, per variant")
    parser.add_argument(
        "--job",
        type=int,
        nargs="?",
        const=JOB_ROWS,
        default=0,
        metavar="ROWS",
        help=f"also time the whole job on ROWS manifest rows (default {JOB_ROWS})",
    )
    parser.add_argument("--job-only", action="store_true", help="time only the whole job (implies --job)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    per_call_options = [1, 4, 8, 16] if device.type == "cuda" else [1]
    folder = real_size_checkpoint(args.dir)
    if args.job_only:
        whole_job(folder, args.job or JOB_ROWS)
        return
    variants = load_variants(folder, args.device, not args.no_compile)
    data = scenes(max(args.images, max(per_call_options)))
    peak = device_peak(device)
    print(
        f"\ndevice {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}; "
        f"peak for 'of peak': {peak[0] or 0:.2f} TFLOP/s ({peak[1]})"
    )
    verdict = None
    for prompts in args.prompts:
        flops = count_flops(variants[1].predictor, data[0][0], data[0][1][:prompts])
        print(f"\n{flops / 1e12:.3f} TFLOP per image with {prompts} prompt(s)")
        for per_call in per_call_options:
            measure(variants, data, prompts, per_call)
            medians = report(variants, prompts, per_call, flops, peak)
            if prompts == 2 and per_call == 1 and "auto+compile" in medians:
                fastest = variants[-1]
                ious = [iou(a, b) for a, b in zip(fastest.masks, variants[0].masks, strict=True)]
                verdict = (medians["auto+compile"] / medians["fp32"], statistics.mean(ious), len(ious))
    if args.profile:
        profile(variants, data[0][0], data[0][1][:2])
    if verdict:
        ratio, mean_iou, n = verdict
        ok = ratio <= SPEED_TARGET and mean_iou >= IOU_TARGET
        print(
            f"\nauto+compile / fp32 = {ratio:.3f} (target <= {SPEED_TARGET}); mean IoU {mean_iou:.4f} on {n} "
            f"masks (target >= {IOU_TARGET}) -> {'PASS' if ok else 'FAIL'}"
        )
    if args.job:
        del variants
        whole_job(folder, args.job)


if __name__ == "__main__":
    main()
