"""How a new model's weights start, where the libraries' own initialisation is not enough.

- ``init_projector``: He-normal projector so the prompt token keeps the decoder's scale.
- ``init_image_encoder_positions``: sine-cosine positions for Hiera (sam2 makes them zeros).
- ``init_mimetic_attention``: the mimetic initialisation of self-attention (Trockman & Kolter,
  "Mimetic Initialization of Self-Attention Layers", ICML 2023). Each head's query-key product
  starts near ``alpha1 Z + beta1 I`` (a token attends most to itself and to tokens like it) and the
  value-output product near ``alpha2 Z - beta2 I``, with ``Z`` a random (D, D) matrix of N(0, 1/D)
  entries. This is what attention layers of trained vision transformers look like, and it lets a
  transformer trained from scratch on little data learn spatial features much sooner.

Convention: weights act on row vectors, as in ``nn.Linear`` (``q = x W_q^T``), so the attention
score of tokens ``x`` and ``y`` in a head is ``x W_q^T W_k y^T`` and, with attention on one token,
the value path adds ``x W_v^T W_o^T`` to the residual stream.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from evf.model.evf_sam2 import EvfSam2Model


@torch.no_grad()
def init_projector(model: EvfSam2Model) -> None:
    """Initialise a new model's projector (Linear-ReLU-Linear) to keep the CLS token's scale.

    SAM 2's decoder tokens start at unit scale per dimension. With PyTorch's default init the
    projector shrinks BEiT-3's layer-normalised CLS token about 20x, the decoder first learns to
    segment without looking at the prompt and then stays there. He-normal weights and zero biases
    keep the prompt token at the decoder's scale, so the prompt is used from the first steps.
    """
    for layer in model.text_hidden_fcs[0]:
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)


def sine_cosine_table(dim: int, height: int, width: int) -> Tensor:
    """(1, dim, height, width) 2-D sine-cosine positions: a quarter of the channels each holds
    sin(y f), cos(y f), sin(x f), cos(x f) over geometric frequencies f; leftover channels are 0."""
    quarter = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter) / quarter)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    parts = [f(pos[None] * freq[:, None, None]) for pos in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat([*parts, torch.zeros(dim - 4 * quarter, height, width)])[None]


@torch.no_grad()
def init_image_encoder_positions(model: EvfSam2Model) -> None:
    """Give a new model's Hiera trunk sine-cosine positional embeddings.

    sam2 creates ``pos_embed`` (background, interpolated to the feature size) and
    ``pos_embed_window`` (tiled over the windows) as zeros, since they always come from a
    checkpoint. Left at zero, attention inside a window cannot tell where its tokens are, and the
    frozen random encoder's features carry no position for the decoder's prompt token to gather.
    """
    trunk = model.visual_model.image_encoder.trunk
    for param in (trunk.pos_embed, trunk.pos_embed_window):
        param.copy_(sine_cosine_table(*param.shape[1:]))


@dataclass(frozen=True)
class AttentionWeights:
    """One self-attention layer's projections, as views into its parameters.

    query, key, value: per head, (head_dim, in_dim) weight rows of that head's projection.
    query_bias, key_bias: per head, (head_dim,) biases.
    output: (out_dim, out_dim) weight of the output projection (its columns follow the heads).
    """

    query: list[Tensor]
    key: list[Tensor]
    value: list[Tensor]
    query_bias: list[Tensor]
    key_bias: list[Tensor]
    output: Tensor


def mimetic_factors(dim: int, rank: int, alpha: float, beta: float) -> tuple[Tensor, Tensor]:
    """``(A, B)``, each (rank, dim), with ``A^T B`` the best rank-``rank`` approximation of
    ``alpha Z + beta I`` (``Z`` of N(0, 1/dim) entries, drawn from torch's global generator).

    Splits the singular values evenly: ``A = sqrt(S) U^T``, ``B = sqrt(S) V^T`` over the top ``rank``.
    """
    target = alpha * torch.randn(dim, dim) / math.sqrt(dim) + beta * torch.eye(dim)
    u, s, vh = torch.linalg.svd(target)
    root = s[:rank].sqrt()[:, None]
    return root * u[:, :rank].T, root * vh[:rank]


@torch.no_grad()
def mimetic_init(attention: AttentionWeights, qk: tuple[float, float], vo: tuple[float, float]) -> None:
    """Set one layer's weights in place: per head ``W_q^T W_k ~ qk[0] Z + qk[1] I`` with zero
    query/key biases; ``W_v^T W_o^T ~ vo[0] Z - vo[1] I`` over all heads where the value path maps
    the layer's input dimension to itself (Hiera's stage-changing blocks keep their init)."""
    in_dim = attention.query[0].shape[1]
    head_dim = attention.query[0].shape[0]
    for query, key, query_bias, key_bias in zip(
        attention.query, attention.key, attention.query_bias, attention.key_bias, strict=True
    ):
        q, k = mimetic_factors(in_dim, head_dim, *qk)
        query.copy_(q)
        key.copy_(k)
        query_bias.zero_()
        key_bias.zero_()
    if attention.output.shape[0] == in_dim:
        value, output_t = mimetic_factors(in_dim, in_dim, vo[0], -vo[1])
        for head, rows in zip(attention.value, value.split(head_dim), strict=True):
            head.copy_(rows)
        attention.output.copy_(output_t.T)


def _heads(weight: Tensor, heads: int) -> list[Tensor]:
    return list(weight.split(weight.shape[0] // heads))


def hiera_attention(model: EvfSam2Model) -> Iterator[AttentionWeights]:
    """The attention layers of the Hiera trunk (sam2 ``MultiScaleAttention``: one fused ``qkv``
    Linear whose output is [q | k | v], each head-major)."""
    for block in model.visual_model.image_encoder.trunk.blocks:
        attn = block.attn
        q, k, v = attn.qkv.weight.chunk(3)
        qb, kb, _ = attn.qkv.bias.chunk(3)
        yield AttentionWeights(
            *(_heads(w, attn.num_heads) for w in (q, k, v, qb, kb)), output=attn.proj.weight
        )


def beit3_attention(model: EvfSam2Model) -> Iterator[AttentionWeights]:
    """The attention layers of BEiT-3, each modality expert (``A`` vision, ``B`` text) on its own."""
    for layer in model.mm_extractor.beit3.encoder.layers:
        attn = layer.self_attn
        for expert in ("A", "B"):
            q, k, v, o = (
                getattr(getattr(attn, name), expert) for name in ("q_proj", "k_proj", "v_proj", "out_proj")
            )
            yield AttentionWeights(
                *(_heads(t, attn.heads) for t in (q.weight, k.weight, v.weight, q.bias, k.bias)),
                output=o.weight,
            )
