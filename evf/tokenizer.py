"""The EVF-SAM2 tokenizer: a sentencepiece model with XLM-RoBERTa's (fairseq) id rules.

This reproduces ``XLMRobertaTokenizer`` (the slow tokenizer the authors load with
``use_fast=False``) without depending on transformers, whose 5.x rewrite changed how the vocab
file is read. Id rules:

- ``<s>`` = 0, ``<pad>`` = 1, ``</s>`` = 2, ``<unk>`` = 3;
- sentencepiece piece ``p`` -> ``p + 1``, except sentencepiece's own unknown (0) -> 3;
- ``<mask>`` = ``len(sp) + 1``; added tokens (``[semantic]`` in the multitask checkpoints) take
  the ids in ``added_tokens.json`` / ``tokenizer_config.json``. Added tokens are matched
  literally in the text and the text on either side is encoded separately.
- an encoded prompt is ``[0, ..., 2]``: no truncation, no lower-casing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch

BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
FAIRSEQ_OFFSET = 1
SEMANTIC_TOKEN = "[semantic]"
SEMANTIC_PREFIX = SEMANTIC_TOKEN + " "
SPM_FILE = "sentencepiece.bpe.model"


class PromptTooLongError(ValueError):
    """A prompt has more tokens than the model's text position table."""


@dataclass(frozen=True)
class AddedToken:
    content: str
    id: int
    lstrip: bool = False
    rstrip: bool = False


class EvfTokenizer:
    """Turns prompts into BEiT-3 input ids, exactly as the authors' slow XLM-R tokenizer."""

    def __init__(self, spm_path: str | Path, added_tokens: Sequence[AddedToken] = ()) -> None:
        self.sp = spm.SentencePieceProcessor(model_file=str(spm_path))
        mask = AddedToken("<mask>", len(self.sp) + FAIRSEQ_OFFSET, lstrip=True)
        specials = [AddedToken("<s>", BOS_ID), AddedToken("<pad>", PAD_ID), AddedToken("</s>", EOS_ID)]
        specials += [AddedToken("<unk>", UNK_ID), mask]
        by_content = {t.content: t for t in [*specials, *added_tokens]}
        self.added = by_content
        # Longest first, so that a token that is a prefix of another does not win.
        names = sorted(by_content, key=len, reverse=True)
        self._splitter = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")

    @classmethod
    def from_folder(cls, folder: str | Path) -> EvfTokenizer:
        """Load ``sentencepiece.bpe.model`` plus the added tokens of a checkpoint folder."""
        folder = Path(folder)
        added: dict[str, AddedToken] = {}
        config_path = folder / "tokenizer_config.json"
        if config_path.exists():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            for token_id, entry in config.get("added_tokens_decoder", {}).items():
                added[entry["content"]] = AddedToken(
                    entry["content"], int(token_id), bool(entry.get("lstrip")), bool(entry.get("rstrip"))
                )
        added_path = folder / "added_tokens.json"
        if added_path.exists():
            for content, token_id in json.loads(added_path.read_text(encoding="utf-8")).items():
                added.setdefault(content, AddedToken(content, int(token_id)))
        return cls(folder / SPM_FILE, list(added.values()))

    @property
    def supports_semantic(self) -> bool:
        """True for the ``-multitask`` tokenizers, which have the ``[semantic]`` token."""
        return SEMANTIC_TOKEN in self.added

    def _piece_ids(self, text: str) -> list[int]:
        unk = self.sp.unk_id()
        return [p + FAIRSEQ_OFFSET if p != unk else UNK_ID for p in self.sp.encode(text)]

    def encode(self, prompt: str, semantic: bool = False) -> list[int]:
        """Ids ``[0, ..., 2]`` for one prompt; ``semantic`` prepends ``"[semantic] "`` (authors' demo.py)."""
        text = SEMANTIC_PREFIX + prompt if semantic else prompt
        parts = self._splitter.split(text)
        ids = [BOS_ID]
        for i, part in enumerate(parts):
            if i % 2 == 1:  # an added token
                ids.append(self.added[part].id)
                continue
            if i > 0 and self.added[parts[i - 1]].rstrip:
                part = part.lstrip()
            if i + 1 < len(parts) and self.added[parts[i + 1]].lstrip:
                part = part.rstrip()
            if part:
                ids.extend(self._piece_ids(part))
        ids.append(EOS_ID)
        return ids

    def batch(
        self, prompts: Sequence[tuple[str, bool]], max_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Right-padded ids (P, T) and a padding mask (P, T, True = pad), or None when no row is padded.

        Raises:
            PromptTooLongError: a prompt does not fit in ``max_tokens`` ids.
        """
        encoded = [self.encode(text, semantic) for text, semantic in prompts]
        for (text, _), ids in zip(prompts, encoded, strict=True):
            if len(ids) > max_tokens:
                raise PromptTooLongError(
                    f"prompt has {len(ids)} tokens, the model accepts at most {max_tokens}: {text[:80]!r}"
                )
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), PAD_ID, dtype=torch.long)
        padding = torch.ones((len(encoded), width), dtype=torch.bool)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            padding[row, : len(ids)] = False
        return input_ids, (padding if bool(padding.any()) else None)
