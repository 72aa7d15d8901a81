"""``evf run [CONFIG] [--manifest URI] [--output URI] [--model URI] ...``: the batch job.

Exit status (docs/pipeline.md says how a scheduler should react to each):
0  the job completed: every row is ok, empty or a permanent error (bad image, invalid option);
3  the job completed but some rows failed for a transient cause (storage down, throttled): they are
   ``error`` rows marked ``retryable``, and re-running the same command retries them;
4  the job completed but its rows failed: every row this run processed is an error, or more than
   ``--max-error-rate`` of them (wrong column, image root or model; storage down): the summary's
   error kinds say why; 4 wins over 3 (a re-run still retries the retryable ones);
1  the job itself failed (nothing is lost: a re-run resumes);
2  invalid config or command line, or an output that cannot be written.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Any

from evf.cli import CommandFailed, add_overrides_argument
from evf.cli.options import add_request_arguments, request_options
from evf.request import OPTION_NAMES
from evf.settings import ModelOptions

EXIT_RETRYABLE = 3
"""``evf run``'s exit status when rows are left as retryable errors."""
EXIT_ROWS_FAILED = 4
"""``evf run``'s exit status when every row it ran failed, or more than ``max_error_rate`` of them."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT), as every ``evf`` command (128 + the signal's number, the shells' convention)."""


MANIFEST_HELP = """\
inputs:
  --images SOURCE --prompt TEXT   a folder, glob or prefix of images; no manifest needed
  --manifest URI                  Parquet, CSV or JSON Lines: one file, or a folder of *.parquet,
                                  *.csv and *.jsonl files (kinds mixed); one row each:
    image_url   path or URI of the image (relative paths: from the manifest's folder)   required
    image       or, in Parquet, the image itself: bytes, or Hugging Face's struct{{bytes, path}}
    prompt      what to segment                                                          required
    id          the row's id (default: file name + row number); resume keys on it
{options}
                request options per row (null: the job's default, defaults.* / the flags)
  --columns image_url=url,prompt=caption   when the manifest names them otherwise
  --columns image=img,prompt=text          a Hugging Face dataset's Parquet files
""".format(
    options=textwrap.fill(", ".join(OPTION_NAMES), 96, initial_indent="    ", subsequent_indent="    ")
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = MANIFEST_HELP
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "config",
        nargs="?",
        default=None,
        help="job config YAML (default: the embedded configs/local.yaml: local Ray, CPU, demo model, "
        "the sample manifest)",
    )
    parser.add_argument(
        "--manifest", help="Parquet, CSV or JSON Lines manifest: a file or a folder, any fsspec URI"
    )
    parser.add_argument(
        "--images",
        help="instead of a manifest: a folder, a glob or a prefix (s3://bucket/imgs/) of images; every "
        "image file under it is a row per prompt, its id the file's path relative to the folder",
    )
    parser.add_argument(
        "--prompt", dest="prompts", action="append", help="with --images: what to segment (repeatable)"
    )
    parser.add_argument(
        "--prompts", dest="prompts_file", help="with --images: a text file of prompts, one per line"
    )
    parser.add_argument(
        "--columns",
        type=_column_mapping,
        help="the manifest's names for the job's columns, e.g. image_url=url,prompt=caption (columns)",
    )
    parser.add_argument("--output", help="output root (masks/, metadata/, _job.json), any fsspec URI")
    parser.add_argument(
        "--model",
        help="checkpoint: evf-sam2-demo, a Hub id (YxZhang/evf-sam2-multitask), a folder or s3://...",
    )
    parser.add_argument("--overwrite", action="store_true", default=None, help="redo every row")
    parser.add_argument(
        "--overlays",
        action="store_true",
        default=None,
        help="also write overlays/<name>.jpg: each mask drawn over its image (overlays)",
    )
    retry = parser.add_mutually_exclusive_group()
    retry.add_argument(
        "--retry-errors",
        choices=("retryable", "all"),
        default=None,
        help="committed error rows to redo: the retryable ones (default) or all of them",
    )
    retry.add_argument(
        "--no-retry-errors", action="store_true", help="keep every committed error row as it is"
    )
    parser.add_argument(
        "--max-error-rate",
        type=float,
        metavar="RATE",
        help="exit 4 when more than this share (0..1) of the rows run are errors (default: when all "
        "are; max_error_rate)",
    )
    parser.add_argument("--actors", type=int, help="model actors (inference.actors)")
    parser.add_argument(
        "--num-gpus", type=float, help="GPUs per actor (inference.num_gpus; 0 = CPU; --device cuda: 1)"
    )
    parser.add_argument("--batch-size", type=int, help="images per model call (inference.batch_size)")
    parser.add_argument(
        "--device", help=f"{ModelOptions.model_fields['device'].description} (inference.device)"
    )
    parser.add_argument("--ray-address", help="existing Ray cluster: auto or ray://host:10001 (ray.address)")
    parser.add_argument("--grounding-model", help="GroundingDINO checkpoint for use_grounding_dino rows")
    add_request_arguments(
        parser.add_argument_group("request options (defaults.*: rows that do not set them)")
    )
    add_overrides_argument(
        parser, "override any config field, e.g. --set cpu.batch_size=64 --set defaults.mask_only=false"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress line")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate every row and read the commits, then say what a run would do (no Ray, no weights)",
    )
    parser.add_argument(
        "--ray-progress", action="store_true", default=None, help="Ray Data's per-operator progress bars too"
    )


