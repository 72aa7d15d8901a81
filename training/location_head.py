"""A training-only head that makes the prompt embedding say where its target is.

EVF-SAM's prompt embedding is BEiT-3's vision CLS token after the early fusion of image and text,
so it can carry where the named object is ("the red shape on the left" of two red shapes: BEiT-3
sees both, and where they are). Trained from scratch through the mask loss alone, the demo model's
BEiT-3 never learns to: its vision CLS token gives 83-99 % of its attention to the text tokens, its
output is a function of the text alone (the image explains 0.04 % of its variance), and "... on the
left" and "... on the right" give the same vector, so the decoder cannot follow position words.
``LocationHead`` reads the prompt embedding with one linear layer and predicts which cells of a
coarse ``GRID`` x ``GRID`` grid over the image hold the target; the text alone cannot answer that,
so its loss (weighted by ``loss.location``) rewards BEiT-3 for looking. It lives only in the trainer
and never enters a checkpoint's ``model.safetensors``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from evf.training.losses import cell_coverage

GRID = 8
"""Cells per side of the location map (the demo model's BEiT-3 sees 7 x 7 patches)."""


class LocationHead(nn.Module):
    """One linear layer: prompt embeddings (P, 1, C) -> logits over the GRID x GRID cells (P, GRID, GRID)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.predict = nn.Linear(dim, GRID * GRID)

    def forward(self, prompt_embeds: Tensor) -> Tensor:
        return self.predict(prompt_embeds[:, 0].float()).view(-1, GRID, GRID)

    def loss(self, prompt_embeds: Tensor, coverage: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy of the softmax over cells against the target's share of each cell (from the
        mask loss's ``coverage`` (P, h, w), averaged over each cell), over the prompts that have a
        target; for the log, the loss and the share of those prompts whose highest-scoring cell
        touches the target."""
        target = cell_coverage(coverage, GRID).flatten(1)
        mass = target.sum(1)
        has_target = mass > 0
        share = target[has_target] / mass[has_target, None]
        logits = self.forward(prompt_embeds).flatten(1)[has_target]
        loss = -(share * logits.log_softmax(1)).sum(1).mean() if bool(has_target.any()) else logits.sum()
        with torch.no_grad():
            hit = share.gather(1, logits.argmax(1, keepdim=True)) > 0
            accuracy = float(hit.float().mean()) if hit.numel() else 0.0
        return loss, {"location": float(loss.detach()), "location_acc": accuracy}
