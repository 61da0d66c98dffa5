"""Export a trained model as a Hugging Face-style directory that `jp.load` (and transformers) reads:

    <dir>/config.json          transformers spelling (model_type, num_hidden_layers, rope_scaling...)
    <dir>/model.safetensors    HF tensor names and layouts (`loading.weights.to_hf_tensors`, or
                               `loading.deepseek_weights.deepseek_to_hf_tensors` for DeepSeek);
                               with `max_shard_bytes`, model-0000i-of-0000N.safetensors +
                               model.safetensors.index.json instead
    <dir>/tokenizer.json + tokenizer_config.json      the run's tokenizer: its own files for an
                               HF/GGUF tokenizer; for the byte tokenizer an equivalent byte-level
                               one (ids 0-255 = UTF-8 bytes, 256 EOS, 257 BOS), so the export
                               answers text prompts. A run without a tokenizer (synthetic tokens)
                               exports weights only.

A LoRA run also exports its adapter alone (`export_adapter`): one small safetensors file in
PEFT's tensor names and layouts plus JSON metadata (`jaxprefill.loading.adapter` describes the
format), which `jp.load(base, adapter=file)` merges into the base while loading.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Sequence

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from jaxprefill import lora
from jaxprefill.config import MLA_MODEL_TYPES, SUPPORTED_MODEL_TYPES, MLAConfig, ModelConfig
from jaxprefill.data.tokenize import ByteTokenizer
from jaxprefill.loading.adapter import METADATA_KEY, PREFIX
from jaxprefill.loading.deepseek_weights import deepseek_to_hf_tensors, mla_hf_name_map
from jaxprefill.loading.tokenizer import _byte_alphabet
from jaxprefill.loading.weights import hf_name_map, to_hf, to_hf_tensors

_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
              np.dtype(np.float16): "F16"}
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


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
    d.update(_rope_hf(rope))
    if rope.type == "default" and rope.original_max_position_embeddings not in (
            None, cfg.max_position_embeddings):
        d["original_max_position_embeddings"] = rope.original_max_position_embeddings
    if cfg.bos_token_id is not None:
        d["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_ids:
        d["eos_token_id"] = list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_ids[0]
    return d


def _rope_hf(rope) -> dict[str, Any]:
    """`rope_theta` + `rope_scaling` (transformers 4 spelling) of a RopeConfig."""
    d: dict[str, Any] = {"rope_theta": rope.theta}
    if rope.type != "default":
        scaling: dict[str, Any] = {"rope_type": rope.type, "type": rope.type, "factor": rope.factor,
                                   "original_max_position_embeddings": rope.original_max_position_embeddings}
        if rope.type == "llama3":
            scaling.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
        if rope.type == "yarn":
            scaling.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, truncate=rope.truncate)
            for k in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(rope, k) is not None:
                    scaling[k] = getattr(rope, k)
        d["rope_scaling"] = scaling
    return d


def mla_hf_config_dict(cfg: MLAConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """`MLAConfig` -> DeepSeek-V2/V3 config.json dict; `MLAConfig.from_hf_dict` of it gives an
    equivalent config (same shapes, routing, RoPE and softmax scale)."""
    d: dict[str, Any] = {
        "architectures": [MLA_MODEL_TYPES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,  # unused by MLA; transformers expects it
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "hidden_act": "silu",
        "n_routed_experts": cfg.n_routed_experts or None,
        "n_shared_experts": cfg.n_shared_experts or None,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "first_k_dense_replace": cfg.first_k_dense_replace,
        "moe_layer_freq": cfg.moe_layer_freq,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "scoring_func": cfg.scoring_func,
        "topk_method": cfg.topk_method,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "norm_topk_prob": cfg.norm_topk_prob,
        "torch_dtype": torch_dtype,
        **_rope_hf(cfg.rope),
    }
    if cfg.model_type != "deepseek_v2":  # V2 is always interleaved; V3 has the switch
        d["rope_interleave"] = cfg.rope_interleave
    elif not cfg.rope_interleave:
        raise ValueError("deepseek_v2 has no rope_interleave switch; export as deepseek_v3")
    if cfg.bos_token_id is not None:
        d["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_ids:
        d["eos_token_id"] = list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_ids[0]
    return d


def save_sharded_safetensors(out_dir: str, tensors: dict[str, np.ndarray],
                             max_shard_bytes: int | None) -> list[str]:
    """model.safetensors, or (when the tensors exceed `max_shard_bytes`) shards of at most that
    many bytes each (a single larger tensor gets a shard of its own) + the HF index.json.
    Returns the file names written."""
    total = sum(np.asarray(t).nbytes for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_safetensors(os.path.join(out_dir, "model.safetensors"), tensors)
        return ["model.safetensors"]
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = np.asarray(tensors[name]).nbytes
        if shards[-1] and size + nbytes > max_shard_bytes - 65536:  # room for the JSON header
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    n = len(shards)
    files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for fname, shard in zip(files, shards):
        save_safetensors(os.path.join(out_dir, fname), shard)
        weight_map.update({k: fname for k in shard})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return files + ["model.safetensors.index.json"]


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


# Names of the byte tokenizer's two special ids in the exported tokenizer.json; unusual on
# purpose, because a prompt that spells an added token's name encodes to that token.
BYTE_EOS, BYTE_BOS = "<|byte_eos|>", "<|byte_bos|>"


def byte_level_tokenizer(add_bos: bool = False) -> Tokenizer:
    """A `tokenizers.Tokenizer` that encodes text exactly as the data pipeline's `ByteTokenizer`
    (UTF-8 byte b -> id b) with EOS = 256 and BOS = 257 as special tokens; decoding skips them
    and maps invalid UTF-8 to U+FFFD, as `ByteTokenizer.decode` does. `add_bos`: encoding with
    special tokens prepends BOS (for a run trained with data.add_bos)."""
    alphabet = _byte_alphabet()  # byte -> the printable character byte-level BPE spells it with
    vocab = {alphabet[b]: b for b in range(256)}
    vocab.update({BYTE_EOS: ByteTokenizer.eos_id, BYTE_BOS: ByteTokenizer.bos_id})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    # Already in the vocabulary, so they keep ids 256 and 257; marking them special makes
    # decoding skip them.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BYTE_EOS, BYTE_BOS)])
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BYTE_BOS}:0 $A:0", pair=f"{BYTE_BOS}:0 $A:0 {BYTE_BOS}:1 $B:1",
            special_tokens=[(BYTE_BOS, ByteTokenizer.bos_id)])
    return backend


def write_tokenizer(out_dir: str, tokenizer, *, add_bos: bool = False) -> bool:
    """tokenizer.json + tokenizer_config.json for `tokenizer` (see the module docstring);
    False (nothing written) for None."""
    tok = getattr(tokenizer, "tok", tokenizer)  # unwrap the data pipeline's adapter
    if isinstance(tok, ByteTokenizer):
        backend = byte_level_tokenizer(add_bos)
        tok_cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                   "bos_token": BYTE_BOS, "eos_token": BYTE_EOS}
    elif tok is not None and hasattr(tok, "backend"):
        backend, tok_cfg = tok.backend, dict(tok.special_tokens)
        if tok.chat_template:
            tok_cfg["chat_template"] = tok.chat_template
    elif tok is None:
        return False
    else:
        raise TypeError(f"cannot export a tokenizer of type {type(tok).__name__}: expected "
                        f"jaxprefill's Tokenizer, HFTokenizer or ByteTokenizer")
    backend.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2)
    return True


def export_hf(model, out_dir: str, *, dtype: str = "float32", tokenizer=None, add_bos: bool = False,
              max_shard_bytes: int | None = None) -> str:
    """Write `model` (an NNX `Llama` or `DeepSeek`) to `out_dir`; returns the directory.

    `max_shard_bytes`: split the weights into safetensors shards of at most this size.

    `tokenizer`: a `jaxprefill.loading.tokenizer.Tokenizer`, the data pipeline's `HFTokenizer`
    or `ByteTokenizer` (written as an equivalent byte-level tokenizer.json; `add_bos` makes it
    prepend BOS like a run with data.add_bos), or None (weights only).
    """
    np_dtype = NP_DTYPES[dtype]
    os.makedirs(out_dir, exist_ok=True)
    if isinstance(model.config, MLAConfig):
        hf, config = deepseek_to_hf_tensors(model), mla_hf_config_dict(model.config, dtype)
    else:
        hf, config = to_hf_tensors(model), hf_config_dict(model.config, dtype)
    tensors = {k: v.astype(np_dtype) for k, v in hf.items()}
    for old in os.listdir(out_dir):  # a re-export must not leave stale shards behind
        if old.endswith(".safetensors") or old == "model.safetensors.index.json":
            os.remove(os.path.join(out_dir, old))
    save_sharded_safetensors(out_dir, tensors, max_shard_bytes)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    write_tokenizer(out_dir, tokenizer, add_bos=add_bos)
    return out_dir


# ---- LoRA adapters ------------------------------------------------------------------------------

def config_overrides(cfg: ModelConfig | MLAConfig) -> dict[str, Any]:
    """The config.json fields an adapter carries (`jaxprefill.loading.adapter.OVERRIDABLE`): the
    trained context length and the whole RoPE setting (rope_scaling null for plain RoPE)."""
    rope = _rope_hf(cfg.rope)
    return {"max_position_embeddings": cfg.max_position_embeddings,
            "rope_theta": rope["rope_theta"], "rope_scaling": rope.get("rope_scaling")}


def adapter_metadata(cfg: ModelConfig | MLAConfig, section, base_model: str | None,
                     step: int | None = None) -> dict[str, Any]:
    """The adapter file's JSON metadata for a run with LoRA settings `section` on `base_model`."""
    return {"format": 1, "kind": "lora", "base_model": base_model, "model_type": cfg.model_type,
            "targets": list(section.targets), "rank": section.rank, "alpha": section.alpha,
            "dropout": section.dropout, "train_norms": section.train_norms,
            "train_biases": section.train_biases, "step": step,
            "config_overrides": config_overrides(cfg)}


