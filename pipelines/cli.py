"""``evf run [CONFIG] [--manifest URI] [--output URI] [--model URI] ...``: the batch job's command line.

Exit codes: 0 when the job completed (rows that failed are ``error`` rows in the metadata, not a
failure of the job), 1 when the job itself failed, 2 for an invalid config or command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

log = logging.getLogger("evf.run")

# Their DEBUG logs print request headers (the access key id is in the Authorization header):
# never below INFO, even with ``evf -v``, so that credentials stay out of the job's logs.
QUIET_LIBRARIES = ("botocore", "aiobotocore", "boto3", "s3fs", "urllib3", "fsspec", "aiohttp")


def add_overrides_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``, for ``load_config``'s overrides."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text
    )


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
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
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
    }


def command(args: argparse.Namespace) -> int:
    from pipelines.config import (
        DEFAULT_CONFIG,
        ConfigError,
        apply_overrides,
        config_from_dict,
        read_config_data,
    )
    from pipelines.segment_job import JobError, format_summary, run_job

    for name in QUIET_LIBRARIES:
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.getEffectiveLevel(), logging.INFO))
    try:
        data = apply_overrides(read_config_data(args.config), args.overrides)
        data = apply_overrides(data, _flag_overrides(args))
        config = config_from_dict(data, source=repr(str(args.config or DEFAULT_CONFIG)))
    except ConfigError as error:
        print(f"evf run: {error}", file=sys.stderr)
        return 2
    try:
        summary = run_job(config)
    except ConfigError as error:
        print(f"evf run: {error}", file=sys.stderr)
        return 2
    except JobError as error:
        print(f"evf run: job failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("evf run: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    print(format_summary(summary))
    if summary.is_demo_model:
        print(
            "Note: these masks come from the synthetic demo model. For real images pass "
            "--model YxZhang/evf-sam2-multitask, a checkpoint folder, or s3://bucket/checkpoint/"
        )
    print(f"Masks written to {summary.masks_uri}/")
    return 0
