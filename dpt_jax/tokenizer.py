"""The CLIP tokenizer of a Stable Diffusion checkpoint, as fixed-length numpy id arrays.

A thin wrapper over transformers' ``CLIPTokenizer``, which in transformers 5 is always backed by
the Rust ``tokenizers`` library (built from ``tokenizer.json`` or from ``vocab.json`` +
``merges.txt``), so character offsets come from ``return_offsets_mapping``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Sequence, Tuple, Union

import numpy as np

logger = logging.getLogger(__name__)

# CLIP's text context; used when a tokenizer config leaves model_max_length at transformers'
# "unlimited" sentinel.
CLIP_CONTEXT = 77
Texts = Union[str, Sequence[str]]


class Tokenizer:
    """Prompts -> int32 ids ``[B, model_max_length]``: BOS, tokens, EOS, then padding."""

    def __init__(self, tokenizer: Any, source: str = "") -> None:
        self.tokenizer = tokenizer
        self.source = source
        length = int(tokenizer.model_max_length)
        self.model_max_length = length if length <= 1_000_000 else CLIP_CONTEXT
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.eos_token_id = int(tokenizer.eos_token_id)
        self.bos_token_id = int(tokenizer.bos_token_id)

    def _encode(self, texts: Texts, offsets: bool = False) -> Dict[str, Any]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:  # transformers' tokenizers fail on an empty batch (IndexError)
            empty = np.zeros((0, self.model_max_length), np.int32)
            return {"input_ids": empty, "attention_mask": empty,
                    "offset_mapping": np.zeros(empty.shape + (2,), np.int32)}
        enc = self.tokenizer(texts, padding="max_length", max_length=self.model_max_length,
                             truncation=True, return_offsets_mapping=offsets)
        full = self.tokenizer(texts, verbose=False)["input_ids"]
        for text, ids in zip(texts, full):
            if len(ids) > self.model_max_length:
                logger.warning("prompt truncated from %d to %d tokens: %r", len(ids),
                               self.model_max_length, text)
        return enc

    def __call__(self, texts: Texts) -> np.ndarray:
        return np.asarray(self._encode(texts)["input_ids"], np.int32)

    def token_mask(self, texts: Texts) -> np.ndarray:
        """bool ``[B, model_max_length]``: True on the real tokens, BOS to EOS inclusive."""
        return np.asarray(self._encode(texts)["attention_mask"], bool)

    def token_positions(self, text: str, char_spans: Sequence[Tuple[int, int]]) -> np.ndarray:
        """bool ``[model_max_length]``: the token positions (BOS at 0) whose characters overlap any
        half-open span ``[start, end)`` of ``text``. Special and padding tokens never match."""
        offsets = np.asarray(self._encode(text, offsets=True)["offset_mapping"][0]).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        hit = np.zeros(len(offsets), bool)
        for start, end in char_spans:
            hit |= (starts < end) & (ends > start) & (ends > starts)
        return hit


def load_tokenizer(folder: str) -> Tokenizer:
    """Load the tokenizer of ``folder``: a ``tokenizer/`` folder or the pipeline folder above it."""
    if os.path.isdir(os.path.join(folder, "tokenizer")):
        folder = os.path.join(folder, "tokenizer")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"missing tokenizer folder {folder}")
    has = lambda name: os.path.isfile(os.path.join(folder, name))
    if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
        raise FileNotFoundError(f"no tokenizer files in {folder}: expected tokenizer.json or "
                                "vocab.json + merges.txt")
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    if not tokenizer.is_fast:  # transformers < 5 could hand back the pure-Python one: no offsets
        raise RuntimeError(f"{folder}: a tokenizers-backed CLIP tokenizer is needed for character offsets")
    return Tokenizer(tokenizer, source=folder)
