"""``evf train CONFIG [--set KEY=VALUE]``: train or fine-tune an EVF-SAM2 model (docs/training.md)."""

from __future__ import annotations

import argparse

from evf.cli import add_overrides_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training recipe (YAML), e.g. configs/train-demo.yaml")
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="refuse to start when the output folder holds checkpoints (default: resume from the newest)",
    )
    add_overrides_argument(parser, "override a recipe field, e.g. --set steps=100 --set optimizer.lr=5e-4")


def command(args: argparse.Namespace) -> int:
    from evf.training import train

    checkpoint = train(args.config, resume=not args.no_resume, overrides=args.overrides)
    print(f"final checkpoint: {checkpoint}")
    return 0
