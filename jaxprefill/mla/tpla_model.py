"""TPLA driving a `DeepSeek` model over a contiguous cache: teacher-forced logits, prefill and
decode steps (the engine's paged version is `jaxprefill.mla.tpla_steps`).

The functions below take a model from `reparameterize` (gamma and R folded into the weights,
kv_a_layernorm weight 1), because the TPLA cache holds the normalized ROTATED latent and
`pack_latent` applies no norm weight. Prefill stays MLA (the model's own exact forward); it
writes the packed (sliced, per-shard normalized) latent. Decode runs TPLA on the mesh axis.

Shapes: B batch, S tokens, T cache length, H heads, d_c latent, d_r rope, d_v value, g shards,
w = d_c/g + (d_r or d_r/g) cache values per token per device.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxprefill.mla.tpla import TPLAConfig, pack_latent, rope_pair_order, shard_map, tpla_decode
from jaxprefill.models.deepseek import write_latent
from jaxprefill.models.layers import apply_rope_pairs

def require_folded(model) -> None:
    """TPLA needs the kv_a_layernorm weight folded away (`reparameterize`); checked when the
    weights are concrete (a traced call cannot be checked and is trusted)."""
    for i, layer in enumerate(model.layers):
        scale = layer.attn.kv_norm.scale[...]
        if isinstance(scale, jax.core.Tracer):
            return
        if not np.allclose(np.asarray(scale, np.float32), 1.0):
            raise ValueError(f"layer {i}: kv_a_layernorm weight is not folded; pass the model "
                             f"through jaxprefill.mla.tpla.reparameterize(model, transform) first")


def raw_latent(attn, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B, S, E] -> (rotated latent BEFORE its RMSNorm [B, S, d_c], roped k_pe [B, S, d_r]);
    `MLAttention.latent` without the norm (TPLA normalizes per `TPLAConfig.norm`)."""
    cfg, dt = attn.cfg, x.dtype
    kv = x @ attn.kv_a[...].astype(dt)
    if cfg.attention_bias:
        kv = kv + attn.kv_a_bias[...].astype(dt)
    c, k_pe = kv[..., :cfg.kv_lora_rank], kv[..., cfg.kv_lora_rank:]
    k_pe = apply_rope_pairs(k_pe[:, :, None, :], cos, sin, interleaved=cfg.rope_interleave)[:, :, 0]
    return c, k_pe


def _rope_for_shards(q_pe: jax.Array, g: int, tcfg: TPLAConfig) -> tuple[jax.Array, P]:
    """q_pe [..., d_r] in the cache's RoPE layout and its PartitionSpec over the last axis."""
    spec = [None] * q_pe.ndim
    if tcfg.rope == "split":
        q_pe = q_pe[..., rope_pair_order(q_pe.shape[-1], g)]
        spec[-1] = tcfg.axis
    return q_pe, P(*spec)


