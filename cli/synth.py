"""``evf synth --seed S --count N --output URI``: a synthetic dataset with ground-truth masks."""

from __future__ import annotations

import argparse

from evf.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, required=True, help="scenes of a seed are the same everywhere")
    parser.add_argument("--count", type=int, required=True, help="number of scenes")
    parser.add_argument("--output", required=True, help="folder or URI (images/, masks/, manifest.parquet)")
    parser.add_argument(
        "--expressions-per-scene", type=int, default=None, help="keep at most this many prompts per scene"
    )


def command(args: argparse.Namespace) -> int:
    from evf.synthetic import write_dataset

    if args.count < 1:
        raise UserError(f"--count must be >= 1, got {args.count}")
    manifest = write_dataset(
        args.seed, args.count, args.output, expressions_per_scene=args.expressions_per_scene
    )
    print(f"wrote {args.count} scenes; manifest: {manifest}")
    return 0
