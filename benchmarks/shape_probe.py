"""Can SAM 2's image encoder, trained from scratch on this machine, learn what shape a pixel is on?

A diagnostic for issue 5: the demo model selects objects by colour but not by shape. This trains,
on the same synthetic scenes and with the strongest signal there is (dense per-pixel labels: which
of the 7 shapes covers each object pixel), two encoders for the same number of images:

- the demo model's SAM 2 image encoder (Hiera trunk + FPN neck, random init, sine-cosine
  positional embeddings instead of sam2's all-zero ones), with a linear head on its three levels;
- a 6-layer dilated CNN of similar cost, as the yardstick of how hard the task itself is.

It prints each one's shape accuracy on the object pixels of held-out scenes (chance: 1/7) and the
ratio. SAM 2 input 128 (the demo model's 256 costs 4x more per image and learnt no faster).

    .venv/bin/python benchmarks/shape_probe.py [--images 12000] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evf.model.checkpoint import DEMO_MODEL_DIR
from evf.model.config import EvfSam2Config
from evf.model.evf_sam2 import EvfSam2Model
from evf.synthetic import SHAPES, generate_scene
from evf.training.trainer import init_image_encoder_positions
from evf.transforms import normalize_sam, prepare_sam_multitask

SIZE = 128
HELD_OUT_SEED, TRAIN_SEED = 9999, 0


def scenes(seed: int, start: int, count: int) -> tuple[Tensor, Tensor]:
    """(N, 3, S, S) normalised SAM 2 inputs and (N, S/4, S/4) labels: 0 background, 1 + shape index."""
    pixels, labels = [], []
    for index in range(start, start + count):
        scene = generate_scene(seed, index)
        pixels.append(normalize_sam(prepare_sam_multitask(scene.image, SIZE), SIZE, torch.float32))
        label = np.zeros(scene.image.shape[:2], np.float32)
        for obj in scene.objects:
            label[obj.mask] = SHAPES.index(obj.shape) + 1
        low = F.interpolate(torch.from_numpy(label)[None, None], (SIZE // 4, SIZE // 4), mode="nearest")
        labels.append(low[0, 0].long())
    return torch.stack(pixels), torch.stack(labels)


class HieraProbe(nn.Module):
    """The demo model's SAM 2 image encoder at input 128, a 1x1 conv head on its upsampled levels."""

    def __init__(self) -> None:
        super().__init__()
        config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
        config["sam2"]["overrides"].append(f"++model.image_size={SIZE}")
        self.model = EvfSam2Model(EvfSam2Config.from_dict(config))
        init_image_encoder_positions(self.model)  # as `evf train` does for a new model
        d_model = self.model.visual_model.image_encoder.neck.d_model  # levels: d, d/4 (s1), d/8 (s0)
        self.head = nn.Conv2d(d_model + d_model // 4 + d_model // 8, len(SHAPES) + 1, 1)

    def trainable(self) -> list[nn.Parameter]:
        decoder = self.model.visual_model.sam_mask_decoder  # conv_s0/conv_s1 make the high-res levels
        modules = [self.model.visual_model.image_encoder, decoder.conv_s0, decoder.conv_s1, self.head]
        return [p for m in modules for p in m.parameters()]

    def forward(self, pixels: Tensor) -> Tensor:
        features = self.model.encode_images(pixels)
        size = (SIZE // 4, SIZE // 4)
        levels = [features.image_embed, *reversed(features.high_res)]
        return self.head(torch.cat([F.interpolate(x, size, mode="bilinear") for x in levels], dim=1))


def cnn_probe() -> nn.Module:
    """Two stride-2 3x3 convs to S/4, then four dilated 3x3 convs (dilation 2..16), 64 channels."""

    def block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Module:
        conv = nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation)
        return nn.Sequential(conv, nn.GroupNorm(8, cout), nn.GELU())

    dilated = [block(64, 64, dilation=d) for d in (2, 4, 8, 16)]
    return nn.Sequential(block(3, 32, 2), block(32, 64, 2), *dilated, nn.Conv2d(64, len(SHAPES) + 1, 1))


def object_accuracy(logits: Tensor, labels: Tensor) -> float:
    on_object = labels > 0
    return float((logits.argmax(1)[on_object] == labels[on_object]).float().mean())


def train_and_score(
    name: str,
    net: nn.Module,
    params: list[nn.Parameter],
    args: argparse.Namespace,
    held_out: tuple[Tensor, Tensor],
) -> float:
    """Train ``net`` on ``args.images`` scenes of the training seed; its held-out object-pixel accuracy."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    began = time.monotonic()
    for step in range(args.images // args.batch):
        pixels, labels = scenes(TRAIN_SEED, step * args.batch, args.batch)
        # object pixels only: the question is which shape, not where the objects are
        loss = F.cross_entropy(net(pixels), labels, ignore_index=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = object_accuracy(net(held_out[0]), held_out[1])
    print(
        f"{name}: held-out shape accuracy {accuracy:.3f} after {args.images} images "
        f"({time.monotonic() - began:.0f} s)"
    )
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=12000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    held_out = scenes(HELD_OUT_SEED, 0, 128)
    torch.manual_seed(0)
    hiera = HieraProbe()
    hiera_accuracy = train_and_score("SAM 2 image encoder", hiera, hiera.trainable(), args, held_out)
    torch.manual_seed(0)
    cnn = cnn_probe()
    cnn_accuracy = train_and_score("6-layer CNN", cnn, list(cnn.parameters()), args, held_out)
    print(
        f"chance {1 / len(SHAPES):.3f}; "
        f"SAM 2 encoder / CNN accuracy ratio {hiera_accuracy / cnn_accuracy:.2f}"
    )


if __name__ == "__main__":
    main()
