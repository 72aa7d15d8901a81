"""Which training recipe lets SAM 2's image encoder, trained from scratch, learn what shape a pixel is on?

The demo model must select objects by shape ("the hexagon"). This probe leaves out the text side,
the mask decoder and the mask loss and asks the image encoder alone the hardest part of that
question, with the strongest signal there is: dense per-pixel labels (which of the 7 shapes covers
each object pixel of a synthetic scene; background pixels are ignored). The encoder is the demo
model's SAM 2 image encoder (Hiera trunk + FPN neck, random init, the sine-cosine positions
``evf train`` gives new models) with ``evf train``'s training-only ``DenseHead`` (a 1x1 conv on its
three levels; ``loss.dense`` in a training config), trained here on its shape labels only.

Recipes, trained side by side in one process on the same batches (each step runs every recipe,
alternating which goes first, so a busy machine slows them alike):

- ``probe``: the probe's original optimiser: AdamW at a constant lr 2e-3, weight decay 0.01 on
  every parameter, no warm-up, no clipping, PyTorch's default init;
- ``optimiser``: ``evf train``'s optimiser (``lr_factor``, ``decay_groups``) with issue 15's
  settings: AdamW lr 1e-3 (default betas), 100 warm-up steps, cosine decay to 2 %, gradient clip
  1.0, weight decay 0.05 on matrices only (configs/train-demo.yaml: the same but 200 warm-up steps
  and betas 0.9/0.98);
- ``mimetic``: the probe optimiser with the mimetic attention initialisation
  (``evf.training.init``; ``init.mimetic_attention: [image_encoder]`` in a training config);
- ``both``: the recipe optimiser and the mimetic initialisation;
- ``both-bf16``: ``both`` with the forward pass and loss under bf16 autocast (weights, optimiser
  and evaluation stay float32).

It prints the held-out accuracy (object pixels of 128 scenes of seed 9999; chance 1/7) of each
recipe at several image counts, and each recipe's training seconds relative to the first one. The
cosine schedule spans the whole run, so an intermediate point is not the end of a shorter run.

    .venv/bin/python benchmarks/shape_probe.py [--images 24000] [--arms probe,optimiser,mimetic,both]
    .venv/bin/python benchmarks/shape_probe.py --arms both,both-bf16 --images 8000
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evf.checkpoints import DEMO_MODEL_DIR
from evf.model.config import EvfSam2Config
from evf.model.evf_sam2 import EvfSam2Model
from evf.synthetic import SHAPES, generate_scene
from evf.training.config import InitSpec
from evf.training.dense_head import DenseHead, cell_labels, label_maps
from evf.training.init import hiera_attention, init_image_encoder_positions, mimetic_init
from evf.training.trainer import decay_groups, lr_factor
from evf.transforms import normalize_sam, prepare_sam_multitask

HELD_OUT_SEED, TRAIN_SEED = 9999, 0
HELD_OUT_SCENES = 128


@dataclass(frozen=True)
class Recipe:
    """optimiser: "probe" (the original) or "recipe" (``evf train``'s); mimetic: the attention init."""

    optimiser: str
    mimetic: bool
    bf16: bool = False


RECIPES = {
    "probe": Recipe("probe", mimetic=False),
    "optimiser": Recipe("recipe", mimetic=False),
    "mimetic": Recipe("probe", mimetic=True),
    "both": Recipe("recipe", mimetic=True),
    "both-bf16": Recipe("recipe", mimetic=True, bf16=True),
}


def scenes(seed: int, start: int, count: int, size: int) -> tuple[Tensor, Tensor]:
    """(N, 3, S, S) normalised SAM 2 inputs and (N, S/4, S/4) labels: 0 background, 1 + shape index."""
    pixels, labels = [], []
    for index in range(start, start + count):
        scene = generate_scene(seed, index)
        pixels.append(normalize_sam(prepare_sam_multitask(scene.image, size), size, torch.float32))
        labels.append(cell_labels(label_maps(scene), size // 4)[0])
    return torch.stack(pixels), torch.stack(labels)


class HieraProbe(nn.Module):
    """The demo model's SAM 2 image encoder at input ``size`` with a ``DenseHead`` (of which the
    probe trains the shape logits only)."""

    def __init__(self, size: int, mimetic: bool) -> None:
        super().__init__()
        config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
        config["sam2"]["overrides"].append(f"++model.image_size={size}")
        self.model = EvfSam2Model(EvfSam2Config.from_dict(config))
        init_image_encoder_positions(self.model)  # as `evf train` does for a new model
        if mimetic:
            spec = InitSpec()
            for attention in hiera_attention(self.model):
                mimetic_init(attention, spec.mimetic_qk, spec.mimetic_vo)
        # shape and colour logits, as the probe was measured with (only the shape ones are trained)
        self.head = DenseHead(self.model.visual_model.image_encoder.neck.d_model, ("shape", "colour"))

    def trainable(self) -> list[nn.Parameter]:
        decoder = self.model.visual_model.sam_mask_decoder  # conv_s0/conv_s1 make the high-res levels
        modules = [self.model.visual_model.image_encoder, decoder.conv_s0, decoder.conv_s1, self.head]
        return [p for m in modules for p in m.parameters()]

    def forward(self, pixels: Tensor) -> Tensor:
        """(N, 3, S, S) -> (N, 1 + shapes, S/4, S/4) logits."""
        return self.head(self.model.encode_images(pixels))[0]


class Arm:
    """One recipe's probe, optimiser and running totals."""

    def __init__(self, name: str, recipe: Recipe, steps: int, size: int) -> None:
        self.name, self.recipe = name, recipe
        torch.manual_seed(0)  # every arm starts from the same weights (mimetic ones drawn after)
        self.net = HieraProbe(size, recipe.mimetic)
        params = self.net.trainable()
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        if recipe.optimiser == "probe":
            self.optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
            self.clip: float | None = None
        else:
            self.optimizer = torch.optim.AdamW(decay_groups(params, 0.05, 1e-3), lr=1e-3)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda step: lr_factor(step, 100, steps, 0.02)
            )
            self.clip = 1.0
        self.params = params
        self.seconds = 0.0
        self.losses: list[float] = []

    def step(self, pixels: Tensor, labels: Tensor) -> None:
        began = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=self.recipe.bf16):
            # object pixels only: the question is which shape, not where the objects are
            loss = F.cross_entropy(self.net(pixels), labels, ignore_index=0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.seconds += time.perf_counter() - began
        self.losses.append(float(loss.detach()))

    @torch.no_grad()
    def accuracy(self, held_out: tuple[Tensor, Tensor]) -> float:
        """Shape accuracy on the object pixels of the held-out scenes (float32)."""
        hits = total = 0
        for pixels, labels in zip(held_out[0].split(32), held_out[1].split(32), strict=True):
            on_object = labels > 0
            hits += int((self.net(pixels).argmax(1)[on_object] == labels[on_object]).sum())
            total += int(on_object.sum())
        return hits / total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arms", default="probe,optimiser,mimetic,both", help=f"from {', '.join(RECIPES)}")
    parser.add_argument("--images", type=int, default=24000, help="training images per recipe")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--points", type=int, default=6, help="held-out evaluations, evenly spaced")
    parser.add_argument("--size", type=int, default=128, help="SAM 2 input size")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.images // args.batch
    report = {round(steps * (k + 1) / args.points) for k in range(args.points)}
    arms = [Arm(name, RECIPES[name], steps, args.size) for name in args.arms.split(",")]
    held_out = scenes(HELD_OUT_SEED, 0, HELD_OUT_SCENES, args.size)
    curves: dict[str, list[float]] = {arm.name: [] for arm in arms}
    images: list[int] = []
    began = time.monotonic()
    for step in range(steps):
        pixels, labels = scenes(TRAIN_SEED, step * args.batch, args.batch, args.size)
        for arm in arms if step % 2 == 0 else reversed(arms):
            arm.step(pixels, labels)
        if step + 1 in report:
            images.append((step + 1) * args.batch)
            for arm in arms:
                curves[arm.name].append(arm.accuracy(held_out))
            row = "  ".join(
                f"{a.name} {curves[a.name][-1]:.3f} (loss {np.mean(a.losses[-50:]):.2f})" for a in arms
            )
            print(f"{images[-1]:>6} images, {time.monotonic() - began:.0f} s: {row}", flush=True)
    chance = 1 / len(SHAPES)
    print(f"\nheld-out shape accuracy (chance {chance:.3f}), SAM 2 input {args.size}, batch {args.batch}")
    print(f"{'recipe':<12}" + "".join(f"{n:>8}" for n in images) + "   train s  time ratio")
    for arm in arms:
        ratio = arm.seconds / arms[0].seconds
        print(
            f"{arm.name:<12}"
            + "".join(f"{a:>8.3f}" for a in curves[arm.name])
            + f"{arm.seconds:>10.0f}{ratio:>12.2f}"
        )


if __name__ == "__main__":
    main()