def tpla_attention(q_latent: jax.Array, q_pe: jax.Array, packed_ctx: jax.Array,
                   packed_self: jax.Array, w_uv: jax.Array, *, mesh: Mesh, tcfg: TPLAConfig,
                   sm_scale: float, segment_ids: jax.Array | None = None) -> jax.Array:
    """Teacher-forced TPLA: the attention output o [B, S, H, d_v] that decode computes for every
    query t over its prefix, all positions at once (no token loop).

    q_latent [B, S, H, d_c] (absorbed with W_UK'), q_pe [B, S, H, d_r] (roped), w_uv [d_c, H, d_v].
    packed_ctx [B, S, g*w]: the cached entries of the PREFIX keys j < t (`pack_latent`);
    packed_self [B, S, g*w]: the entry query t writes for itself before attending (j = t).
    Passing the same array twice is plain causal TPLA; passing the MLA stream's entries as
    packed_ctx is "prefill with MLA, decode token t with TPLA". segment_ids [B, S]: attend only
    within a document. Each shard: its own softmax over its slice; outputs summed with psum.
    """
    g = mesh.shape[tcfg.axis]
    ax = tcfg.axis
    tau = sm_scale * (g if tcfg.logit_scale == "g" else 1)
    q_pe, qpe_spec = _rope_for_shards(q_pe, g, tcfg)
    b, s = q_latent.shape[:2]
    if segment_ids is None:
        segment_ids = jnp.ones((b, s), jnp.int32)

    @partial(shard_map, mesh=mesh,
             in_specs=(P(None, None, None, ax), qpe_spec, P(None, None, ax), P(None, None, ax),
                       P(ax, None, None), P()),
             out_specs=P(), check_vma=False)
    def body(ql, qp, ctx, own, wuv, seg):
        f32 = jnp.float32
        ql, qp = ql.astype(f32), qp.astype(f32)
        dcl = ql.shape[-1]
        u, kr = ctx[..., :dcl].astype(f32), ctx[..., dcl:].astype(f32)
        u_own, kr_own = own[..., :dcl].astype(f32), own[..., dcl:].astype(f32)
        scores = tau * (jnp.einsum("bshc,btc->bhst", ql, u) + jnp.einsum("bshr,btr->bhst", qp, kr))
        own_score = tau * (jnp.einsum("bshc,bsc->bhs", ql, u_own) + jnp.einsum("bshr,bsr->bhs", qp, kr_own))
        idx = jnp.arange(s)
        prefix = (idx[None, :] < idx[:, None])[None, None] & (seg[:, None, :, None] == seg[:, None, None, :])
        diag = (idx[None, :] == idx[:, None])[None, None]
        scores = jnp.where(diag, own_score[..., None], jnp.where(prefix, scores, -jnp.inf))
        p = jax.nn.softmax(scores, axis=-1)  # this shard's own softmax
        o_lat = jnp.einsum("bhst,btc->bshc", jnp.where(diag, 0.0, p), u)
        o_lat = o_lat + jnp.einsum("bhs,bsc->bshc", jnp.diagonal(p, axis1=-2, axis2=-1), u_own)
        part = jnp.einsum("bshc,chv->bshv", o_lat, wuv.astype(f32))
        return jax.lax.psum(part, ax)

    return body(q_latent, q_pe, packed_ctx, packed_self, w_uv, segment_ids)


def folded_w_uv(attn) -> jax.Array:
    """W_UV' [d_c, H, d_v] (the value half of the folded kv_b)."""
    return attn.kv_b[...][..., attn.cfg.qk_nope_head_dim:]


def tpla_logits(model, tokens: jax.Array, *, mesh: Mesh, tcfg: TPLAConfig,
                positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                context: str = "tpla") -> jax.Array:
    """Teacher-forced float32 logits [B, S, V] with every layer's attention done the TPLA way.

    context="tpla": every earlier token's cache entry also came from TPLA hidden states (as if
      the whole sequence had been decoded token by token with TPLA);
    context="mla": the prefix's entries come from the exact MLA forward (prefill with MLA, then
      decode token t with TPLA): logits[:, t] equal `tpla_prefill(tokens[:, :t])` followed by one
      `tpla_decode_step(tokens[:, t])` (tested). Identical for a 1-layer model.
    `model` comes from `reparameterize`; with g = 1 both equal the MLA logits.
    """
    if context not in ("tpla", "mla"):
        raise ValueError(f"context must be 'tpla' or 'mla', got {context!r}")
    require_folded(model)
    cfg = model.config
    g = mesh.shape[tcfg.axis]
    b, s = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    cos, sin = model.rope_tables(positions)
    x = jnp.take(model.embed[...], tokens, axis=0).astype(model.dtype)
    x_mla = x
    for layer in model.layers:
        attn = layer.attn
        h = layer.attn_norm(x)
        q_nope, q_pe = attn.queries(h, cos, sin)
        own = pack_latent(*raw_latent(attn, h, cos, sin), g, tcfg, cfg.rms_norm_eps)
        ctx = own
        if context == "mla":
            ctx = pack_latent(*raw_latent(attn, layer.attn_norm(x_mla), cos, sin), g, tcfg,
                              cfg.rms_norm_eps)
            x_mla, _ = layer(x_mla, cos, sin, spec=model.attention, segment_ids=segment_ids,
                             cache=None, cache_index=None)
        o = tpla_attention(attn.absorb_query(q_nope), q_pe, ctx, own, folded_w_uv(attn),
                           mesh=mesh, tcfg=tcfg, sm_scale=cfg.softmax_scale,
                           segment_ids=segment_ids)
        x = x + attn.out_proj(o.astype(x.dtype))
        x = x + layer.mlp(layer.mlp_norm(x))
    return model.logits(model.norm(x))


