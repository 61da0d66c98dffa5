"""Put Hugging Face-named tensors into an NNX model, straight into the target sharding.

`hf_name_map(cfg)` says, for each parameter path of our Llama module, which HF tensor feeds it
and how to reshape it. `build_model` creates the module abstractly (no random init, no memory),
converts one tensor at a time on the host, and lets each device pull only its own shard.
"""

from __future__ import annotations

import logging
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxprefill.attention import AttentionSpec
from jaxprefill.config import ModelConfig
from jaxprefill.models import Llama
from jaxprefill.sharding import place, state_shardings

log = logging.getLogger(__name__)

# How a HF tensor maps to our layout (see `to_ours` / `to_hf`).
#   same:       identical
#   transpose:  HF [out, in] <-> ours [in, out]
#   in_heads:   HF [h*d, e]  <-> ours [e, h, d]   (q/k/v kernels)
#   out_heads:  HF [e, h*d]  <-> ours [h, d, e]   (o kernel)
#   heads_bias: HF [h*d]     <-> ours [h, d]
KINDS = ("same", "transpose", "in_heads", "out_heads", "heads_bias")


def to_ours(kind: str, hf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """HF array -> our layout of `shape` (host numpy)."""
    hf = np.asarray(hf)
    if kind in ("same", "heads_bias"):
        return hf.reshape(shape)
    if kind == "transpose":
        return np.ascontiguousarray(hf.T)
    if kind in ("in_heads", "out_heads"):
        return np.ascontiguousarray(hf.T).reshape(shape)
    raise ValueError(kind)


def to_hf(kind: str, ours: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
    """Our layout -> HF array of `hf_shape` (inverse of `to_ours`)."""
    ours = np.asarray(ours)
    if kind in ("same", "heads_bias"):
        return ours.reshape(hf_shape)
    if kind == "transpose":
        return np.ascontiguousarray(ours.T)
    if kind in ("in_heads", "out_heads"):
        return np.ascontiguousarray(ours.reshape(hf_shape[::-1]).T)
    raise ValueError(kind)


class TensorSource(Protocol):
    def __contains__(self, name: str) -> bool: ...
    def __getitem__(self, name: str) -> np.ndarray: ...
    def keys(self): ...


class WeightError(ValueError):
    """A checkpoint tensor is missing or has the wrong shape; the message names it."""


def hf_name_map(cfg: ModelConfig) -> dict[tuple, tuple[str, tuple[int, ...], str]]:
    """{our param path: (HF tensor name, HF shape, layout kind)} for the Llama family."""
    e, hq, hkv, d, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size

    m = {("embed",): ("model.embed_tokens.weight", (cfg.vocab_size, e), "same")}
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}", ("layers", i)
        a = f"{hf}.self_attn"
        m[ours + ("attn_norm", "scale")] = (f"{hf}.input_layernorm.weight", (e,), "same")
        m[ours + ("mlp_norm", "scale")] = (f"{hf}.post_attention_layernorm.weight", (e,), "same")
        m[ours + ("attn", "q")] = (f"{a}.q_proj.weight", (hq * d, e), "in_heads")
        m[ours + ("attn", "k")] = (f"{a}.k_proj.weight", (hkv * d, e), "in_heads")
        m[ours + ("attn", "v")] = (f"{a}.v_proj.weight", (hkv * d, e), "in_heads")
        m[ours + ("attn", "o")] = (f"{a}.o_proj.weight", (e, hq * d), "out_heads")
        if cfg.qkv_bias:
            m[ours + ("attn", "q_bias")] = (f"{a}.q_proj.bias", (hq * d,), "heads_bias")
            m[ours + ("attn", "k_bias")] = (f"{a}.k_proj.bias", (hkv * d,), "heads_bias")
            m[ours + ("attn", "v_bias")] = (f"{a}.v_proj.bias", (hkv * d,), "heads_bias")
        if cfg.o_bias:
            m[ours + ("attn", "o_bias")] = (f"{a}.o_proj.bias", (e,), "same")
        if cfg.qk_norm:
            m[ours + ("attn", "q_norm", "scale")] = (f"{a}.q_norm.weight", (d,), "same")
            m[ours + ("attn", "k_norm", "scale")] = (f"{a}.k_norm.weight", (d,), "same")
        for proj, shape in (("gate", (f, e)), ("up", (f, e)), ("down", (e, f))):
            m[ours + ("mlp", proj)] = (f"{hf}.mlp.{proj}_proj.weight", shape, "transpose")
            if cfg.mlp_bias:
                m[ours + ("mlp", f"{proj}_bias")] = (f"{hf}.mlp.{proj}_proj.bias", shape[:1], "same")
    m[("norm", "scale")] = ("model.norm.weight", (e,), "same")
    if not cfg.tie_word_embeddings:
        m[("lm_head",)] = ("lm_head.weight", (cfg.vocab_size, e), "transpose")
    return m


def build_model(cfg: ModelConfig, tensors: TensorSource, *, dtype=jnp.float32,
                param_dtype=jnp.float32, mesh: Mesh | None = None,
                attention: AttentionSpec = AttentionSpec(), source: str = "checkpoint") -> Llama:
    """A `Llama` whose parameters come from HF-named `tensors`, placed on `mesh` (or device 0).

    Raises WeightError naming the tensor when one is missing or mis-shaped.
    """
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                            param_dtype=param_dtype, attention=attention))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh) if mesh is not None else None
    sharding_flat = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    names = hf_name_map(cfg)
    flat = nnx.to_flat_state(abstract_state)
    used = set()
    for path, var in flat:
        if path not in names:
            raise WeightError(f"no checkpoint mapping for parameter {'/'.join(map(str, path))}")
        name, hf_shape, kind = names[path]
        where = "/".join(map(str, path))
        if name not in tensors:
            raise WeightError(f"missing tensor {name!r} in {source} (needed for {where}, "
                              f"expected shape {hf_shape})")
        raw = tensors[name]
        if tuple(raw.shape) != hf_shape:
            raise WeightError(f"tensor {name!r} in {source} has shape {tuple(raw.shape)}, expected "
                              f"{hf_shape} (hidden={cfg.hidden_size}, heads={cfg.num_heads}, "
                              f"kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim}, "
                              f"intermediate={cfg.intermediate_size}, vocab={cfg.vocab_size})")
        host = to_ours(kind, raw, var.shape)
        sharding = sharding_flat.get(path)
        sharding = getattr(sharding, "value", sharding)
        value = place(lambda idx, h=host: h[idx], var.shape, param_dtype, sharding)
        if hasattr(var, "set_value"):  # flax >= 0.12 deprecates the .value setter
            var.set_value(value)
        else:
            var.value = value
        used.add(name)
    unused = [k for k in tensors.keys() if k not in used and not k.endswith("rotary_emb.inv_freq")
              and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if unused:
        log.warning("%d checkpoint tensors were not used, e.g. %s", len(unused), unused[:5])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def to_hf_tensors(model: Llama) -> dict[str, np.ndarray]:
    """HF-named float32 host tensors of `model` (for export and tests); inverse of `build_model`."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for path, (name, hf_shape, kind) in hf_name_map(model.config).items():
        value = np.asarray(jax.device_get(flat[path][...]), np.float32)
        out[name] = to_hf(kind, value, hf_shape)
    return out
