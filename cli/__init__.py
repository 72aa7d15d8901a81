"""The ``evf`` command: one module per subcommand, one contract for all of them.

Each subcommand module has ``add_arguments(parser)`` and ``command(args) -> int``; heavy modules
are imported only when their subcommand runs, so ``evf --help`` is instant.

The contract: results on stdout; errors on stderr as ``evf <command>: <message>``. Exit status
0 on success, 1 when the job (or evaluation) failed, 2 for a user error (bad argument, config,
path, device: an ``evf.errors.UserError``), without a traceback; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import sys
from collections.abc import Sequence

from evf.errors import UserError

__all__ = ["SUBCOMMANDS", "CommandFailed", "add_overrides_argument", "build_parser", "main"]

# subcommand -> (module holding add_arguments/command, one-line help)
SUBCOMMANDS = {
    "segment": ("evf.cli.segment", "segment one image from a text prompt (fal-ai/evf-sam options)"),
    "run": ("evf.cli.run", "run a batch job: images or a manifest in, masks + metadata out (Ray Data)"),
    "eval": ("evf.cli.eval", "mean IoU / cIoU of a model over a manifest with ground-truth masks"),
    "synth": ("evf.cli.synth", "write a synthetic referring-segmentation dataset with ground truth"),
    "train": ("evf.cli.train", "train or fine-tune an EVF-SAM2 model"),
    "review": ("evf.cli.review", "write a static HTML review page of a job's output"),
    "export": ("evf.cli.export", "export a job's masks as COCO or Label Studio tasks"),
    "compact": ("evf.cli.compact", "merge a job's commit files into a few large ones"),
}

# Their DEBUG logs print request headers (the access key id is in the Authorization header):
# never below INFO, even with ``evf -v``, so that credentials stay out of the logs.
QUIET_LIBRARIES = ("botocore", "aiobotocore", "boto3", "s3fs", "urllib3", "fsspec", "aiohttp")


class CommandFailed(Exception):
    """A subcommand's work failed (not the user's input): printed in one line, exit status 1."""


def add_overrides_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``: every config-reading command's option."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text
    )


def _version() -> str:
    try:
        return importlib.metadata.version("evf-sam")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout that is not installed
        return "unknown"


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evf", description="Text-prompted segmentation with EVF-SAM2.")
    parser.add_argument("--version", action="version", version=f"evf-sam {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (and tracebacks)")
    subparsers = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the subcommand being run pays for its imports
            importlib.import_module(module).add_arguments(sub)
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for name in QUIET_LIBRARIES:
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.getEffectiveLevel(), logging.INFO))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    _configure_logging(args.verbose)
    name = args.subcommand
    try:
        return int(importlib.import_module(SUBCOMMANDS[name][0]).command(args) or 0)
    except UserError as error:
        print(f"evf {name}: {error}", file=sys.stderr)
        return 2
    except CommandFailed as error:
        print(f"evf {name}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"evf {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug or an unforeseen failure: one line, the traceback with -v
        if args.verbose:
            raise
        print(f"evf {name}: {type(error).__name__}: {error} (run with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
