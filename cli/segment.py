"""``evf segment IMAGE... --prompt ... -o OUT``: one or more images, every fal option, a summary line
per image.

``-o`` names the output by its suffix: ``.png`` (the mask, or with ``--no-mask-only`` the RGBA image)
or ``.jpg``/``.jpeg`` (the mask as a JPEG; a JPEG has no alpha channel, so ``--no-mask-only`` with it
is refused). With several images, or an ``-o`` that ends in ``/`` or is an existing folder, ``-o`` is
a folder that gets ``<image name>.png`` per image. ``--overlay`` writes the mask drawn over the image
(``evf.overlay``), a file (``.jpg``/``.jpeg``/``.png``) or, like ``-o``, a folder (``<image name>.jpg``).
Every output name is checked before the model loads.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from evf.cli.options import add_model_arguments, add_request_arguments, model_settings, request_options
from evf.errors import UserError
from evf.storage import join_uri, uri_name, uri_protocol

OUTPUT_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}
"""``-o`` / ``--overlay`` file suffixes and the format each writes."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image path(s) or URI(s) (local, s3://..., data:...)"
    )
    parser.add_argument("--prompt", required=True, help="what to segment")
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        help="one image: the file to write, .png (mask or RGBA) or .jpg/.jpeg (mask); several images "
        "(or a path ending in /): the folder that gets <image name>.png per image",
    )
    parser.add_argument(
        "--overlay",
        metavar="FILE",
        help="also write the mask drawn over the image: .jpg/.jpeg or .png (a folder, like -o, for "
        "several images: <image name>.jpg)",
    )
    add_request_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--grounding-model",
        default=None,
        help="GroundingDINO checkpoint for --use-grounding-dino: a folder, an fsspec URI or a Hub id "
        "(IDEA-Research/grounding-dino-tiny)",
    )
    add_model_arguments(parser)


def request_from_args(args: argparse.Namespace, image: str) -> dict[str, Any]:
    """The fal request the flags name for ``image``; unset flags keep fal's defaults."""
    return {"prompt": args.prompt, "image_url": image, **request_options(args)}


@dataclass(frozen=True)
class Target:
    """Where one image's outputs go: ``output`` (PNG or JPEG by ``output_format``), ``overlay``."""

    image: str
    output: str
    output_format: str
    overlay: str | None = None
    overlay_format: str | None = None


def _is_folder(path: str, several: bool) -> bool:
    return several or path.endswith(("/", os.sep)) or (not uri_protocol(path) and os.path.isdir(path))


def _file_format(path: str, flag: str) -> str:
    """The format a file's suffix names (``OUTPUT_FORMATS``); anything else is a user error."""
    suffix = os.path.splitext(uri_name(path))[1].lower()
    if suffix not in OUTPUT_FORMATS:
        allowed = ", ".join(OUTPUT_FORMATS)
        named = f"suffix {suffix!r}" if suffix else "no suffix"
        raise UserError(f"{flag} {path!r} has {named}: write {allowed}, or a folder (ending in /)")
    return OUTPUT_FORMATS[suffix]


def plan_outputs(images: list[str], output: str, overlay: str | None, mask_only: bool) -> list[Target]:
    """Every image's output paths, checked before any work (a ``UserError``, exit 2, otherwise): the
    suffixes, no RGBA output in a JPEG, no two images written to one file of a folder."""
    several = len(images) > 1
    for path, flag in ((output, "-o"), (overlay, "--overlay")):
        if several and path and os.path.splitext(uri_name(path))[1].lower() in OUTPUT_FORMATS:
            raise UserError(
                f"{flag} {path!r} is a file, but {len(images)} images need a folder (ending in /)"
            )
    to_folder = _is_folder(output, several)
    overlay_folder = overlay is not None and _is_folder(overlay, several)
    output_format = "png" if to_folder else _file_format(output, "-o")
    if output_format == "jpeg" and not mask_only:
        raise UserError(
            f"-o {output!r}: a JPEG cannot hold the RGBA output's alpha (--no-mask-only); write a .png"
        )
    overlay_format = (
        None if overlay is None else "jpeg" if overlay_folder else _file_format(overlay, "--overlay")
    )
    stems = [os.path.splitext(uri_name(image))[0] or f"image-{n + 1}" for n, image in enumerate(images)]
    clashes: dict[str, list[str]] = {}
    for stem, image in zip(stems, images, strict=True):
        clashes.setdefault(stem.lower(), []).append(image)
    clashing = [names for names in clashes.values() if len(names) > 1]
    if clashing and (to_folder or overlay_folder):
        shown = ", ".join(repr(name) for name in clashing[0])
        raise UserError(f"images {shown} would be written to the same file; segment them separately")
    targets = []
    for stem, image in zip(stems, images, strict=True):
        path = join_uri(output, f"{stem}.png") if to_folder else output
        drawn = None
        if overlay is not None:
            drawn = join_uri(overlay, f"{stem}.jpg") if overlay_folder else overlay
        targets.append(Target(image, path, output_format, drawn, overlay_format))
    return targets


def command(args: argparse.Namespace) -> int:
    from evf.engine import InferenceEngine
    from evf.io import as_rgb_array, encode_jpeg, encode_png, write_bytes
    from evf.overlay import overlay
    from evf.request import parse_request
    from evf.segment import segment

    requests = [parse_request(request_from_args(args, image)) for image in args.images]
    targets = plan_outputs(args.images, args.output, args.overlay, requests[0].mask_only)
    encoders = {"png": encode_png, "jpeg": encode_jpeg}
    engine = InferenceEngine.load(model_settings(args))
    for request, target in zip(requests, targets, strict=True):
        start = time.perf_counter()
        image = as_rgb_array(target.image)
        result = segment(image, request, engine, detector=args.grounding_model)
        elapsed = time.perf_counter() - start
        write_bytes(target.output, encoders[target.output_format](result.image))
        if target.overlay is not None and target.overlay_format is not None:
            drawn = overlay(image, result.mask >= 128)
            write_bytes(target.overlay, encoders[target.overlay_format](drawn))
        if args.json:
            record = result.record()
            record["instances"] = None if result.instances is None else len(result.instances)
            paths = {"image": target.image, "output": target.output, "overlay": target.overlay}
            print(json.dumps({**paths, **record, "seconds": round(elapsed, 3)}))
        else:
            x, y, w, h = result.bbox
            print(
                f"{target.output}: score {result.score:.3f}, area {result.area} px, "
                f"bbox x={x} y={y} w={w} h={h}{' (empty)' if result.empty else ''}, {elapsed:.2f} s"
            )
    return 0
