"""``evf review OUTPUT [--manifest M] [-o PAGE.html]``: a static HTML review page of a job's output."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="the job's output (folder or URI holding metadata/ and masks/)")
    parser.add_argument(
        "--manifest", help="the manifest the job ran on: its mask_url column is drawn as ground truth"
    )
    parser.add_argument(
        "-o", "--page", help="where the page goes (default: OUTPUT/review.html; thumbnails beside it)"
    )
    parser.add_argument("--threads", type=int, default=8, help="thumbnails made at once (default: 8)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def command(args: argparse.Namespace) -> int:
    from evf.pipelines.review import write_review
    from evf.storage import Storage

    storage = Storage.from_environment()
    page = write_review(
        args.output,
        args.manifest,
        args.page,
        storage_options=storage.options(args.output),
        threads=args.threads,
        progress=not args.no_progress,
    )
    print(f"review page: {page} (open it in a browser; no server needed)")
    return 0
