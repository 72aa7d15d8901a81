"""EVF-SAM2: BEiT-3 early fusion of image and text, projected into SAM 2's mask decoder as a prompt.

The module tree matches the authors' ``EvfSam2Model`` so the official state dict loads by name:
``mm_extractor.beit3.*`` (BEiT-3), ``text_hidden_fcs.0.{0,2}.*`` (projector) and
``visual_model.*`` (SAM 2, built by the unmodified PyPI ``sam2`` package).

The forward pass is split into the three stages a batch predictor needs:
``encode_images`` (once per distinct image), ``encode_prompts`` (once per prompt, padded batch)
and ``decode_masks`` (all prompts of a batch in one mask-decoder call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from sam2.build_sam import build_sam2
from sam2.modeling.sam2_base import SAM2Base
from torch import Tensor, nn

from evf.model.beit3 import Beit3
from evf.model.config import EvfSam2Config


@dataclass
class ImageEmbeddings:
    """SAM 2 features of N images (S = SAM 2 input size, 1024 for the official models).

    image_embed: (N, C, S/16, S/16), ``no_mem_embed`` already added.
    high_res: [(N, C/8, S/4, S/4), (N, C/4, S/8, S/8)], the conv_s0/conv_s1 levels.
    """

    image_embed: Tensor
    high_res: list[Tensor]

    def select(self, index: Tensor) -> ImageEmbeddings:
        """Features of the images at ``index`` (one row per prompt), for a single decoder call."""
        return ImageEmbeddings(self.image_embed[index], [f[index] for f in self.high_res])


class DecodedMasks(NamedTuple):
    """The mask decoder's output for P prompts (``EvfSam2Model.decode_masks``).

    low_res: (P, K, S/4, S/4) mask logits; iou: (P, K) predicted IoU; presence: (P,) SAM 2's
    object-presence logit (> 0: the decoder thinks an object is there; EVF-SAM does not use it).
    """

    low_res: Tensor
    iou: Tensor
    presence: Tensor


class EvfSam2Model(nn.Module):
    def __init__(self, config: EvfSam2Config, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = config
        self.mm_extractor = nn.ModuleDict({"beit3": Beit3(config.beit3)})
        hidden, out = config.hidden_size, config.out_dim
        self.text_hidden_fcs = nn.ModuleList(
            [nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))]
        )
        self.visual_model: SAM2Base = build_sam2(
            config.sam2.config, None, device=str(device), hydra_overrides_extra=list(config.sam2.overrides)
        )
        if self.visual_model.sam_prompt_encoder.embed_dim != out:
            raise ValueError(
                f"config.json: out_dim={out} but the SAM 2 prompt dim is "
                f"{self.visual_model.sam_prompt_encoder.embed_dim}"
            )
        self.to(device)
        self.refresh_image_pe()

    @property
    def sam_image_size(self) -> int:
        return self.visual_model.image_size

    @property
    def beit3_image_size(self) -> int:
        return self.config.beit3.img_size

    def encode_images(self, sam_pixels: Tensor) -> ImageEmbeddings:
        """sam_pixels: (N, 3, S, S) normalised SAM 2 input -> features (as SAM2ImagePredictor.set_image)."""
        backbone = self.visual_model.forward_image(sam_pixels)
        levels = backbone["backbone_fpn"][-self.visual_model.num_feature_levels :]
        levels = [lvl.to(sam_pixels.dtype) for lvl in levels]
        # directly_add_no_mem_embed: the image-only path adds the "no memory" embedding.
        no_mem = self.visual_model.no_mem_embed.reshape(1, -1, 1, 1).to(levels[-1].dtype)
        return ImageEmbeddings(levels[-1] + no_mem, levels[:-1])

    def encode_prompts(self, beit3_pixels: Tensor, input_ids: Tensor, text_padding: Tensor | None) -> Tensor:
        """(P, 3, s, s), (P, T), (P, T) bool or None -> prompt embeddings (P, 1, out_dim).

        The prompt embedding is the projected vision CLS token of the image-text fusion.
        """
        hidden = self.mm_extractor["beit3"](beit3_pixels, input_ids, text_padding)
        return self.text_hidden_fcs[0](hidden[:, :1])

    def decode_masks(
        self, embeddings: ImageEmbeddings, prompt_embeds: Tensor, multimask: bool
    ) -> DecodedMasks:
        """One mask-decoder call for P prompts whose image features are row-aligned with them.

        Args:
            embeddings: features with one row per prompt (see ``ImageEmbeddings.select``).
            prompt_embeds: (P, 1, C), the only sparse prompt token (no padding point, no box).
            multimask: True -> 3 masks (tokens 1-3); False -> 1 mask, with SAM 2's stability
                fallback (the legacy path).

        Returns:
            low-res mask logits (P, K, S/4, S/4), predicted IoU (P, K), K = 3 or 1, and SAM 2's
            object-presence logit (P,).
        """
        decoder = self.visual_model.sam_mask_decoder
        prompt_encoder = self.visual_model.sam_prompt_encoder
        n = prompt_embeds.shape[0]
        dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            n, -1, *prompt_encoder.image_embedding_size
        )
        low_res, iou, _, presence = decoder(
            image_embeddings=embeddings.image_embed,
            image_pe=self.image_pe.to(prompt_embeds.dtype),
            sparse_prompt_embeddings=prompt_embeds,
            dense_prompt_embeddings=dense.to(prompt_embeds.dtype),
            multimask_output=multimask,
            repeat_image=False,
            high_res_features=embeddings.high_res,
        )
        return DecodedMasks(low_res, iou, presence[:, 0])

    @torch.no_grad()
    def refresh_image_pe(self) -> None:
        """Cache SAM 2's dense positional encoding (1, C, S/16, S/16) as the ``image_pe`` buffer.

        Call after loading weights and before casting to half precision: PyPI sam2 computes it
        from a float32 grid and fails against a float16 Fourier matrix, and it is constant anyway.
        """
        pe = self.visual_model.sam_prompt_encoder.get_dense_pe().float()
        self.register_buffer("image_pe", pe, persistent=False)
