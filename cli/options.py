"""Flags that several subcommands share: the model settings and the request options.

Both are the library's definitions (``evf.settings.ModelSettings``, ``evf.request.SegmentRequest``)
with their defaults and allowed values; nothing here loads torch.
"""

from __future__ import annotations

import argparse
from typing import Any

from evf.request import OPTION_DEFAULTS
from evf.settings import DTYPES, MODES, ModelSettings

__all__ = ["add_model_arguments", "add_request_arguments", "model_settings", "request_options"]

# The option flags' help; the defaults and ranges come from evf.request.
_FLAG_HELP = {
    "negative_prompt": "areas to exclude (subtracted)",
    "semantic_type": "semantic-level segmentation ([semantic] prefix; -multitask checkpoints)",
    "mask_only": "write the mask (default); --no-mask-only writes the RGBA masked image",
    "use_grounding_dino": "detect boxes with GroundingDINO and segment them",
    "revert_mask": "invert the mask",
    "fill_holes": "fill holes in the mask",
    "blur_mask": "Gaussian blur kernel, 0 or odd <= 49",
    "expand_mask": "dilate by this many pixels, 0..20",
    "min_score": "a predicted IoU below this makes the result empty (0..1)",
    "min_area": "a final mask of fewer pixels makes the result empty",
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model / --device / --dtype / --mode: the library's ``ModelSettings``, with its defaults."""
    fields = ModelSettings.model_fields

    def option(name: str, **kwargs: object) -> None:
        default = fields[name].default
        described = fields[name].description
        parser.add_argument(f"--{name}", default=default, help=f"{described} (default: {default})", **kwargs)

    option("model")
    option("device")
    option("dtype", choices=DTYPES)
    option("mode", choices=MODES)


def model_settings(args: argparse.Namespace) -> ModelSettings:
    """The flags' ``ModelSettings`` (invalid values: a ``ConfigError`` naming the field)."""
    from evf.config import validate_config

    flags = {"model": args.model, "device": args.device, "dtype": args.dtype, "mode": args.mode}
    return validate_config(ModelSettings, flags, "model flags")


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per request option (``--negative-prompt``, ``--fill-holes``/``--no-fill-holes``, ...);
    an unset flag leaves the option to the request's (or the job's) default."""
    for name, help_text in _FLAG_HELP.items():
        default = OPTION_DEFAULTS[name]
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            shown = f"{help_text} (default: {str(default).lower()})"
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=shown)
        else:
            kind = {"min_score": float, "negative_prompt": str}.get(name, int)
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def request_options(args: argparse.Namespace) -> dict[str, Any]:
    """The request options the flags set (unset flags left out)."""
    return {name: getattr(args, name) for name in _FLAG_HELP if getattr(args, name, None) is not None}
