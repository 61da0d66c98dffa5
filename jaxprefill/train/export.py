"""Export a trained model as a Hugging Face-style directory that `jp.load` (and transformers) reads:

    <dir>/config.json          transformers spelling (model_type, num_hidden_layers, rope_scaling...)
    <dir>/model.safetensors    HF tensor names and layouts (`loading.weights.to_hf_tensors`)
    <dir>/tokenizer.json (+ tokenizer_config.json)   when the run used an HF/GGUF tokenizer
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

from jaxprefill.config import SUPPORTED_MODEL_TYPES, ModelConfig

_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
              np.dtype(np.float16): "F16"}


def hf_config_dict(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """`ModelConfig` -> config.json dict; `ModelConfig.from_hf_dict` of it gives `cfg` back."""
    rope = cfg.rope
    d: dict[str, Any] = {
        "architectures": [SUPPORTED_MODEL_TYPES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "mlp_bias": cfg.mlp_bias,
        "hidden_act": "silu",
        "rope_theta": rope.theta,
        "torch_dtype": torch_dtype,
    }
    if cfg.model_type != "qwen2":  # qwen2 always has q/k/v biases and no o bias
        d["attention_bias"] = cfg.qkv_bias
    if cfg.model_type != "qwen2" and cfg.qkv_bias != cfg.o_bias:
        raise ValueError("transformers' llama/qwen3 have one attention_bias for q/k/v and o; this "
                         f"config has qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}")
    if cfg.sliding_window is not None:
        d["sliding_window"] = cfg.sliding_window
        d["use_sliding_window"] = True
    if rope.type != "default":
        scaling: dict[str, Any] = {"rope_type": rope.type, "factor": rope.factor,
                                   "original_max_position_embeddings": rope.original_max_position_embeddings}
        if rope.type == "llama3":
            scaling.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
        if rope.type == "yarn":
            scaling.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, truncate=rope.truncate)
            for k in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(rope, k) is not None:
                    scaling[k] = getattr(rope, k)
        d["rope_scaling"] = scaling
    elif rope.original_max_position_embeddings not in (None, cfg.max_position_embeddings):
        d["original_max_position_embeddings"] = rope.original_max_position_embeddings
    if cfg.bos_token_id is not None:
        d["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_ids:
        d["eos_token_id"] = list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_ids[0]
    return d


def save_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write a single safetensors file (F32/BF16/F16), tensors in sorted name order."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {a.dtype} is not exportable; use float32/bfloat16/float16")
        header[name] = {"dtype": _ST_DTYPES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format asks for 8-byte aligned data
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for a in arrays:
            f.write(a.tobytes())


def export_hf(model, out_dir: str, *, dtype: str = "float32", tokenizer=None) -> str:
    """Write `model` (an NNX `Llama`) to `out_dir`; returns the directory.

    `tokenizer` is a `jaxprefill.loading.tokenizer.Tokenizer` (or the data pipeline's
    `HFTokenizer`); a byte-level tokenizer has no HF files, so none are written for it.
    """
    from jaxprefill.loading.weights import to_hf_tensors

    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.astype(np_dtype) for k, v in to_hf_tensors(model).items()}
    save_safetensors(os.path.join(out_dir, "model.safetensors"), tensors)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config_dict(model.config, dtype), f, indent=2)
    tok = getattr(tokenizer, "tok", tokenizer)  # unwrap the data pipeline's adapter
    if tok is not None and hasattr(tok, "backend"):
        tok.backend.save(os.path.join(out_dir, "tokenizer.json"))
        tok_cfg = dict(tok.special_tokens)
        if tok.chat_template:
            tok_cfg["chat_template"] = tok.chat_template
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(tok_cfg, f, indent=2)
    return out_dir
