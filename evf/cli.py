"""The ``evf`` command: ``segment | run | synth | train | eval``.

Each subcommand's options live beside its implementation (``add_arguments`` + ``command``), and
heavy modules are imported only when their subcommand runs, so ``evf --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# subcommand -> (module holding add_arguments/command, one-line help)
SUBCOMMANDS = {
    "segment": ("evf.segment_cli", "segment one image from a text prompt (fal-ai/evf-sam options)"),
    "run": ("pipelines.cli", "run a batch job: Parquet manifest in, masks + metadata out (Ray Data)"),
    "synth": ("evf.synthetic_cli", "write a synthetic referring-segmentation dataset with ground truth"),
    "train": ("evf.training.cli", "train or fine-tune an EVF-SAM2 model"),
    "eval": ("evf.evaluate", "mean IoU / cIoU of a model over a manifest with ground-truth masks"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evf", description="Text-prompted segmentation with EVF-SAM2.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the subcommand being run pays for its imports
            importlib.import_module(module).add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    module = importlib.import_module(SUBCOMMANDS[args.subcommand][0])
    return int(module.command(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
