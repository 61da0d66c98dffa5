"""HF-named DeepSeek-V2/V3/V3.2/Kimi-K2 tensors -> our `DeepSeek` module (and back; V3.2's
indexer tensors `self_attn.indexer.{wq_b,wk,k_norm,weights_proj}` -> `DeepSeekV32`).

Two checkpoint layouts of the routed experts are read, per layer, whichever is present:
  * hub layout (DeepSeek's own files and transformers' `save_pretrained`):
    `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight` ([F, E], [F, E], [E, F]);
  * transformers 5 fused layout (its in-memory module names):
    `model.layers.{i}.mlp.experts.gate_up_proj` [N, 2F, E] (gate rows first) and
    `model.layers.{i}.mlp.experts.down_proj` [N, E, F].
FP8 block-quantized checkpoints (`weight_scale_inv`) are not supported: dequantize first.
"""

from __future__ import annotations

import logging
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxprefill.attention import AttentionSpec
from jaxprefill.config import MLAConfig
from jaxprefill.loading.weights import TensorSource, WeightError, to_hf, to_ours
from jaxprefill.models.deepseek import DeepSeek
from jaxprefill.models.dsa import DeepSeekV32
from jaxprefill.sharding import place, state_shardings

log = logging.getLogger(__name__)

# our path -> (HF names it reads, function(tensors) -> host array in our layout)
Getter = tuple[tuple[str, ...], Callable[[TensorSource], np.ndarray]]


def _get(tensors: TensorSource, name: str, shape: tuple[int, ...], source: str) -> np.ndarray:
    if name not in tensors:
        raise WeightError(f"missing tensor {name!r} in {source} (expected shape {shape})")
    raw = tensors[name]
    if tuple(raw.shape) != tuple(shape):
        raise WeightError(f"tensor {name!r} in {source} has shape {tuple(raw.shape)}, expected "
                          f"{tuple(shape)}")
    if str(raw.dtype).startswith("float8"):
        raise WeightError(f"tensor {name!r} in {source} is FP8 block-quantized; dequantize the "
                          f"checkpoint to bf16 first")
    return np.asarray(raw, np.float32)


def mla_hf_name_map(cfg: MLAConfig) -> dict[tuple, tuple[str, tuple[int, ...], str]]:
    """{our path: (HF name, HF shape, layout kind)} for every one-to-one tensor (not experts)."""
    e, h, dc, dr = cfg.hidden_size, cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    dqk, dn, dv = cfg.qk_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    m = {("embed",): ("model.embed_tokens.weight", (cfg.vocab_size, e), "same")}
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}", ("layers", i)
        a, at = f"{hf}.self_attn", ours + ("attn",)
        m[ours + ("attn_norm", "scale")] = (f"{hf}.input_layernorm.weight", (e,), "same")
        m[ours + ("mlp_norm", "scale")] = (f"{hf}.post_attention_layernorm.weight", (e,), "same")
        if cfg.q_lora_rank:
            m[at + ("q_a",)] = (f"{a}.q_a_proj.weight", (cfg.q_lora_rank, e), "transpose")
            m[at + ("q_a_norm", "scale")] = (f"{a}.q_a_layernorm.weight", (cfg.q_lora_rank,), "same")
            m[at + ("q_b",)] = (f"{a}.q_b_proj.weight", (h * dqk, cfg.q_lora_rank), "in_heads")
            if cfg.attention_bias:
                m[at + ("q_a_bias",)] = (f"{a}.q_a_proj.bias", (cfg.q_lora_rank,), "same")
        else:
            m[at + ("q",)] = (f"{a}.q_proj.weight", (h * dqk, e), "in_heads")
        m[at + ("kv_a",)] = (f"{a}.kv_a_proj_with_mqa.weight", (dc + dr, e), "transpose")
        m[at + ("kv_norm", "scale")] = (f"{a}.kv_a_layernorm.weight", (dc,), "same")
        m[at + ("kv_b",)] = (f"{a}.kv_b_proj.weight", (h * (dn + dv), dc), "in_heads")
        m[at + ("o",)] = (f"{a}.o_proj.weight", (e, h * dv), "out_heads")
        if cfg.attention_bias:
            m[at + ("kv_a_bias",)] = (f"{a}.kv_a_proj_with_mqa.bias", (dc + dr,), "same")
            m[at + ("o_bias",)] = (f"{a}.o_proj.bias", (e,), "same")
        if cfg.has_indexer:  # DeepSeek-V3.2's lightning indexer (models/dsa.py)
            ix, hi, di = at + ("indexer",), cfg.index_n_heads, cfg.index_head_dim
            m[ix + ("wq_b",)] = (f"{a}.indexer.wq_b.weight", (hi * di, cfg.q_lora_rank), "in_heads")
            m[ix + ("wk",)] = (f"{a}.indexer.wk.weight", (di, e), "transpose")
            m[ix + ("k_norm", "scale")] = (f"{a}.indexer.k_norm.weight", (di,), "same")
            m[ix + ("k_norm", "bias")] = (f"{a}.indexer.k_norm.bias", (di,), "same")
            m[ix + ("weights_proj",)] = (f"{a}.indexer.weights_proj.weight", (hi, e), "transpose")
        mlp = ours + ("mlp",)
        if cfg.is_moe_layer(i):
            n, f = cfg.n_routed_experts, cfg.moe_intermediate_size
            m[mlp + ("router",)] = (f"{hf}.mlp.gate.weight", (n, e), "transpose")
            if cfg.topk_method == "noaux_tc":
                m[mlp + ("router_bias",)] = (f"{hf}.mlp.gate.e_score_correction_bias", (n,), "same")
            if cfg.n_shared_experts:
                fs = f * cfg.n_shared_experts
                for proj, shape in (("gate", (fs, e)), ("up", (fs, e)), ("down", (e, fs))):
                    m[mlp + ("shared", proj)] = (f"{hf}.mlp.shared_experts.{proj}_proj.weight",
                                                 shape, "transpose")
        else:
            fi = cfg.intermediate_size
            for proj, shape in (("gate", (fi, e)), ("up", (fi, e)), ("down", (e, fi))):
                m[mlp + (proj,)] = (f"{hf}.mlp.{proj}_proj.weight", shape, "transpose")
    m[("norm", "scale")] = ("model.norm.weight", (e,), "same")
    if not cfg.tie_word_embeddings:
        m[("lm_head",)] = ("lm_head.weight", (cfg.vocab_size, e), "transpose")
    return m