def adapter_tensors(model, trained: Sequence[tuple] = ()) -> dict[str, np.ndarray]:
    """PEFT-named float32 tensors of `model`'s adapters: lora_A [r, in] and lora_B [out, r] per
    adapted HF weight, plus the whole HF tensor of each path in `trained` that is not a LoRA
    factor (trained norm scales, biases).

    Our W is [*in, *out]; HF's is [out, in] with `in`/`out` flattened, i.e. W_hf = W.reshape(in,
    out).T for every adaptable weight. So A [*in, r] -> A_hf = A.reshape(in, r).T and
    B [r, *out] -> B_hf = B.reshape(r, out).T, and B_hf @ A_hf = (A @ B)^T, our update in HF layout.
    """
    cfg = model.config
    names = mla_hf_name_map(cfg) if isinstance(cfg, MLAConfig) else hf_name_map(cfg)
    host = lambda x: np.asarray(jax.device_get(x), np.float32)  # noqa: E731
    out: dict[str, np.ndarray] = {}
    adapted = set()
    for path, w in lora.lora_weights(model):
        name, _, kind = names[path]
        if kind not in ("in_heads", "out_heads", "transpose") or not name.endswith(".weight"):
            raise ValueError(f"{name}: a {kind!r} tensor cannot carry a LoRA pair")
        a, b = host(w.a[...]), host(w.b[...])
        r = a.shape[-1]
        module = name[:-len(".weight")]
        out[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
        out[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
        adapted.add(path)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path in trained:
        path = tuple(path)
        if path[:-1] in adapted and path[-1] in ("a", "b"):
            continue
        name, hf_shape, kind = names[path]
        out[PREFIX + name] = to_hf(kind, host(flat[path][...]), hf_shape)
    return out


def export_adapter(model, path: str, *, meta: dict[str, Any], trained: Sequence[tuple] = (),
                   dtype: str = "float32") -> str:
    """Write `model`'s adapters (a model with `jaxprefill.lora.LoRAWeight`s) to the safetensors
    file `path` with `meta` as JSON metadata; replaced atomically (a temporary file renamed), so
    an interrupted export leaves the previous file whole. Returns `path`."""
    tensors = {k: v.astype(NP_DTYPES[dtype]) for k, v in adapter_tensors(model, trained).items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save_safetensors(tmp, tensors, {"format": "pt", METADATA_KEY: json.dumps(meta)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