@struct.dataclass
class TPLACache:
    """Per layer `pages[l]` [num_pages, page, g*w] sharded over the tensor axis on its last dim
    (device i holds [lat_i | rope_i], 1/g of the latent); `page_table` int32 [B, P] as in
    `MLACache`."""

    pages: tuple[jax.Array, ...]
    page_table: jax.Array

    @classmethod
    def zeros(cls, cfg, batch: int, length: int, *, mesh: Mesh, tcfg: TPLAConfig,
              dtype=jnp.float32, page_size: int = 64) -> "TPLACache":
        g = mesh.shape[tcfg.axis]
        w = cfg.kv_lora_rank // g + (cfg.qk_rope_head_dim if tcfg.rope == "replicated"
                                     else cfg.qk_rope_head_dim // g)
        p = -(-length // page_size)
        sharding = NamedSharding(mesh, P(None, None, tcfg.axis))
        pages = tuple(jax.device_put(jnp.zeros((batch * p, page_size, g * w), dtype), sharding)
                      for _ in range(cfg.num_layers))
        table = jnp.arange(batch * p, dtype=jnp.int32).reshape(batch, p)
        return cls(pages, table)


def tpla_prefill(model, tokens: jax.Array, cache: TPLACache, *, mesh: Mesh,
                 tcfg: TPLAConfig) -> tuple[jax.Array, TPLACache]:
    """Exact MLA prefill of tokens [B, S] (rows start at slot 0) that writes each layer's packed
    TPLA entries into `cache`. Returns (float32 logits [B, V] of the last token, cache)."""
    require_folded(model)
    cfg = model.config
    g = mesh.shape[tcfg.axis]
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    cos, sin = model.rope_tables(positions)
    x = jnp.take(model.embed[...], tokens, axis=0).astype(model.dtype)
    start = jnp.zeros((b,), jnp.int32)
    pages = []
    for layer, layer_pages in zip(model.layers, cache.pages):
        packed = pack_latent(*raw_latent(layer.attn, layer.attn_norm(x), cos, sin), g, tcfg,
                             cfg.rms_norm_eps)
        pages.append(write_latent(layer_pages, cache.page_table, packed, start))
        x, _ = layer(x, cos, sin, spec=model.attention, segment_ids=None, cache=None,
                     cache_index=None)
    return model.logits(model.norm(x[:, -1])), TPLACache(tuple(pages), cache.page_table)


def tpla_decode_step(model, tokens: jax.Array, cache: TPLACache, cache_index: jax.Array, *,
                     mesh: Mesh, tcfg: TPLAConfig, impl: str = "auto") -> tuple[jax.Array, TPLACache]:
    """One TPLA decode step: tokens [B, 1] at positions cache_index [B] -> (float32 logits [B, V],
    cache with their packed entries written). Attention: `tpla_decode` (per-shard `mla_decode`
    over the sharded pages + psum); everything else is the model's own code."""
    require_folded(model)
    cfg = model.config
    g = mesh.shape[tcfg.axis]
    cos, sin = model.rope_tables(cache_index[:, None].astype(jnp.int32))
    x = jnp.take(model.embed[...], tokens, axis=0).astype(model.dtype)
    pages = []
    for layer, layer_pages in zip(model.layers, cache.pages):
        attn = layer.attn
        h = layer.attn_norm(x)
        q_nope, q_pe = attn.queries(h, cos, sin)
        packed = pack_latent(*raw_latent(attn, h, cos, sin), g, tcfg, cfg.rms_norm_eps)
        layer_pages = write_latent(layer_pages, cache.page_table, packed, cache_index)
        pages.append(layer_pages)
        q_lat = attn.absorb_query(q_nope)[:, 0].astype(jnp.float32)
        o = tpla_decode(q_lat, q_pe[:, 0].astype(jnp.float32), layer_pages, cache.page_table,
                        cache_index + 1, folded_w_uv(attn), mesh=mesh, tcfg=tcfg,
                        sm_scale=cfg.softmax_scale, impl=impl)
        x = x + attn.out_proj(o[:, None].astype(x.dtype))
        x = x + layer.mlp(layer.mlp_norm(x))
    return model.logits(model.norm(x[:, 0])), TPLACache(tuple(pages), cache.page_table)