def expert_getters(cfg: MLAConfig, tensors: TensorSource, source: str) -> dict[tuple, Getter]:
    """Routed-expert kernels [N, E, F] / [N, F, E] of each MoE layer, from either layout."""
    n, e, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    out: dict[tuple, Getter] = {}
    for i in range(cfg.num_layers):
        if not cfg.is_moe_layer(i):
            continue
        pre, ours = f"model.layers.{i}.mlp.experts", ("layers", i, "mlp")
        fused = f"{pre}.gate_up_proj"
        if fused in tensors:
            def gate_up(t, part, name=fused):
                w = _get(t, name, (n, 2 * f, e), source)  # [N, 2F, E]
                return np.ascontiguousarray(w[:, part * f:(part + 1) * f].transpose(0, 2, 1))
            out[ours + ("gate",)] = ((fused,), lambda t, g=gate_up: g(t, 0))
            out[ours + ("up",)] = ((fused,), lambda t, g=gate_up: g(t, 1))
            down = f"{pre}.down_proj"
            out[ours + ("down",)] = ((down,), lambda t, name=down: np.ascontiguousarray(
                _get(t, name, (n, e, f), source).transpose(0, 2, 1)))
        else:
            for proj, shape in (("gate", (f, e)), ("up", (f, e)), ("down", (e, f))):
                names = tuple(f"{pre}.{x}.{proj}_proj.weight" for x in range(n))
                out[ours + (proj,)] = (names, lambda t, names=names, shape=shape: np.stack(
                    [_get(t, nm, shape, source).T for nm in names]))
    return out


def build_deepseek(cfg: MLAConfig, tensors: TensorSource, *, dtype=jnp.float32,
                   param_dtype=jnp.float32, mesh: Mesh | None = None,
                   attention: AttentionSpec = AttentionSpec(), source: str = "checkpoint",
                   **model_kwargs) -> DeepSeek:
    """A `DeepSeek` whose parameters come from HF-named `tensors`, placed on `mesh`."""
    cls = DeepSeekV32 if cfg.has_indexer else DeepSeek
    abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                          param_dtype=param_dtype, attention=attention,
                                          **model_kwargs))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh) if mesh is not None else None
    sharding_flat = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    names = mla_hf_name_map(cfg)
    experts = expert_getters(cfg, tensors, source)
    flat = nnx.to_flat_state(abstract_state)
    used: set[str] = set()
    for path, var in flat:
        where = "/".join(map(str, path))
        if path in names:
            name, hf_shape, kind = names[path]
            host = to_ours(kind, _get(tensors, name, hf_shape, source), var.shape)
            used.add(name)
        elif path in experts:
            hf_names, getter = experts[path]
            host = getter(tensors)
            used.update(hf_names)
        else:
            raise WeightError(f"no checkpoint mapping for parameter {where}")
        if host.shape != tuple(var.shape):
            raise WeightError(f"parameter {where}: converted shape {host.shape} != {var.shape}")
        sharding = sharding_flat.get(path)
        sharding = getattr(sharding, "value", sharding)
        value = place(lambda idx, h=host: h[idx], var.shape, var.dtype, sharding)
        if hasattr(var, "set_value"):
            var.set_value(value)
        else:
            var.value = value
    unused = [k for k in tensors.keys() if k not in used and "rotary_emb" not in k
              and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if unused:  # e.g. the MTP layer (num_nextn_predict_layers) of V3 checkpoints
        log.warning("%d checkpoint tensors were not used, e.g. %s", len(unused), unused[:5])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def deepseek_to_hf_tensors(model: DeepSeek, fused_experts: bool = False) -> dict[str, np.ndarray]:
    """HF-named float32 host tensors of `model` (hub layout, or transformers 5 fused experts)."""
    cfg = model.config
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for path, (name, hf_shape, kind) in mla_hf_name_map(cfg).items():
        out[name] = to_hf(kind, np.asarray(jax.device_get(flat[path][...]), np.float32), hf_shape)
    for i in range(cfg.num_layers):
        if not cfg.is_moe_layer(i):
            continue
        pre = f"model.layers.{i}.mlp.experts"
        g, u, d = (np.asarray(jax.device_get(flat[("layers", i, "mlp", p)][...]), np.float32)
                   for p in ("gate", "up", "down"))
        if fused_experts:
            out[f"{pre}.gate_up_proj"] = np.concatenate([g, u], axis=2).transpose(0, 2, 1).copy()
            out[f"{pre}.down_proj"] = d.transpose(0, 2, 1).copy()
        else:
            for x in range(cfg.n_routed_experts):
                out[f"{pre}.{x}.gate_proj.weight"] = g[x].T.copy()
                out[f"{pre}.{x}.up_proj.weight"] = u[x].T.copy()
                out[f"{pre}.{x}.down_proj.weight"] = d[x].T.copy()
    return out
