"""``evf segment IMAGE --prompt ... -o OUT.png``: one image, every fal option, a short summary."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from evf.request import OPTION_DEFAULTS

DTYPES = ("auto", "float32", "bfloat16", "float16")  # as evf.model.hardware.DTYPE_NAMES


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model / --device / --dtype / --mode, shared by the commands that load a predictor."""
    parser.add_argument(
        "--model",
        default="evf-sam2-demo",
        help="checkpoint: a folder, an fsspec URI (s3://bucket/evf-sam2/), a Hub id "
        "(YxZhang/evf-sam2-multitask) or evf-sam2-demo (the shipped synthetic-shapes model; default)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="compute dtype; auto: bfloat16 where the CPU/GPU runs it natively (AMX, AVX-512-BF16, "
        "CUDA sm80+), else float32 (default: auto)",
    )
    parser.add_argument(
        "--mode",
        default=None,
        choices=("multitask", "legacy"),
        help="inference path (default: from the checkpoint)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="image path or URI (local, s3://..., data:...)")
    parser.add_argument("--prompt", required=True, help="what to segment")
    parser.add_argument("-o", "--output", required=True, help="where to write the output PNG")
    parser.add_argument("--negative-prompt", default=None, help="areas to exclude (subtracted)")
    flags = {
        "semantic_type": "semantic-level segmentation ([semantic] prefix; -multitask checkpoints)",
        "mask_only": "write the mask (default); --no-mask-only writes the RGBA masked image",
        "use_grounding_dino": "detect boxes with GroundingDINO and segment them",
        "revert_mask": "invert the mask",
        "fill_holes": "fill holes in the mask",
    }
    for name, help_text in flags.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            action=argparse.BooleanOptionalAction,
            default=None,
            help=f"{help_text} (default: {str(OPTION_DEFAULTS[name]).lower()})",
        )
    parser.add_argument("--blur-mask", type=int, default=None, help="Gaussian blur kernel, 0 or odd <= 49")
    parser.add_argument("--expand-mask", type=int, default=None, help="dilate by this many pixels, 0..20")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--grounding-model",
        default=None,
        help="GroundingDINO checkpoint for --use-grounding-dino: a folder, an fsspec URI or a Hub id "
        "(IDEA-Research/grounding-dino-tiny)",
    )
    add_model_arguments(parser)


def request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The fal request named by the flags; unset flags keep fal's defaults."""
    request: dict[str, Any] = {"prompt": args.prompt, "image_url": args.image}
    for name in OPTION_DEFAULTS:
        value = getattr(args, name, None)
        if value is not None:
            request[name] = value
    return request


def load_predictor(args: argparse.Namespace) -> Any:
    from evf.predictor import EvfSam2Predictor

    return EvfSam2Predictor.from_pretrained(args.model, device=args.device, dtype=args.dtype, mode=args.mode)


def command(args: argparse.Namespace) -> int:
    from evf.io import encode_png, write_bytes
    from evf.request import parse_request
    from evf.segment import segment

    request = parse_request(request_from_args(args))
    predictor = load_predictor(args)
    start = time.perf_counter()
    result = segment(None, request, predictor, detector=args.grounding_model)
    elapsed = time.perf_counter() - start
    write_bytes(args.output, encode_png(result.image))
    summary = {
        "output": args.output,
        "score": round(result.score, 4),
        "area": result.area,
        "bbox": list(result.bbox),
        "empty": result.empty,
        "seconds": round(elapsed, 3),
    }
    if result.instances is not None:
        summary["instances"] = len(result.instances)
    if args.json:
        print(json.dumps(summary))
    else:
        x, y, w, h = result.bbox
        print(
            f"{args.output}: score {result.score:.3f}, area {result.area} px, "
            f"bbox x={x} y={y} w={w} h={h}{' (empty)' if result.empty else ''}, {elapsed:.2f} s"
        )
    return 0
