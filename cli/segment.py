"""``evf segment IMAGE --prompt ... -o OUT.png``: one image, every fal option, a short summary."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from evf.request import OPTION_DEFAULTS
from evf.settings import DTYPES, MODES, ModelSettings


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model / --device / --dtype / --mode: the library's ``ModelSettings``, with its defaults."""
    fields = ModelSettings.model_fields

    def option(name: str, **kwargs: object) -> None:
        default = fields[name].default
        described = fields[name].description
        parser.add_argument(f"--{name}", default=default, help=f"{described} (default: {default})", **kwargs)

    option("model")
    option("device")
    option("dtype", choices=DTYPES)
    option("mode", choices=MODES)


def model_settings(args: argparse.Namespace) -> ModelSettings:
    """The flags' ``ModelSettings`` (invalid values: a ``ConfigError`` naming the flag's field)."""
    from evf.config import ConfigError

    try:
        return ModelSettings(model=args.model, device=args.device, dtype=args.dtype, mode=args.mode)
    except ValueError as error:
        raise ConfigError(str(error)) from None


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


def command(args: argparse.Namespace) -> int:
    from evf.engine import InferenceEngine
    from evf.io import encode_png, write_bytes
    from evf.request import parse_request
    from evf.segment import segment

    request = parse_request(request_from_args(args))
    engine = InferenceEngine.load(model_settings(args))
    start = time.perf_counter()
    result = segment(None, request, engine, detector=args.grounding_model)
    elapsed = time.perf_counter() - start
    write_bytes(args.output, encode_png(result.image))
    if args.json:
        record = result.record()
        record["instances"] = None if result.instances is None else len(result.instances)
        print(json.dumps({"output": args.output, **record, "seconds": round(elapsed, 3)}))
    else:
        x, y, w, h = result.bbox
        print(
            f"{args.output}: score {result.score:.3f}, area {result.area} px, "
            f"bbox x={x} y={y} w={w} h={h}{' (empty)' if result.empty else ''}, {elapsed:.2f} s"
        )
    return 0
