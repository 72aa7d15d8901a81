"""BEiT-3: the multiway vision-language transformer of EVF-SAM2, with torchscale 0.2.0 semantics.

Key names match torchscale's ``BEiT3`` exactly, so ``mm_extractor.beit3.*`` of the official
checkpoints loads strictly. Fixed choices (those of the authors' ``_get_large_config``): multiway
experts (``A`` = vision, ``B`` = language), pre-LayerNorm with sub-LN, exact GELU computed in
float32, learned absolute positions starting at index 2 for each modality, no relative position
bias, no embedding scale, no dropout, final multiway LayerNorm.

Sequence layout: ``[CLS, patch_1 .. patch_N | text_1 .. text_T]``; the vision part has
``N + 1`` tokens and is the multiway split position. Attention is joint over the whole sequence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evf.model.config import Beit3Config

LAYERNORM_EPS = 1e-5
POSITION_OFFSET = 2  # fairseq-style learned positions: indices 0 and 1 are never used


class Multiway(nn.Module):
    """Expert ``A`` for the vision tokens, expert ``B`` for the text tokens.

    The two parts of the sequence are kept as separate tensors between attention steps, so the
    experts run on contiguous inputs with no split/concatenate per layer.
    """

    def __init__(self, make: Callable[..., nn.Module], *args: object) -> None:
        super().__init__()
        self.A = make(*args)  # noqa: N815 - torchscale key name
        self.B = make(*args)  # noqa: N815 - torchscale key name

    def forward(self, vision: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        return self.A(vision), self.B(text)


class MultiwayAttention(nn.Module):
    """Joint multi-head self-attention with per-modality projections and a sub-LN before out_proj."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = Multiway(nn.Linear, dim, dim)
        self.k_proj = Multiway(nn.Linear, dim, dim)
        self.v_proj = Multiway(nn.Linear, dim, dim)
        self.out_proj = Multiway(nn.Linear, dim, dim)
        self.inner_attn_ln = Multiway(nn.LayerNorm, dim, LAYERNORM_EPS)

    def forward(self, vision: Tensor, text: Tensor, attn_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """vision (B, V, D), text (B, T, D); attn_mask (B, 1, 1, V+T) bool, True = may attend, or None."""
        b, v, d = vision.shape
        q, k, w = (
            torch.cat(proj(vision, text), dim=1).view(b, -1, self.heads, d // self.heads).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, w, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(b, -1, d)
        return self.out_proj(*self.inner_attn_ln(out[:, :v], out[:, v:]))


class FeedForward(nn.Module):
    """fc1 -> GELU (float32) -> sub-LN -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=LAYERNORM_EPS)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        x = F.gelu(x.float()).type_as(x)
        return self.fc2(self.ffn_layernorm(x))


class EncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + ffn(LN(x)), each LN/projection per modality."""

    def __init__(self, cfg: Beit3Config) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.self_attn = MultiwayAttention(dim, cfg.attention_heads)
        self.self_attn_layer_norm = Multiway(nn.LayerNorm, dim, LAYERNORM_EPS)
        self.ffn = Multiway(FeedForward, dim, cfg.ffn_embed_dim)
        self.final_layer_norm = Multiway(nn.LayerNorm, dim, LAYERNORM_EPS)

    def forward(self, vision: Tensor, text: Tensor, attn_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        dv, dt = self.self_attn(*self.self_attn_layer_norm(vision, text), attn_mask)
        vision, text = vision + dv, text + dt
        dv, dt = self.ffn(*self.final_layer_norm(vision, text))
        return vision + dv, text + dt


class PositionTables(nn.Module):
    """Learned absolute positions: ``A`` for vision tokens, ``B`` for text tokens, both from index 2."""

    def __init__(self, cfg: Beit3Config) -> None:
        super().__init__()
        self.A = nn.Embedding(cfg.num_patches + 1 + POSITION_OFFSET, cfg.embed_dim)  # noqa: N815
        self.B = nn.Embedding(cfg.max_source_positions, cfg.embed_dim)  # noqa: N815

    def forward(self, num_vision: int, num_text: int) -> Tensor:
        """Returns (1, num_vision + num_text, D)."""
        vision = self.A.weight[POSITION_OFFSET : POSITION_OFFSET + num_vision]
        text = self.B.weight[POSITION_OFFSET : POSITION_OFFSET + num_text]
        return torch.cat([vision, text]).unsqueeze(0)


class Encoder(nn.Module):
    def __init__(self, cfg: Beit3Config) -> None:
        super().__init__()
        self.embed_positions = PositionTables(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))
        self.layer_norm = Multiway(nn.LayerNorm, cfg.embed_dim, LAYERNORM_EPS)


class VisionEmbedding(nn.Module):
    """16x16 patch projection with a prepended CLS token: (B, 3, S, S) -> (B, 1 + (S/16)^2, D)."""

    def __init__(self, cfg: Beit3Config) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        # Unused at inference (no masked positions); kept so the official weights load strictly.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))

    def forward(self, pixels: Tensor) -> Tensor:
        patches = self.proj(pixels).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)


class Beit3(nn.Module):
    """BEiT-3 encoder over an image and a text, returning the final hidden states."""

    def __init__(self, cfg: Beit3Config) -> None:
        super().__init__()
        self.config = cfg
        self.text_embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.vision_embed = VisionEmbedding(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, pixels: Tensor, input_ids: Tensor, text_padding: Tensor | None = None) -> Tensor:
        """Encode images and texts jointly.

        Args:
            pixels: (B, 3, img_size, img_size) normalised to about [-1, 1].
            input_ids: (B, T) int64 token ids, right-padded.
            text_padding: (B, T) bool, True at padding positions; None when nothing is padded
                (the caller knows this from tokenisation, which avoids a device-to-host sync).

        Returns:
            (B, 1 + num_patches + T, D) hidden states after the final multiway LayerNorm; index 0
            is the vision CLS token that EVF-SAM2 uses.
        """
        vision = self.vision_embed(pixels)
        split = vision.shape[1]
        positions = self.encoder.embed_positions(split, input_ids.shape[1])
        vision = vision + positions[:, :split].to(vision.dtype)
        text = self.text_embed(input_ids) + positions[:, split:].to(vision.dtype)
        attn_mask = None
        if text_padding is not None:
            text = text * (~text_padding).unsqueeze(-1).to(text.dtype)
            keep = torch.cat([text_padding.new_ones(text.shape[0], split), ~text_padding], dim=1)
            attn_mask = keep[:, None, None, :]
        for layer in self.encoder.layers:
            vision, text = layer(vision, text, attn_mask)
        return torch.cat(self.encoder.layer_norm(vision, text), dim=1)