def _column_mapping(text: str) -> dict[str, str]:
    """``image_url=url,prompt=caption`` -> ``{"image_url": "url", "prompt": "caption"}``."""
    pairs = [part.partition("=") for part in text.split(",") if part.strip()]
    if not pairs or any(not sep or not ours.strip() or not theirs.strip() for ours, sep, theirs in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: expected JOB_COLUMN=MANIFEST_COLUMN[,...]")
    return {ours.strip(): theirs.strip() for ours, _, theirs in pairs}


def _prompts(args: argparse.Namespace) -> list[str] | None:
    """--prompt values, then the lines of --prompts FILE (blank lines skipped)."""
    prompts = list(args.prompts or [])
    if args.prompts_file:
        from evf.io import read_bytes

        text = read_bytes(args.prompts_file).decode("utf-8")
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    return prompts or None


def _output(args: argparse.Namespace) -> str | None:
    """--output; for --images or --manifest without it, a folder beside that input (said on stderr):
    a user's input never lands in the config's output (the sample's, by default)."""
    source, flag = (args.images, "--images") if args.images else (args.manifest, "--manifest")
    if args.output or not source:
        return args.output
    from evf.pipelines.sources import default_output

    output = default_output(source)
    print(f"evf run: output {output} (beside {flag}; --output sets another)", file=sys.stderr)
    return output


def _num_gpus(args: argparse.Namespace) -> float | None:
    """--num-gpus; ``--device cuda`` without it means one GPU per actor."""
    if args.num_gpus is None and (args.device or "").startswith("cuda"):
        return 1
    return args.num_gpus


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "manifest": args.manifest,
        "images": args.images,
        "prompts": _prompts(args),
        "columns": args.columns,
        "output": _output(args),
        "model": args.model,
        "overwrite": args.overwrite,
        "overlays": args.overlays,
        "retry_errors": "none" if args.no_retry_errors else args.retry_errors,
        "max_error_rate": args.max_error_rate,
        "inference.actors": args.actors,
        "inference.num_gpus": _num_gpus(args),
        "inference.batch_size": args.batch_size,
        "inference.device": args.device,
        "ray.address": args.ray_address,
        "grounding.model": args.grounding_model,
        "progress": False if args.no_progress else None,
        "ray.progress_bars": args.ray_progress,
        **{f"defaults.{name}": value for name, value in request_options(args).items()},
    }


# Fields whose flag is not "--" + the field's last part (the rest: ``_flag_names``).
_FLAG_NAMES = {
    "prompts": "--prompt/--prompts",
    "ray.address": "--ray-address",
    "ray.progress_bars": "--ray-progress",
    "grounding.model": "--grounding-model",
    "progress": "--no-progress",
}


def _flag_names(flags: dict[str, Any]) -> dict[str, str]:
    """The flag that gave each field of ``_flags``, for errors to blame it."""
    return {key: _FLAG_NAMES.get(key, "--" + key.rsplit(".", 1)[-1].replace("_", "-")) for key in flags}


def command(args: argparse.Namespace) -> int:
    from evf.pipelines.config import load_config
    from evf.pipelines.job import JobError, run_job
    from evf.pipelines.summary import format_summary

    flags = _flags(args)
    config = load_config(args.config, args.overrides, flags, _flag_names(flags))
    if args.dry_run:
        from evf.pipelines.dryrun import dry_run, format_dry_run

        print(format_dry_run(dry_run(config)))
        return 0
    try:
        summary = run_job(config)
    except JobError as error:
        raise CommandFailed(f"job failed: {error}") from None
    except KeyboardInterrupt:
        print("evf run: interrupted; re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(format_summary(summary))
    if summary.ok or summary.empty:
        print(f"Masks written to {summary.layout.masks}/")
    failed = _too_many_errors(summary.this_run, config.max_error_rate)
    if failed:
        print(f"evf run: {failed}", file=sys.stderr)
        return EXIT_ROWS_FAILED
    return EXIT_RETRYABLE if summary.retryable else 0


def _too_many_errors(this_run: dict[str, int], max_error_rate: float | None) -> str | None:
    """Why this run's rows count as failed (exit 4), or None: every row it ran is an error, or more
    than ``max_error_rate`` of them are. A run with no row to do has not failed."""
    errors, rows = this_run.get("error", 0), sum(this_run.values())
    if not rows:
        return None
    if max_error_rate is None and errors < rows:
        return None
    if max_error_rate is not None and errors / rows <= max_error_rate:
        return None
    limit = "all of them" if max_error_rate is None else f"more than --max-error-rate {max_error_rate:g}"
    return (
        f"{errors} of the {rows} row(s) this run processed failed ({limit}); the errors by kind are "
        "above, every message in the metadata (status == 'error') or `evf review OUTPUT`"
    )
