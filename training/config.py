"""``TrainConfig``: the YAML recipe of an ``evf train`` run, validated with pydantic.

A config names the model (new sizes, or ``init_from`` an existing checkpoint), the data (a
Parquet manifest or the synthetic scene generator), which parts train, the optimiser and loss,
and the schedule. See ``configs/train-demo.yaml`` for a complete example and ``docs/training.md``
for every field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from evf.config import Overrides, StrictModel, load_model_config
from evf.model.config import EvfSam2Config

Part = Literal["beit3", "projector", "mask_decoder", "prompt_encoder", "image_encoder"]
ALL_PARTS: tuple[Part, ...] = ("beit3", "projector", "mask_decoder", "prompt_encoder", "image_encoder")
_NECK_D_MODEL = re.compile(r"^\+*model\.image_encoder\.neck\.d_model=(\d+)$")


class TokenizerSpec(StrictModel):
    """Where the tokenizer comes from when the model is new (``init_from`` brings its own).

    folder: existing tokenizer files to copy; None builds a BPE model from the training prompts
        (``evf.training.tokenizer.build_tokenizer``) with at most ``vocab_size`` pieces.
    """

    folder: str | None = None
    vocab_size: int = Field(256, ge=16)


class SyntheticSpec(StrictModel):
    """Scenes ``0..count-1`` of ``evf.synthetic.generate_scene(seed, index)``, generated on the fly.

    every_phrase: train on every phrase that names something in a scene (each referring phrase of
        each object, each group, background) rather than only the expressions the generator drew.
    every_position: with every_phrase, also the position phrase ("the circle on the left") of
        every object that shares its description with one other, not only where nothing shorter
        names it.
    no_article_share: the share of referring phrases trained without their leading "the".
    """

    seed: int
    count: int = Field(gt=0)
    every_phrase: bool = False
    every_position: bool = False
    no_article_share: float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _position_needs_every_phrase(self) -> SyntheticSpec:
        if self.every_position and not self.every_phrase:
            raise ValueError("every_position adds to every_phrase's targets: set every_phrase: true too")
        return self


class DataSpec(StrictModel):
    """Training data: exactly one of ``manifest`` and ``synthetic``.

    manifest: URI of a Parquet file with columns image_url, prompt, mask_url and optionally
        negative_prompt, semantic_type (rows with a negative prompt are skipped: their mask is a
        difference of two objects, not the mask of either prompt).
    prompts_per_image: at most this many of an image's prompts per step (a random subset).
    workers: DataLoader worker processes (0 = load in the training process).
    """

    manifest: str | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict)
    synthetic: SyntheticSpec | None = None
    prompts_per_image: int = Field(8, gt=0)
    workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.manifest is None) == (self.synthetic is None):
            raise ValueError("set exactly one of data.manifest and data.synthetic")
        return self


class OptimizerSpec(StrictModel):
    """AdamW with linear warmup from 0, then cosine decay to ``lr * min_lr_ratio`` at the last step.

    ``lr_scale`` multiplies the learning rate of some parts (e.g. ``{image_encoder: 0.1}``); the
    other trained parts use ``lr``.
    """

    lr: float = Field(1e-4, gt=0)
    lr_scale: dict[Part, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)


class InitSpec(StrictModel):
    """How the weights start, beyond what ``evf train`` always does for a new model (sine-cosine
    Hiera positions, a scale-keeping projector): see ``evf.training.init``.

    mimetic_attention: parts whose self-attention gets the mimetic initialisation (new models): per
        head ``W_q^T W_k ~ mimetic_qk[0] Z + mimetic_qk[1] I`` (query/key biases 0) and
        ``W_v^T W_o^T ~ mimetic_vo[0] Z - mimetic_vo[1] I`` where the value path keeps the width.
    dense_head: ``new`` (a fresh training-only dense head) or ``init_from`` (a fine-tune: start it
        from the one saved in ``init_from``'s ``trainer_state.pt``, for the kinds both classify, so
        that its first steps do not send a random head's gradients into a trained encoder).
    """

    mimetic_attention: list[Literal["image_encoder", "beit3"]] = Field(default_factory=list)
    mimetic_qk: tuple[float, float] = (0.7, 0.7)
    mimetic_vo: tuple[float, float] = (0.4, 0.4)
    dense_head: Literal["new", "init_from"] = "new"


class LossSpec(StrictModel):
    """Weights of the loss terms (see ``evf.training.losses``)."""

    bce: float = Field(1.0, ge=0)
    dice: float = Field(1.0, ge=0)
    iou: float = Field(1.0, ge=0)
    # > 0: the training-only DenseHead's cross-entropies on the synthetic scenes' per-pixel shape
    # and colour labels (evf.training.dense_head)
    dense: float = Field(0.0, ge=0)
    # what the dense head classifies: size ("small"/"big", from the object's extent) is off in the
    # demo's stage 1, which was trained before it existed
    dense_labels: list[Literal["shape", "colour", "size"]] = Field(
        default_factory=lambda: ["shape", "colour"], min_length=1
    )
    # > 0: the training-only LocationHead's cross-entropy on which cells of a coarse grid hold each
    # prompt's target, read from the prompt embedding (evf.training.location_head)
    location: float = Field(0.0, ge=0)


class TrainConfig(StrictModel):
    """A complete training recipe.

    Exactly one of ``model`` (a config.json-like dict with ``beit3`` and ``sam2`` objects; a new,
    randomly initialised model) and ``init_from`` (any checkpoint name that ``EvfSam2Predictor``
    accepts; fine-tuning). ``beit3.vocab_size`` may be left out of ``model``: it then follows the
    tokenizer. ``out_dim`` defaults to the neck ``d_model`` of the SAM 2 overrides.
    """

    output_dir: str
    model: dict[str, Any] | None = None
    init_from: str | None = None
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    data: DataSpec
    train: list[Part] = Field(default_factory=lambda: list(ALL_PARTS), min_length=1)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    init: InitSpec = Field(default_factory=InitSpec)
    loss: LossSpec = Field(default_factory=LossSpec)
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0, description="images per step; each brings up to prompts_per_image prompts")
    checkpoint_every: int = Field(500, gt=0)
    keep_checkpoints: int | None = Field(2, gt=0, description="newest checkpoints kept; None keeps all")
    log_every: int = Field(10, gt=0)
    seed: int = 0
    device: str = "cpu"
    threads: int | None = Field(None, gt=0, description="torch.set_num_threads; None keeps the default")

    @field_validator("train")
    @classmethod
    def _unique_parts(cls, parts: list[Part]) -> list[Part]:
        if len(set(parts)) != len(parts):
            raise ValueError(f"parts listed twice: {parts}")
        return parts

    @field_validator("model")
    @classmethod
    def _model_sizes(cls, model: dict[str, Any] | None) -> dict[str, Any] | None:
        if model is None:
            return None
        missing = [key for key in ("beit3", "sam2") if key not in model]
        if missing:
            raise ValueError(f"model needs the size objects {missing} (see config.json of the fixtures)")
        filled = fill_model_defaults(model, vocab_size=model["beit3"].get("vocab_size", 1))
        try:
            EvfSam2Config.from_dict(filled)
        except (TypeError, ValueError, KeyError) as err:
            raise ValueError(f"invalid model sizes: {err}") from err
        return model

    @model_validator(mode="after")
    def _model_or_checkpoint(self) -> TrainConfig:
        if (self.model is None) == (self.init_from is None):
            raise ValueError("set exactly one of model (a new model) and init_from (a checkpoint)")
        if self.init_from is not None and self.init.mimetic_attention:
            raise ValueError(
                "init.mimetic_attention initialises a new model; init_from loads trained weights"
            )
        if self.init.dense_head == "init_from" and (self.init_from is None or self.loss.dense == 0):
            raise ValueError(
                "init.dense_head: init_from starts the training-only dense head from init_from's "
                "checkpoint: it needs init_from and loss.dense > 0"
            )
        if self.loss.dense > 0 and (self.data.synthetic is None or "image_encoder" not in self.train):
            raise ValueError(
                "loss.dense trains the image encoder on the synthetic scenes' shape and colour labels: "
                "it needs data.synthetic and image_encoder in train"
            )
        if self.loss.location > 0 and not {"beit3", "projector"} & set(self.train):
            raise ValueError(
                "loss.location trains the prompt embedding to say where its target is: "
                "it needs beit3 or projector in train"
            )
        untrained = sorted(set(self.optimizer.lr_scale) - set(self.train))
        if untrained:
            raise ValueError(f"optimizer.lr_scale names parts that are not trained: {', '.join(untrained)}")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Overrides | None = None) -> TrainConfig:
        """Read and validate a YAML recipe with ``--set`` overrides; every problem is listed in one
        ``evf.config.ConfigError``."""
        return load_model_config(cls, path, overrides, kind="training config")


def fill_model_defaults(model: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """The config.json dict of a new model: ``vocab_size`` and ``out_dim`` filled in when absent."""
    filled = dict(model)
    filled["beit3"] = {"vocab_size": vocab_size, **model["beit3"]}
    if "out_dim" not in filled:
        for override in model["sam2"].get("overrides", ()):
            if match := _NECK_D_MODEL.match(override):
                filled["out_dim"] = int(match.group(1))
    return filled
