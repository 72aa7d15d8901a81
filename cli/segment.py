"""``evf segment IMAGE --prompt ... -o OUT.png``: one image, every fal option, a short summary."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from evf.cli.options import add_model_arguments, add_request_arguments, model_settings, request_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="image path or URI (local, s3://..., data:...)")
    parser.add_argument("--prompt", required=True, help="what to segment")
    parser.add_argument("-o", "--output", required=True, help="where to write the output PNG")
    add_request_arguments(parser)
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
    return {"prompt": args.prompt, "image_url": args.image, **request_options(args)}


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
