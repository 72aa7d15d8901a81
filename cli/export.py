"""``evf export coco|labelstudio OUTPUT -o FILE``: a job's masks for annotation tools.

``coco``: COCO instance segmentation (RLE masks, area, bbox, score, categories), as CVAT and FiftyOne
import it. ``labelstudio``: Label Studio tasks with the masks as brush pre-annotations. A row's
category is its prompt, or a manifest column (``--category-column``), mapped through
``--categories MAP.yaml`` (``{"the red car": car}``) when given.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    coco = formats.add_parser("coco", help="COCO instance segmentation JSON")
    labelstudio = formats.add_parser("labelstudio", help="Label Studio tasks with brush pre-annotations")
    for sub in (coco, labelstudio):
        sub.add_argument("output", help="the job's output (folder or URI holding metadata/ and masks/)")
        sub.add_argument("-o", "--file", required=True, help="the JSON file to write (any fsspec URI)")
        sub.add_argument("--categories", help="YAML/JSON map {prompt or column value: category}")
        sub.add_argument("--category-column", help="manifest column that names each row's category")
        sub.add_argument("--manifest", help="the manifest the job ran on (for --category-column)")
        sub.add_argument("--image-root", help="write image paths relative to this folder")
    labelstudio.add_argument("--from-name", default="label", help="the BrushLabels name (default: label)")
    labelstudio.add_argument("--to-name", default="image", help="the Image name (default: image)")
    labelstudio.add_argument("--image-base-url", help="prefix for image URLs Label Studio can fetch")


def command(args: argparse.Namespace) -> int:
    from evf.pipelines.export import write_coco, write_labelstudio
    from evf.pipelines.job_rows import load_category_map
    from evf.storage import Storage

    storage = Storage.from_environment().options(args.output)
    options: dict[str, Any] = {
        "categories": load_category_map(args.categories, storage) if args.categories else None,
        "category_column": args.category_column,
        "manifest": args.manifest,
        "storage_options": storage,
        "image_root": args.image_root,
    }
    if args.format == "coco":
        coco = write_coco(args.file, args.output, **options)
        print(f"{args.file}: {len(coco['images'])} images, {len(coco['annotations'])} annotations")
    else:
        extra = {"from_name": args.from_name, "to_name": args.to_name, "image_base_url": args.image_base_url}
        tasks = write_labelstudio(args.file, args.output, **options, **extra)
        print(f"{args.file}: {len(tasks)} Label Studio tasks")
    return 0
