"""The one config mechanism of ``evf run``, ``evf eval`` and ``evf train``: strict YAML + ``--set``.

A config file is a YAML mapping validated by a pydantic model whose sections forbid unknown keys
(a typo must not silently fall back to a default). ``--set KEY=VALUE`` overrides any field by its
dotted name, the value parsed as YAML. Every problem is reported in one :class:`ConfigError`
that names the file, each field and what is wrong.
"""

from __future__ import annotations

import copy
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from evf.errors import UserError, unknown_name
from evf.request import short_repr

__all__ = [
    "ConfigError",
    "Overrides",
    "StrictModel",
    "apply_overrides",
    "load_model_config",
    "override_sources",
    "read_yaml_mapping",
    "validate_config",
]

Model = TypeVar("Model", bound=BaseModel)
Overrides = Mapping[str, Any] | Sequence[str]


class ConfigError(UserError, ValueError):
    """A config is unreadable or invalid; the message names the file, the field and what is allowed."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def read_yaml_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw mapping of a YAML config file (an empty file is ``{}``), not yet validated."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config {source!r}: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"config {source!r} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {source!r}: expected a mapping of fields, got {type(data).__name__}")
    return data


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: Mapping[str, Any], overrides: Overrides | None) -> dict[str, Any]:
    """A copy of ``data`` with overrides applied.

    ``overrides`` is a mapping of dotted names to values (``{"inference.actors": 2}``; None values are
    skipped) or ``KEY=VALUE`` strings whose values are parsed as YAML (``inference.batch_size=4``).
    """
    result = copy.deepcopy(dict(data))
    if overrides is None:
        return result
    if isinstance(overrides, Mapping):
        items = [(k, v) for k, v in overrides.items() if v is not None]
    else:
        items = []
        for text in overrides:
            key, sep, raw = text.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. inference.batch_size=4")
            try:
                items.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
            except yaml.YAMLError as error:
                raise ConfigError(f"--set {text!r}: value is not valid YAML ({error})") from None
    for key, value in items:
        _set_dotted(result, key, value)
    return result


def override_sources(
    overrides: Overrides | None, flag_names: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Where each overridden dotted field was given, for errors to name: ``--set KEY=VALUE`` (the
    text as typed, clipped), or for a mapping of command-line flags the flag (``flag_names``)."""
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        names = flag_names or {}
        return {k: names.get(k, f"--set {k}") for k, v in overrides.items() if v is not None}
    sources = {}
    for text in overrides:
        shown = text if len(text) <= 60 else text[:57] + "..."
        sources[text.partition("=")[0].strip()] = f"--set {shown}"
    return sources


def _section_fields(model: type[BaseModel], path: Sequence[Any]) -> list[str] | None:
    """The field names of the config section at ``path`` of ``model`` (None: not a section)."""
    node: type[BaseModel] = model
    for part in path:
        field = node.model_fields.get(str(part))
        if field is None:
            return None
        kinds = (field.annotation, *typing.get_args(field.annotation))
        section = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
        if section is None:
            return None
        node = section
    return list(node.model_fields)


def _format_validation_error(
    error: ValidationError, what: str, model: type[BaseModel], sources: Mapping[str, str]
) -> str:
    lines = []
    for item in error.errors():
        loc = item.get("loc", ())
        location = ".".join(str(part) for part in loc) or "(top level)"
        message = item.get("msg", "invalid")
        if item.get("type") == "extra_forbidden":
            known = _section_fields(model, loc[:-1])
            message = unknown_name(str(loc[-1]), known) if known else "unknown field"
        elif item.get("type") == "missing":
            message = "required field is missing"
        given = item.get("input")
        shown = (
            "" if item.get("type") == "missing" or isinstance(given, dict) else f" (got {short_repr(given)})"
        )
        source = sources.get(location) or ", ".join(
            v for k, v in sources.items() if k.startswith(f"{location}.")
        )
        where = f" (from {source})" if source else ""
        lines.append(f"  {location}{where}: {message}{shown}")
    return f"invalid {what}:\n" + "\n".join(lines)


def validate_config(
    model: type[Model], data: Mapping[str, Any], what: str, sources: Mapping[str, str] | None = None
) -> Model:
    """``model`` validated from ``data``; ``what`` names the config in errors ("job config 'x.yaml'"),
    ``sources`` where overridden fields were given (``override_sources``), so an error names the flag."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, what, model, sources or {})) from None


def load_model_config(
    model: type[Model],
    path: str | os.PathLike[str],
    overrides: Overrides | None = None,
    kind: str = "config",
) -> Model:
    """Read a YAML file, apply ``overrides``, validate into ``model``; raises :class:`ConfigError`."""
    data = apply_overrides(read_yaml_mapping(path), overrides)
    return validate_config(model, data, f"{kind} {str(path)!r}", override_sources(overrides))
