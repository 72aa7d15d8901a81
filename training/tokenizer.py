"""Build the tokenizer files of a new EVF-SAM2 model, in the official checkpoint layout.

The official checkpoints ship a slow ``XLMRobertaTokenizer``: ``sentencepiece.bpe.model`` plus
``tokenizer_config.json``, ``special_tokens_map.json`` and (multitask) ``added_tokens.json``.
``build_tokenizer`` trains a small sentencepiece BPE model on a text corpus and writes the same
four files, with the same id rules as the fixture and the official files: ``<s>``=0, ``<pad>``=1,
``</s>``=2, ``<unk>``=3, piece ``p`` -> ``p + 1``, ``<mask>`` = ``len(sp) + 1`` and
``[semantic]`` = ``len(sp) + 2``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sentencepiece as spm

from evf.tokenizer import BOS_ID, EOS_ID, FAIRSEQ_OFFSET, PAD_ID, SEMANTIC_TOKEN, SPM_FILE, UNK_ID

# Spare embedding rows after the last used id, as in the official 64010 = 64003 + 7.
SPARE_VOCAB_ROWS = 7


def _added_token(content: str, *, lstrip: bool = False, normalized: bool = False, special: bool = True):
    return {
        "content": content,
        "lstrip": lstrip,
        "normalized": normalized,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def tokenizer_files(num_pieces: int) -> dict[str, Any]:
    """The three JSON files (name -> content) for a sentencepiece model with ``num_pieces`` pieces."""
    mask_id = num_pieces + FAIRSEQ_OFFSET
    semantic_id = mask_id + 1
    decoder = {
        str(BOS_ID): _added_token("<s>"),
        str(PAD_ID): _added_token("<pad>"),
        str(EOS_ID): _added_token("</s>"),
        str(UNK_ID): _added_token("<unk>"),
        str(mask_id): _added_token("<mask>", lstrip=True),
        str(semantic_id): _added_token(SEMANTIC_TOKEN, normalized=True, special=False),
    }
    config = {
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": True,
        "cls_token": "<s>",
        "eos_token": "</s>",
        "mask_token": "<mask>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "sep_token": "</s>",
        "sp_model_kwargs": {},
        "tokenizer_class": "XLMRobertaTokenizer",
        "unk_token": "<unk>",
    }
    mask_entry = {k: v for k, v in _added_token("<mask>", lstrip=True).items() if k != "special"}
    special_map = {
        "bos_token": "<s>",
        "cls_token": "<s>",
        "eos_token": "</s>",
        "mask_token": mask_entry,
        "pad_token": "<pad>",
        "sep_token": "</s>",
        "unk_token": "<unk>",
    }
    return {
        "tokenizer_config.json": config,
        "special_tokens_map.json": special_map,
        "added_tokens.json": {SEMANTIC_TOKEN: semantic_id},
    }


def embedding_rows(num_pieces: int) -> int:
    """BEiT-3 ``vocab_size`` for a sentencepiece model: used ids (pieces + 3) plus spare rows."""
    return num_pieces + 3 + SPARE_VOCAB_ROWS


def build_tokenizer(corpus: Iterable[str], folder: str | Path, vocab_size: int = 256) -> Path:
    """Train a BPE sentencepiece model on ``corpus`` and write the four tokenizer files to ``folder``.

    ``vocab_size`` is an upper bound (``hard_vocab_limit=False``): a small corpus gives fewer
    pieces. Normalisation is sentencepiece's default ``nmt_nfkc``; characters never seen in the
    corpus become ``<unk>``. Training is deterministic, so the same corpus gives the same files.
    """
    sentences = sorted({line.strip() for line in corpus if line.strip()})
    if not sentences:
        raise ValueError("cannot build a tokenizer from an empty corpus")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (folder / SPM_FILE).write_bytes(model.getvalue())
    num_pieces = len(spm.SentencePieceProcessor(model_proto=model.getvalue()))
    for name, content in tokenizer_files(num_pieces).items():
        (folder / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return folder
