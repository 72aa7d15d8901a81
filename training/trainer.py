"""The training loop of ``evf train``: AdamW, warmup + cosine, BCE + Dice, resumable checkpoints.

One step takes ``batch_size`` images with up to ``prompts_per_image`` prompts each and runs the
model's own inference stages, so that training sees exactly the numerics of inference:
``encode_images`` once per image, ``encode_prompts`` for all prompts in one padded batch, and
``decode_masks`` with the predictor's mode (multitask: 3 outputs; legacy: 1). Inputs come from
``evf.transforms`` through ``TrainDataset``, as in ``EvfSam2Predictor.prepare_image``.

Output folder layout::

    output_dir/
      config.yaml               the validated recipe of this run
      tokenizer/                built tokenizer files (new models without tokenizer.folder)
      train_log.jsonl           one line per log_every steps: step, loss terms, IoU, lr, seconds
      checkpoint-<step>/        official checkpoint layout (config.json, model.safetensors,
                                tokenizer files) + trainer_state.pt (float32 weights, optimiser,
                                scheduler, RNG, step): a re-run resumes from the newest one
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from evf.checkpoints import resolve_checkpoint
from evf.config import Overrides
from evf.model.checkpoint import load_model, save_checkpoint
from evf.model.config import EvfSam2Config, resolve_mode
from evf.model.evf_sam2 import EvfSam2Model
from evf.tokenizer import SPM_FILE, EvfTokenizer
from evf.training.config import DataSpec, Part, TrainConfig, fill_model_defaults
from evf.training.data import (
    ImageSource,
    ManifestImages,
    StepBatches,
    SyntheticScenes,
    TrainDataset,
    TrainSample,
)
from evf.training.dense_head import DenseHead
from evf.training.init import (
    beit3_attention,
    hiera_attention,
    init_image_encoder_positions,
    init_projector,
    mimetic_init,
)
from evf.training.location_head import LocationHead
from evf.training.losses import mask_losses
from evf.training.tokenizer import build_tokenizer, embedding_rows
from evf.transforms import Preprocessor, normalize_sam

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"
# Parameter name prefixes of each trainable part. SAM 2's memory modules are never used by
# single-image segmentation and always stay frozen.
PART_PREFIXES: dict[Part, tuple[str, ...]] = {
    "beit3": ("mm_extractor.",),
    "projector": ("text_hidden_fcs.",),
    "mask_decoder": ("visual_model.sam_mask_decoder.",),
    "prompt_encoder": ("visual_model.sam_prompt_encoder.",),
    "image_encoder": ("visual_model.image_encoder.", "visual_model.no_mem_embed"),
}


def train(config_path: str, resume: bool = True, overrides: Overrides | None = None) -> Path:
    """Train as the YAML recipe at ``config_path`` (with ``--set`` ``overrides``) says; returns the
    final checkpoint folder.

    With ``resume`` (the default) a re-run continues from the newest ``checkpoint-<step>`` in the
    output folder, with the same weights, optimiser state and data order. Without it, an output
    folder that already holds checkpoints is an error (nothing is deleted).
    """
    return Trainer(TrainConfig.from_yaml(config_path, overrides)).run(resume)


def checkpoint_step(folder: Path) -> int | None:
    """The step of a ``checkpoint-<step>`` folder holding a trainer state, else None."""
    suffix = folder.name.removeprefix(CHECKPOINT_PREFIX)
    if folder.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() and (folder / STATE_FILE).exists():
        return int(suffix)
    return None


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the resumable checkpoints in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in output_dir.iterdir() if p.is_dir()]
    return sorted((step, p) for step, p in found if step is not None)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier at ``step``: linear warmup to 1, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def decay_groups(params: list[nn.Parameter], weight_decay: float, lr: float) -> list[dict]:
    """Two optimiser parameter groups at ``lr``: matrices, convolution kernels and embeddings with
    ``weight_decay``; biases and norm scales (1-D) without, since decaying them only shifts or
    shrinks activations."""
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, "lr": lr},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": lr},
    ]


def make_source(data: DataSpec) -> ImageSource:
    """The image source a config's ``data`` section names."""
    if data.synthetic is not None:
        spec = data.synthetic
        return SyntheticScenes(
            spec.seed,
            spec.count,
            every_phrase=spec.every_phrase,
            every_position=spec.every_position,
            no_article_share=spec.no_article_share,
        )
    assert data.manifest is not None  # DataSpec guarantees exactly one source
    return ManifestImages(data.manifest, data.storage_options)


