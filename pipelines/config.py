"""``JobConfig``: what a batch job reads, runs and writes, loaded from YAML and validated strictly.

A config file is a YAML mapping with the fields below (see ``configs/*.yaml`` and docs/pipeline.md).
Unknown keys are errors (a typo must not silently fall back to a default). Relative local paths are
resolved against the current directory. Credentials never belong in a config file: S3 endpoint and
keys come from the standard AWS environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``...), which ``evf.io.storage_options_for`` merges in at run time.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from evf.config import (
    ConfigError,
    Overrides,
    StrictModel,
    apply_overrides,
    override_sources,
    read_yaml_mapping,
    validate_config,
)
from evf.errors import unknown_name
from evf.request import OPTION_NAMES, InvalidRequestError, parse_request
from evf.retry import DEFAULT_RETRY_POLICY, RetryPolicy
from evf.settings import DEFAULT_BOX_THRESHOLD, DEFAULT_TEXT_THRESHOLD, ModelOptions
from evf.storage import Storage, display_url, redact

__all__ = [
    "DEFAULT_CONFIG",
    "SAMPLE_MANIFEST",
    "SAMPLE_MANIFEST_ID",
    "ConfigError",
    "ActorRange",
    "CpuConfig",
    "GroundingConfig",
    "InferenceConfig",
    "JobConfig",
    "RayConfig",
    "load_config",
]

DEFAULT_CONFIG = Path(str(importlib.resources.files("evf.configs") / "local.yaml"))
"""The embedded default (the repository's configs/local.yaml, installed with the package): local
Ray, local folders, CPU, the demo model, the sample manifest."""
SAMPLE_MANIFEST_ID = "evf-sample"
"""The ``manifest`` value that names the sample manifest shipped with the package."""
SAMPLE_MANIFEST = Path(str(importlib.resources.files("evf.sample") / "manifest.parquet"))


class RayConfig(StrictModel):
    """Where the job runs."""

    address: str | None = Field(
        default=None,
        description="null: start a private local Ray instance (or reuse one already initialised in this "
        "process); 'auto': join the cluster on this machine; 'ray://host:10001': a remote cluster.",
    )
    num_cpus: float | None = Field(
        default=None, gt=0, description="Local Ray only: logical CPUs to offer (default: all cores)."
    )
    object_store_memory: int | None = Field(
        default=None, gt=0, description="Local Ray only: object store size in bytes (default: Ray's)."
    )
    runtime_env: dict[str, Any] | None = Field(
        default=None, description="Ray runtime_env for the job (e.g. pip packages on a cluster)."
    )
    progress_bars: bool = Field(
        default=False, description="Ray Data's per-operator progress bars (the job draws its own line)."
    )


class ActorRange(StrictModel):
    """An autoscaling actor pool: Ray Data starts ``min`` actors and adds up to ``max`` as work and
    the cluster's resources allow (``ActorPoolStrategy(min_size=, max_size=)``)."""

    min: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> ActorRange:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self


class InferenceConfig(ModelOptions):
    """The model stage: an actor pool, each actor loads the model once. ``device``, ``dtype``,
    ``mode`` and ``compile`` are the library's ``evf.settings.ModelOptions`` (in a job, ``auto``
    is cuda when ``num_gpus`` > 0)."""

    actors: Annotated[int, Field(ge=1)] | ActorRange = Field(
        default=1, description="Model actors (one model copy each): a number, or {min, max} to autoscale."
    )
    num_gpus: float = Field(default=0, ge=0, description="GPUs reserved per actor (0: CPU inference).")
    num_cpus: float = Field(
        default=1, gt=0, description="Logical CPUs reserved per actor; fractional values are fine."
    )
    batch_size: int = Field(
        default=8, ge=1, description="Images per model call (each with all of its prompts in the batch)."
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch intra-op threads per actor. null: on CPU, the machine's cores shared among "
        "the actors (at least 1); on GPU, the actor's CPU reservation rounded up.",
    )
    max_tasks_in_flight: int = Field(
        default=2, ge=1, description="Batches queued per actor (more hides latency, costs memory)."
    )

    @property
    def min_actors(self) -> int:
        return self.actors.min if isinstance(self.actors, ActorRange) else self.actors

    @property
    def max_actors(self) -> int:
        return self.actors.max if isinstance(self.actors, ActorRange) else self.actors


class CpuConfig(StrictModel):
    """The CPU stages: read + decode + resize (before the model) and post-process + encode + write (after)."""

    batch_size: int = Field(
        default=32,
        ge=1,
        description="Manifest rows per decode task. Rows naming the same image within one such batch "
        "share one read, one decode and one image embedding.",
    )
    read_rows: int = Field(
        default=2048,
        ge=1,
        description="Manifest rows per read task, at most (small manifests use smaller tasks): large, "
        "so that a resumed million-row job reads (and drops) its committed rows in a few hundred tasks.",
    )
    num_cpus: float = Field(default=0.5, gt=0, description="Logical CPUs reserved per CPU-stage task.")
    io_threads: int = Field(
        default=8, ge=1, description="Threads per task for object reads/writes (hides S3 latency)."
    )
    max_buffered_mb: int = Field(
        default=256,
        ge=16,
        description="Cap on data held between stages in Ray's object store (MB); bounds memory "
        "whatever the manifest size.",
    )


class RetriesConfig(StrictModel):
    """How transient storage faults are retried (``evf.retry``): each whole read, write or listing
    up to ``attempts`` times, waits doubling from ``first_wait_s`` to ``max_wait_s`` plus up to
    ``jitter_s`` of random jitter; each S3 request ``request_attempts`` times inside that. The
    defaults ride out outages of ~50 s; a row whose image or mask still cannot be read or written is
    committed as a retryable error. A commit (the metadata write) tries ``commit_attempts`` times:
    giving up there fails the job, so it holds on longer (~5 minutes by default)."""

    attempts: int = Field(default=DEFAULT_RETRY_POLICY.attempts, ge=1)
    commit_attempts: int = Field(default=20, ge=1)
    first_wait_s: float = Field(default=DEFAULT_RETRY_POLICY.first_wait_s, ge=0)
    max_wait_s: float = Field(default=DEFAULT_RETRY_POLICY.max_wait_s, ge=0)
    jitter_s: float = Field(default=DEFAULT_RETRY_POLICY.jitter_s, ge=0)
    request_attempts: int = Field(default=DEFAULT_RETRY_POLICY.request_attempts, ge=1)

    def policy(self) -> RetryPolicy:
        return RetryPolicy(**self.model_dump(exclude={"commit_attempts"}))

    def commit_policy(self) -> RetryPolicy:
        return dataclasses.replace(self.policy(), attempts=self.commit_attempts)


class GroundingConfig(StrictModel):
    """GroundingDINO for rows with ``use_grounding_dino: true`` (loaded by an actor only when needed)."""

    model: str | None = Field(default=None, description="GroundingDINO checkpoint (folder, URI or Hub id).")
    box_threshold: float = Field(default=DEFAULT_BOX_THRESHOLD, ge=0, le=1)
    text_threshold: float = Field(default=DEFAULT_TEXT_THRESHOLD, ge=0, le=1)


class JobConfig(StrictModel):
    """A batch segmentation job. ``manifest`` and ``output`` are fsspec URIs or local paths."""

    manifest: str = Field(
        description="Parquet, CSV or JSON Lines manifest: one file, or a folder of *.parquet, *.csv and "
        "*.jsonl (*.ndjson) files."
    )
    images: str | None = Field(
        default=None,
        description="Instead of a manifest: a folder, a glob or an object-store prefix of images; each "
        "image file under it is a row (per prompt), its id the file's path relative to the folder.",
    )
    prompts: list[str] = Field(
        default_factory=list,
        description="With images: the prompts asked of every image (one row per image and prompt).",
    )
    output: str = Field(description="Output root: masks/, metadata/ and _job.json go under it.")
    mask_name: Literal["key", "id"] = Field(
        default="key",
        description="How masks (and overlays) are named: masks/<key>.png (a hash of the request) or "
        "masks/<id>.png (the row's id, made safe as a path: other characters percent-encoded, a "
        "hash suffix for ids with capitals or too long). The metadata's mask_url says where each "
        "mask is either way; resume keys on key. With id, a changed row rewrites the same file.",
    )
    overlays: bool = Field(
        default=False,
        description="Also write overlays/<name>.jpg, each ok or empty row's mask drawn over its image.",
    )
    model: str = Field(
        default="evf-sam2-demo", description="Checkpoint: folder, fsspec URI, Hub id or evf-sam2-demo."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="The manifest's names for the job's columns, e.g. {image_url: url, prompt: caption} "
        "(img2dataset) or {image_url: image, prompt: text}.",
    )
    defaults: dict[str, Any] = Field(
        default_factory=dict,
        description="Request options for rows that do not set them (fal names: mask_only, blur_mask...).",
    )
    overwrite: bool = Field(default=False, description="Redo every row (deletes the previous outputs).")
    retry_errors: Literal["retryable", "all", "none"] = Field(
        default="retryable",
        description="Committed error rows a re-run redoes: the retryable ones (transient storage "
        "failures), all of them, or none.",
    )
    max_error_rate: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="evf run exits 4 when more than this share of the rows it processed are errors "
        "(0..1); null: only when every one of them is.",
    )
    retries: RetriesConfig = Field(default_factory=RetriesConfig)
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra fsspec options (e.g. client_kwargs). Credentials come from the environment.",
    )
    progress: bool = Field(
        default=True, description="The job's one-line progress (rows, statuses, rate, ETA)."
    )
    ray: RayConfig = Field(default_factory=RayConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    cpu: CpuConfig = Field(default_factory=CpuConfig)
    grounding: GroundingConfig = Field(default_factory=GroundingConfig)

    @field_validator("manifest", "output", "model", "images")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must be a non-empty path or URI")
        return None if value is None else value.strip()

    @field_validator("prompts")
    @classmethod
    def _prompts_not_blank(cls, value: list[str]) -> list[str]:
        prompts = [p.strip() for p in value]
        if any(not p for p in prompts):
            raise ValueError("a prompt must be a non-empty string")
        if len(set(prompts)) != len(prompts):
            raise ValueError("the same prompt is given twice")
        return prompts

    @model_validator(mode="after")
    def _images_have_prompts(self) -> JobConfig:
        from_member = "prompt" in self.columns
        if self.images is not None and not self.prompts and not from_member:
            raise ValueError(
                "images needs at least one prompt (--prompt TEXT, --prompts FILE, or for WebDataset "
                "shards --columns prompt=txt)"
            )
        if self.images is not None and self.prompts and from_member:
            raise ValueError("give prompts either as --prompt/--prompts or from a member (columns.prompt)")
        if self.prompts and self.images is None:
            raise ValueError("prompts are asked of images (--images SOURCE); a manifest has its own column")
        return self

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, value: dict[str, str]) -> dict[str, str]:
        allowed = ("id", "image_url", "image", "prompt", "mask_url", "kind", *OPTION_NAMES)
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise ValueError(
                "; ".join(f"{name!r}: {unknown_name(name, allowed, 'column')}" for name in unknown)
            )
        return dict(value)

    @field_validator("defaults")
    @classmethod
    def _valid_defaults(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(OPTION_NAMES))
        if unknown:
            raise ValueError(
                "; ".join(f"{name!r}: {unknown_name(name, OPTION_NAMES, 'option')}" for name in unknown)
            )
        try:
            parse_request({"prompt": "x", **value})
        except InvalidRequestError as error:
            raise ValueError(str(error).removeprefix("invalid request: ")) from None
        return dict(value)

    @model_validator(mode="after")
    def _device_matches_gpus(self) -> JobConfig:
        device = self.inference.device
        if device.startswith("cuda") and self.inference.num_gpus == 0:
            raise ValueError("inference.device=cuda needs inference.num_gpus > 0 (a GPU reserved per actor)")
        return self

    # -- derived values -----------------------------------------------------------------------
    @property
    def device(self) -> str:
        if self.inference.device == "auto":
            return "cuda" if self.inference.num_gpus > 0 else "cpu"
        return self.inference.device

    def model_options(self) -> ModelOptions:
        """What every model actor runs with (``device`` resolved for the actors' reservations)."""
        fields = ModelOptions.model_fields
        return ModelOptions(**{**self.inference.model_dump(include=set(fields)), "device": self.device})

    def torch_threads(self, node_cpus: float | None = None) -> int:
        """Threads each actor gives torch (see ``InferenceConfig.torch_threads``)."""
        if self.inference.torch_threads is not None:
            return self.inference.torch_threads
        if self.inference.num_gpus == 0:
            cores = node_cpus or os.cpu_count() or 1
            return max(1, int(cores) // self.inference.max_actors)
        return max(1, int(-(-self.inference.num_cpus // 1)))

    def resolved(self) -> JobConfig:
        """A copy with local paths made absolute (URIs and Hub ids unchanged)."""

        def absolute(value: str) -> str:
            if "://" in value or value.startswith("data:"):
                return value
            return os.path.abspath(os.path.expanduser(value))

        manifest = str(SAMPLE_MANIFEST) if self.manifest == SAMPLE_MANIFEST_ID else self.manifest
        model = self.model
        if os.path.exists(os.path.expanduser(model)):  # a local folder (not a Hub id or the demo name)
            model = absolute(model)
        images = None if self.images is None else absolute(self.images)
        return self.model_copy(
            update={
                "manifest": absolute(manifest),
                "output": absolute(self.output),
                "model": model,
                "images": images,
            }
        )

    def storage(self) -> Storage:
        """The job's storage options and retry policies, completed from this process's environment."""
        return Storage.from_environment(
            self.storage_options, self.retries.policy(), self.retries.commit_policy()
        )

    def public_dict(self) -> dict[str, Any]:
        """The config as plain data, safe to log and store (no credential, no password in a URL)."""
        data = self.model_dump(mode="json")
        data["storage_options"] = redact(self.storage_options)
        data["manifest"], data["output"] = display_url(self.manifest), display_url(self.output)
        if data["ray"].get("runtime_env"):
            data["ray"]["runtime_env"] = redact(data["ray"]["runtime_env"])
        return data


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Overrides | None = None,
    flags: Mapping[str, Any] | None = None,
    flag_names: Mapping[str, str] | None = None,
) -> JobConfig:
    """Read a YAML job config (default: :data:`DEFAULT_CONFIG`), apply ``--set`` ``overrides`` and
    then the command line's ``flags`` (dotted names; None values skipped), validate. An invalid
    field given by a flag is blamed on that flag (``flag_names``: dotted name -> ``--flag``).

    Raises:
        ConfigError: unreadable file, not YAML, or invalid fields (every problem is listed).
    """
    source = path if path is not None else DEFAULT_CONFIG
    data = apply_overrides(apply_overrides(read_yaml_mapping(source), overrides), flags)
    sources = {**override_sources(overrides), **override_sources(flags, flag_names)}
    return validate_config(JobConfig, data, f"job config {str(source)!r}", sources)
