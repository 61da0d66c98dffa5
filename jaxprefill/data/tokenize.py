"""Text -> token ids for training: a byte-level tokenizer or any tokenizer `jp.load` understands.

Both expose the small `TextTokenizer` surface the pipeline needs (`encode`, `vocab_size`,
`bos_id`, `eos_id`), so the pipeline never cares which one it got.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from jaxprefill.config import ConfigError
from jaxprefill.loading import BUNDLED_MODELS
from jaxprefill.loading.gguf_reader import bundled_gguf_path
from jaxprefill.loading.tokenizer import Tokenizer


class TextTokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> np.ndarray: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, EOS = 256, BOS = 257 (vocab 258): needs no files at all."""

    vocab_size = 258
    eos_id = 256
    bos_id = 257

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """Adapter over `jaxprefill.loading.tokenizer.Tokenizer` (no special tokens added by encode:
    the pipeline adds BOS/EOS itself so every tokenizer behaves the same)."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.vocab_size = int(tok.vocab_size)
        self.bos_id = tok.bos_token_id
        self.eos_id = tok.eos_token_ids[0] if tok.eos_token_ids else None

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False), np.int32)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def make_tokenizer(spec: str, model_source: str | None = None) -> TextTokenizer:
    """`spec`: "byte"; "model" (the tokenizer of `model_source`); or a bundled model name, an HF
    directory with tokenizer.json, or a .gguf file."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "model":
        if not model_source:
            raise ConfigError("data.tokenizer=model needs model.pretrained (a model with a "
                              "tokenizer)")
        spec = model_source

    if spec.lower() in BUNDLED_MODELS:
        return HFTokenizer(Tokenizer.from_gguf(bundled_gguf_path(spec.lower())))
    if os.path.isdir(spec):
        tok = Tokenizer.from_hf_dir(spec)
        if tok is None:
            raise FileNotFoundError(f"data.tokenizer: {spec} has no tokenizer.json")
        return HFTokenizer(tok)
    if spec.lower().endswith(".gguf") and os.path.isfile(spec):
        return HFTokenizer(Tokenizer.from_gguf(spec))
    raise ConfigError(f"data.tokenizer: {spec!r} is not 'byte', 'model', a bundled model "
                      f"{BUNDLED_MODELS}, an HF directory or a .gguf file")
