"""``evf run [CONFIG] [--manifest URI] [--output URI] [--model URI] ...``: the batch job.

Exit status: 0 when the job completed (rows that failed are ``error`` rows in the metadata, not a
failure of the job), 1 when the job itself failed, 2 for an invalid config or command line.
"""

from __future__ import annotations

import argparse
from typing import Any

from evf.cli import CommandFailed, add_overrides_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config",
        nargs="?",
        default=None,
        help="job config YAML (default: the embedded configs/local.yaml: local Ray, CPU, demo model, "
        "the sample manifest)",
    )
    parser.add_argument("--manifest", help="Parquet manifest: a file or a folder, any fsspec URI")
    parser.add_argument("--output", help="output root (masks/, metadata/, _job.json), any fsspec URI")
    parser.add_argument(
        "--model",
        help="checkpoint: evf-sam2-demo, a Hub id (YxZhang/evf-sam2-multitask), a folder or s3://...",
    )
    parser.add_argument("--overwrite", action="store_true", default=None, help="redo every row")
    parser.add_argument("--actors", type=int, help="model actors (inference.actors)")
    parser.add_argument("--num-gpus", type=float, help="GPUs per actor (inference.num_gpus; 0 = CPU)")
    parser.add_argument("--batch-size", type=int, help="images per model call (inference.batch_size)")
    parser.add_argument("--device", help="auto | cpu | cuda (inference.device)")
    parser.add_argument("--ray-address", help="existing Ray cluster: auto or ray://host:10001 (ray.address)")
    parser.add_argument("--grounding-model", help="GroundingDINO checkpoint for use_grounding_dino rows")
    add_overrides_argument(
        parser, "override any config field, e.g. --set cpu.batch_size=64 --set defaults.mask_only=false"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress line")
    parser.add_argument(
        "--ray-progress", action="store_true", default=None, help="Ray Data's per-operator progress bars too"
    )


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "manifest": args.manifest,
        "output": args.output,
        "model": args.model,
        "overwrite": args.overwrite,
        "inference.actors": args.actors,
        "inference.num_gpus": args.num_gpus,
        "inference.batch_size": args.batch_size,
        "inference.device": args.device,
        "ray.address": args.ray_address,
        "grounding.model": args.grounding_model,
        "progress": False if args.no_progress else None,
        "ray.progress_bars": args.ray_progress,
    }


def command(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.job import JobError, run_job
    from pipelines.summary import format_summary

    config = load_config(args.config, args.overrides, _flags(args))
    try:
        summary = run_job(config)
    except JobError as error:
        raise CommandFailed(f"job failed: {error}") from None
    except KeyboardInterrupt:
        raise CommandFailed("interrupted; re-run the same command to resume") from None
    print(format_summary(summary))
    print(f"Masks written to {summary.masks_uri}/")
    return 0