class Trainer:
    """Builds the model, data and optimiser of a ``TrainConfig`` and runs the steps."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.output = Path(config.output_dir)
        self.device = torch.device(config.device)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.source = make_source(config.data)
        self.output.mkdir(parents=True, exist_ok=True)
        self.init_folder = resolve_checkpoint(config.init_from) if config.init_from else None
        self.tokenizer_dir = self._tokenizer_dir()
        self.tokenizer = EvfTokenizer.from_folder(self.tokenizer_dir)
        self.model = self._build_model()
        self.mode = resolve_mode(None, self.model.config.inference_mode, self.tokenizer.supports_semantic)
        self.trainable_by_part = self._set_trainable(config.train)
        self.dense_head = self._build_dense_head()
        self.location_head = self._build_location_head()
        self.trainable = [p for params in self.trainable_by_part.values() for p in params]
        for head in self.training_heads.values():
            self.trainable += list(head.parameters())
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    # -- setup --------------------------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        opt = self.config.optimizer
        return lr_factor(step, opt.warmup_steps, self.config.steps, opt.min_lr_ratio)

    def _tokenizer_dir(self) -> Path:
        if self.init_folder is not None:
            return self.init_folder
        if self.config.tokenizer.folder is not None:
            return Path(self.config.tokenizer.folder)
        folder = self.output / "tokenizer"
        if not (folder / SPM_FILE).exists():
            build_tokenizer(self.source.corpus(), folder, self.config.tokenizer.vocab_size)
        return folder

    def _build_model(self) -> EvfSam2Model:
        if self.init_folder is not None:
            return load_model(self.init_folder, self.device).float()
        assert self.config.model is not None
        needed = embedding_rows(len(self.tokenizer.sp))
        model_dict = fill_model_defaults(self.config.model, vocab_size=needed)
        config = EvfSam2Config.from_dict(model_dict)
        largest_id = max(t.id for t in self.tokenizer.added.values())
        if config.beit3.vocab_size <= largest_id:
            raise ValueError(
                f"model.beit3.vocab_size={config.beit3.vocab_size} but the tokenizer uses ids up to "
                f"{largest_id}; leave vocab_size out to size it from the tokenizer ({needed})"
            )
        torch.manual_seed(self.config.seed)
        model = EvfSam2Model(config, device=self.device)
        init_projector(model)
        init_image_encoder_positions(model)
        init = self.config.init
        layers = {"image_encoder": hiera_attention, "beit3": beit3_attention}
        for part in init.mimetic_attention:
            for attention in layers[part](model):
                mimetic_init(attention, init.mimetic_qk, init.mimetic_vo)
        return model

    def _build_dense_head(self) -> DenseHead | None:
        """The training-only ``DenseHead`` when ``loss.dense`` > 0 (never saved in a checkpoint's
        model files; its weights travel in ``trainer_state.pt``)."""
        if self.config.loss.dense == 0:
            return None
        torch.manual_seed(self.config.seed)
        d_model = self.model.visual_model.image_encoder.neck.d_model
        head = DenseHead(d_model, self.config.loss.dense_labels).to(self.device)
        if self.config.init.dense_head == "init_from":
            assert self.init_folder is not None  # TrainConfig guarantees it
            path = self.init_folder / STATE_FILE
            state = torch.load(path, map_location="cpu", weights_only=True) if path.exists() else {}
            if "dense_head_kinds" not in state:
                raise ValueError(
                    f"init.dense_head: init_from: {path} holds no dense head with its kinds (evf train "
                    "saves both in the trainer_state.pt of runs with loss.dense > 0)"
                )
            copied = head.load_kinds(state["dense_head"], state["dense_head_kinds"])
            log.info("dense head: %s from %s, %s new", copied, path, sorted(set(head.kinds) - set(copied)))
        return head

    def _build_location_head(self) -> LocationHead | None:
        """The training-only ``LocationHead`` when ``loss.location`` > 0 (like the dense head, never
        saved in the model files)."""
        if self.config.loss.location == 0:
            return None
        torch.manual_seed(self.config.seed + 1)
        return LocationHead(self.model.config.out_dim).to(self.device)

    @property
    def training_heads(self) -> dict[str, nn.Module]:
        """The training-only heads in use, by their key in ``trainer_state.pt``."""
        heads = {"dense_head": self.dense_head, "location_head": self.location_head}
        return {name: head for name, head in heads.items() if head is not None}

    def _set_trainable(self, parts: list[Part]) -> dict[Part, list[nn.Parameter]]:
        """Freeze everything outside ``parts``; returns the trainable parameters of each part."""
        by_part: dict[Part, list[nn.Parameter]] = {part: [] for part in parts}
        for name, param in self.model.named_parameters():
            part = next((p for p in parts if name.startswith(PART_PREFIXES[p])), None)
            param.requires_grad_(part is not None)
            if part is not None:
                by_part[part].append(param)
        return by_part

    def _build_optimizer(self) -> torch.optim.AdamW:
        """AdamW; weight decay on matrices and embeddings only (not on biases and norm scales);
        each part's learning rate is ``lr`` times its ``lr_scale`` (1 when not listed)."""
        opt = self.config.optimizer
        groups = [
            group
            for part, params in self.trainable_by_part.items()
            for group in decay_groups(params, opt.weight_decay, opt.lr * opt.lr_scale.get(part, 1.0))
        ]
        for head in self.training_heads.values():
            groups += decay_groups(list(head.parameters()), opt.weight_decay, opt.lr)
        return torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, fused=True)

    # -- checkpoints --------------------------------------------------------------------------
    def _save(self, step: int) -> Path:
        """Write ``checkpoint-<step>`` atomically (staged under a hidden name, then renamed)."""
        final = self.output / f"{CHECKPOINT_PREFIX}{step}"
        staging = self.output / f".{final.name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        save_checkpoint(self.model, staging, self.tokenizer_dir)
        state = {
            "step": step,
            "model": {k: v.detach().float().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        for name, head in self.training_heads.items():
            state[name] = head.state_dict()
        if self.dense_head is not None:
            state["dense_head_kinds"] = self.dense_head.kinds
        torch.save(state, staging / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        keep = self.config.keep_checkpoints
        if keep is not None:
            for _, old in list_checkpoints(self.output)[:-keep]:
                shutil.rmtree(old)
        return final

    def _restore(self, folder: Path) -> int:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.model.refresh_image_pe()
        for name, head in self.training_heads.items():
            head.load_state_dict(state[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        return int(state["step"])

    def _truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from (an interrupted run's tail)."""
        path = self.output / LOG_FILE
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
            path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")

    # -- the loop -----------------------------------------------------------------------------
    def run(self, resume: bool = True) -> Path:
        checkpoints = list_checkpoints(self.output)
        if checkpoints and not resume:
            raise FileExistsError(
                f"{self.output} already holds checkpoints (newest: {checkpoints[-1][1].name}); "
                "resume from it, or choose a new output_dir"
            )
        start = 0
        if checkpoints:
            start = self._restore(checkpoints[-1][1])
            self._truncate_log(start)
            if start >= self.config.steps:
                log.info("%s is already at step %d of %d", checkpoints[-1][1], start, self.config.steps)
                return checkpoints[-1][1]
            log.info("resuming from %s (step %d)", checkpoints[-1][1], start)
        (self.output / "config.yaml").write_text(
            yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
        )
        config = self.config
        preprocessor = Preprocessor(self.mode, self.model.sam_image_size, self.model.beit3_image_size)
        dataset = TrainDataset(self.source, preprocessor, config.data.prompts_per_image, config.seed)
        batches = StepBatches(len(self.source), config.batch_size, config.seed, start, config.steps)
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=list, num_workers=config.data.workers)
        self.model.train()
        log.info(
            "training %d of %d parameters (%s mode), steps %d..%d",
            sum(p.numel() for p in self.trainable),
            sum(p.numel() for p in self.model.parameters()),
            self.mode,
            start,
            config.steps,
        )
        last: Path | None = None
        totals: dict[str, float] = {}
        ema: dict[str, float] = {}
        began = time.monotonic()
        with (
            open(self.output / LOG_FILE, "a", encoding="utf-8") as log_file,
            tqdm(total=config.steps, initial=start, desc="train", unit="step", dynamic_ncols=True) as bar,
        ):
            for step, batch in enumerate(loader, start=start):
                metrics = self._step(batch)
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + value
                    ema[key] = value if key not in ema else 0.95 * ema[key] + 0.05 * value
                bar.update(1)
                bar.set_postfix(loss=f"{ema['loss']:.4f}", iou=f"{ema['iou']:.3f}")
                done = step + 1
                if done % config.log_every == 0 or done == config.steps:
                    count = config.log_every if done % config.log_every == 0 else done % config.log_every
                    record = {"step": done, **{k: round(v / count, 6) for k, v in totals.items()}}
                    # the base lr (parts with an lr_scale get a multiple of it)
                    record["lr"] = config.optimizer.lr * self._lr_factor(done)
                    record["seconds"] = round(time.monotonic() - began, 1)
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                    totals = {}
                if done % config.checkpoint_every == 0 or done == config.steps:
                    last = self._save(done)
        assert last is not None
        return last

    def _step(self, batch: list[TrainSample]) -> dict[str, float]:
        """One optimiser step on a batch of images; returns the batch's mean loss terms."""
        model, device = self.model, self.device
        size = model.sam_image_size
        pixels = torch.stack([normalize_sam(s.sam_pixels.to(device), size, torch.float32) for s in batch])
        embeddings = model.encode_images(pixels)
        rows = [(i, prompt) for i, sample in enumerate(batch) for prompt in sample.prompts]
        input_ids, padding = self.tokenizer.batch([p for _, p in rows], model.config.beit3.max_text_tokens)
        image_index = torch.tensor([i for i, _ in rows], device=device)
        beit3_pixels = torch.stack([batch[i].beit3_pixels for i, _ in rows]).to(device)
        prompt_embeds = model.encode_prompts(
            beit3_pixels, input_ids.to(device), None if padding is None else padding.to(device)
        )
        low_res, pred_iou, _ = model.decode_masks(
            embeddings.select(image_index), prompt_embeds, multimask=self.mode == "multitask"
        )
        coverage = torch.cat([sample.coverage for sample in batch]).to(device)
        terms = mask_losses(low_res, pred_iou, coverage)
        weights = self.config.loss
        mask_loss = (weights.bce * terms.bce + weights.dice * terms.dice).mean()
        iou_loss = terms.iou_mse.mean()
        loss = mask_loss + weights.iou * iou_loss
        head_metrics: dict[str, float] = {}
        if self.dense_head is not None:
            labels = torch.stack([s.dense_labels for s in batch if s.dense_labels is not None]).to(device)
            dense_loss, metrics = self.dense_head.loss(embeddings, labels)
            loss = loss + weights.dense * dense_loss
            head_metrics.update(metrics)
        if self.location_head is not None:
            location_loss, metrics = self.location_head.loss(prompt_embeds, coverage)
            loss = loss + weights.location * location_loss
            head_metrics.update(metrics)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.optimizer.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.config.optimizer.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return {
            "loss": float(loss.detach()),
            "bce": float(terms.bce.mean().detach()),
            "dice": float(terms.dice.mean().detach()),
            "iou_mse": float(iou_loss.detach()),
            # IoU of the output the predictor would pick (highest predicted IoU)
            "iou": float(terms.iou.gather(1, pred_iou.argmax(dim=1, keepdim=True)).mean()),
            **head_metrics,
        }
