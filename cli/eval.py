"""``evf eval --manifest M [--model ...]``: mIoU / cIoU by prompt kind, through the batch job.

Prints the table, then the JSON summary as the last line. Exit status 0, 1 (job or evaluation
failed) or 2 (config).
"""

from __future__ import annotations

import argparse
import json

from evf.cli import CommandFailed, add_overrides_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--manifest",
        required=True,
        help="manifest (Parquet, CSV or JSON Lines) with a mask_url column (ground truth)",
    )
    parser.add_argument(
        "--model", help="checkpoint: evf-sam2-demo, a Hub id, a folder or s3://... (default: the config's)"
    )
    parser.add_argument(
        "--output", help="keep the job's masks and metadata here (default: a temp dir, deleted)"
    )
    parser.add_argument("--config", help="job config YAML (default: configs/local.yaml)")
    add_overrides_argument(
        parser, "override a job config field, e.g. --set inference.batch_size=4 --set progress=false"
    )


def command(args: argparse.Namespace) -> int:
    from evf.pipelines.evaluate import EvalError, evaluate
    from evf.pipelines.job import JobError

    try:
        report = evaluate(args.manifest, args.model, args.output, args.config, args.overrides)
    except (JobError, EvalError) as error:
        raise CommandFailed(str(error)) from None
    print(f"model {report.model}  manifest {report.manifest}")
    print(f"job {report.job_s:.1f} s, scoring {report.score_s:.1f} s")
    print(report.format_table())
    print(json.dumps(report.to_dict()), flush=True)
    return 0
