"""``evf compact OUTPUT``: merge a job's many small commit files into a few large ones, crash-safely."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="the job's output (folder or URI holding metadata/)")
    parser.add_argument(
        "--rows-per-file", type=int, default=None, help="rows per merged file (default: 250,000)"
    )


def command(args: argparse.Namespace) -> int:
    from evf.pipelines.compact import ROWS_PER_FILE, compact
    from evf.storage import Storage

    options = Storage.from_environment().options(args.output)
    done = compact(args.output, options, args.rows_per_file or ROWS_PER_FILE)
    print(
        f"{args.output}: {done.files_read} metadata file(s) -> {done.files_written}; {done.rows} rows, "
        f"{done.duplicates_dropped} superseded row(s) dropped"
    )
    return 0
