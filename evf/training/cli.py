"""``evf train CONFIG``: train or fine-tune an EVF-SAM2 model from a YAML recipe (docs/training.md)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training recipe (YAML), e.g. configs/train-demo.yaml")
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="refuse to start when the output folder holds checkpoints (default: resume from the newest)",
    )


def command(args: argparse.Namespace) -> int:
    from evf.training import TrainConfigError, train

    try:
        checkpoint = train(args.config, resume=not args.no_resume)
    except TrainConfigError as error:
        print(f"error: {error}")
        return 2
    print(f"final checkpoint: {checkpoint}")
    return 0
