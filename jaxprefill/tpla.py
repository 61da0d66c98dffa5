"""TPLA (tensor-parallel latent attention) decode for MLA models, with the paper's unknowns as
switches. Spec and derivation: shared/research/mla_tpla.md §3.3 (no public code exists).

A `tensor` mesh axis of size g splits the latent dimension d_c into g contiguous slices S_i.
Device i caches only its slice of every token's latent (plus the RoPE key, replicated or split by
rotation pairs), computes attention for ALL heads on its slice with its own softmax, applies its
slice of W_UV, and the partial per-head outputs are summed with `psum` (before o_proj):

    q~_h^(i) = W_UK,h'[S_i]^T q_nope_h
    s^(i)    = tau_i (q~^(i) . c[S_i] + rope term^(i));  p^(i) = softmax(s^(i))
    o_h      = sum_i W_UV,h'[S_i] (sum_j p_j^(i) c_j[S_i])

Exact for g = 1 (it is MLA); an approximation for g > 1 (one softmax per shard).

Reparameterization (exact for full MLA, folded into the weights before slicing): with the
kv_a_layernorm weight gamma and an orthogonal R [d_c, d_c],
    kv_a' (latent columns) = kv_a R^T,  norm weight -> 1,  kv_b' = R diag(gamma) kv_b
so the cache holds R c / rms(c) (rms is rotation invariant) and W_UK' = W_UK diag(gamma) R^T.
R: identity ("none"), normalized Sylvester Hadamard ("hadamard", d_c a power of two) or PCA
("pca": eigenvectors of the uncentered second moment of c / rms(c) over calibration tokens,
largest first, so shard 0 holds the leading components).

Switches (`TPLAConfig`): transform {none, hadamard, pca}; rope {replicated (every device
adds the full q_pe . k_pe term), split (device i holds rotation pairs i*d_r/(2g) ...)};
norm {global (exact RMS of the whole latent, one scalar per token: computed at prefill),
per_shard (each slice normalized by its own RMS)}; logit_scale {"1": tau, "g": g * tau}.

Cache layout: the per-device pages are [pages, page, w] with w = d_c/g + (d_r or d_r/g); the
global array is [pages, page, g*w] = [lat_0 | rope_0 | lat_1 | rope_1 | ...] sharded over the
last axis, so each device holds 1/g of the latent (and `mla_decode` runs unchanged per device).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pallas_kernels.mla_ops import mla_decode

try:  # jax >= 0.6
    _shard_map = jax.shard_map
except AttributeError:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map as _shard_map

TRANSFORMS, ROPE_MODES, NORM_MODES, LOGIT_SCALES = (("none", "hadamard", "pca"),
                                                     ("replicated", "split"),
                                                     ("global", "per_shard"), ("1", "g"))


@dataclasses.dataclass(frozen=True)
class TPLAConfig:
    """The ablation switches (see the module docstring)."""

    transform: str = "hadamard"
    rope: str = "replicated"
    norm: str = "global"
    logit_scale: str = "1"
    axis: str = "tensor"

    def __post_init__(self) -> None:
        for name, allowed in (("transform", TRANSFORMS), ("rope", ROPE_MODES),
                              ("norm", NORM_MODES), ("logit_scale", LOGIT_SCALES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TPLA {name}={getattr(self, name)!r}; choose one of {allowed}")


# ---- orthogonal transforms ----------------------------------------------------------------------

def hadamard(n: int) -> np.ndarray:
    """Orthonormal Sylvester Hadamard matrix [n, n] (n a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard transform needs a power-of-two size, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def pca_rotation(latents: np.ndarray) -> np.ndarray:
    """R [d, d] whose rows are the principal directions of latents [N, d] (uncentered second
    moment), largest variance first."""
    x = np.asarray(latents, np.float64).reshape(-1, latents.shape[-1])
    w, v = np.linalg.eigh(x.T @ x / len(x))
    return v[:, np.argsort(w)[::-1]].T


def rotation_for(transform: str, d: int, latents: np.ndarray | None = None) -> np.ndarray:
    if transform == "none":
        return np.eye(d)
    if transform == "hadamard":
        return hadamard(d)
    if latents is None:
        raise ValueError("transform='pca' needs calibration latents")
    return pca_rotation(latents)


def fold_rotation(attn, r: np.ndarray) -> None:
    """In place on an `MLAttention`: fold gamma and R (exact for full MLA, see module doc)."""
    dc = attn.cfg.kv_lora_rank
    r = jnp.asarray(r, jnp.float32)
    gamma = attn.kv_norm.scale[...].astype(jnp.float32)
    kv_a = attn.kv_a[...]
    new_a = jnp.concatenate([kv_a[:, :dc].astype(jnp.float32) @ r.T,
                             kv_a[:, dc:].astype(jnp.float32)], axis=1)
    attn.kv_a[...] = new_a.astype(kv_a.dtype)
    if attn.cfg.attention_bias:
        bias = attn.kv_a_bias[...]
        attn.kv_a_bias[...] = jnp.concatenate([r @ bias[:dc].astype(jnp.float32),
                                               bias[dc:].astype(jnp.float32)]).astype(bias.dtype)
    kv_b = attn.kv_b[...]
    attn.kv_b[...] = jnp.einsum("xc,c,chd->xhd", r, gamma, kv_b.astype(jnp.float32)).astype(kv_b.dtype)
    attn.kv_norm.scale[...] = jnp.ones_like(attn.kv_norm.scale[...])


def calibration_latents(model, tokens: jax.Array) -> list[np.ndarray]:
    """Per layer, c / rms(c) [N, d_c] (weightless normalized latent) of calibration tokens [B, S]."""
    cfg = model.config
    out = []

    def capture(attn, x, cos, sin):
        kv = x @ attn.kv_a[...].astype(x.dtype)
        c = kv[..., :cfg.kv_lora_rank].astype(jnp.float32)
        return c * jax.lax.rsqrt(jnp.mean(c * c, -1, keepdims=True) + cfg.rms_norm_eps)

    b, s = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    cos, sin = model.rope_tables(pos)
    x = jnp.take(model.embed[...], tokens, axis=0).astype(model.dtype)
    for layer in model.layers:
        h = layer.attn_norm(x)
        out.append(np.asarray(capture(layer.attn, h, cos, sin)).reshape(-1, cfg.kv_lora_rank))
        x, _ = layer(x, cos, sin, spec=model.attention, segment_ids=None, cache=None,
                     cache_index=None)
    return out


def reparameterize(model, transform: str, calib_tokens: jax.Array | None = None):
    """A copy of a `DeepSeek` model with gamma and R folded into every layer (exact for MLA)."""
    latents = calibration_latents(model, calib_tokens) if transform == "pca" else None
    new = nnx.clone(model)
    for i, layer in enumerate(new.layers):
        r = rotation_for(transform, model.config.kv_lora_rank, None if latents is None else latents[i])
        fold_rotation(layer.attn, r)
    return new


# ---- cache layout -------------------------------------------------------------------------------

def rope_pair_order(dr: int, g: int) -> np.ndarray:
    """Permutation of the rotate-half RoPE dims [x1 (dr/2) | x2 (dr/2)] putting each shard's
    rotation pairs together: shard i gets pairs i*dr/(2g) .. (i+1)*dr/(2g) - 1, both halves."""
    half, per = dr // 2, dr // (2 * g)
    if dr % (2 * g):
        raise ValueError(f"rope='split' needs d_r ({dr}) divisible by 2g ({2 * g})")
    return np.concatenate([np.r_[np.arange(i * per, (i + 1) * per),
                                 half + np.arange(i * per, (i + 1) * per)] for i in range(g)])


def pack_latent(c_rot: jax.Array, k_pe: jax.Array, g: int, tcfg: TPLAConfig, eps: float) -> jax.Array:
    """Cache entries [..., g*w] from the rotated raw latent c_rot = R c [..., d_c] and the roped
    key k_pe [..., d_r]: per shard [normalized latent slice | its RoPE part]."""
    dc, dr = c_rot.shape[-1], k_pe.shape[-1]
    if dc % g:
        raise ValueError(f"kv_lora_rank ({dc}) must divide by the tensor axis size g={g}")
    c32 = c_rot.astype(jnp.float32).reshape(*c_rot.shape[:-1], g, dc // g)
    if tcfg.norm == "global":
        ms = jnp.mean(c32 * c32, axis=(-1, -2), keepdims=True)
    else:
        ms = jnp.mean(c32 * c32, axis=-1, keepdims=True)
    u = c32 * jax.lax.rsqrt(ms + eps)
    if tcfg.rope == "replicated":
        rope = jnp.broadcast_to(k_pe[..., None, :], (*k_pe.shape[:-1], g, dr))
    else:
        rope = k_pe[..., rope_pair_order(dr, g)].reshape(*k_pe.shape[:-1], g, dr // g)
    packed = jnp.concatenate([u, rope.astype(jnp.float32)], axis=-1)
    return packed.reshape(*c_rot.shape[:-1], -1).astype(c_rot.dtype)


# ---- decode -------------------------------------------------------------------------------------

def tpla_decode(q_latent: jax.Array, q_pe: jax.Array, pages: jax.Array, page_table: jax.Array,
                lengths: jax.Array, w_uv: jax.Array, *, mesh: Mesh, tcfg: TPLAConfig,
                sm_scale: float, impl: str = "auto", output: str = "replicated",
                **kernel_kwargs: Any) -> jax.Array:
    """Per-head attention output o [B, H, d_v] (before o_proj), TPLA over `tcfg.axis`.

    q_latent [B, H, d_c]: q_nope absorbed with the reparameterized W_UK'; q_pe [B, H, d_r];
    pages [N, page, g*w] from `pack_latent` (sharded over its last axis); w_uv [d_c, H, d_v]
    (W_UV', sharded over d_c); page_table [B, P]; lengths [B]. `kernel_kwargs` go to the
    `mla_decode` kernel of each shard (e.g. pages_per_step=2 for the Mosaic GPU kernel).

    output: "replicated" (psum: every device gets all heads) or "heads" (reduce-scatter over
    the head axis: device i gets heads [i H/g, (i+1) H/g), the layout a row-parallel o_proj
    takes; half the all-reduce's traffic; H must divide by g).
    """
    if output not in ("replicated", "heads"):
        raise ValueError(f"output must be 'replicated' or 'heads', got {output!r}")
    g = mesh.shape[tcfg.axis]
    dr = q_pe.shape[-1]
    tau = sm_scale * (g if tcfg.logit_scale == "g" else 1)
    if tcfg.rope == "split":
        q_pe = q_pe[..., rope_pair_order(dr, g)]
        qpe_spec = P(None, None, tcfg.axis)
    else:
        qpe_spec = P()
    ax = tcfg.axis

    if output == "heads" and q_latent.shape[1] % g:
        raise ValueError(f"output='heads' needs the head count ({q_latent.shape[1]}) to divide "
                         f"by the {ax} axis size {g}")

    @partial(_shard_map, mesh=mesh,
             in_specs=(P(None, None, ax), qpe_spec, P(None, None, ax), P(), P(), P(ax, None, None)),
             out_specs=P() if output == "replicated" else P(None, ax, None), check_vma=False)
    def body(ql, qp, pg, table, lens, wuv):
        out_lat, _ = mla_decode(ql, qp, pg, table, lens, tau, impl=impl,
                                **kernel_kwargs)  # [B, H, d_c/g]
        part = jnp.einsum("bhc,chv->bhv", out_lat, wuv.astype(jnp.float32))
        if output == "heads":
            return jax.lax.psum_scatter(part, ax, scatter_dimension=1, tiled=True)
        return jax.lax.psum(part, ax)

    return body(q_latent, q_pe, pages, page_table, lengths, w_uv)


def tpla_decode_numpy(q_latent, q_pe, c_rot, k_pe, lengths, w_uv, *, g: int, tcfg: TPLAConfig,
                      sm_scale: float, eps: float) -> np.ndarray:
    """Float64 NumPy TPLA over a contiguous cache: c_rot [B, T, d_c] (raw rotated latent),
    k_pe [B, T, d_r]; the same math as `pack_latent` + `tpla_decode` written out per shard."""
    q_latent, q_pe, c_rot, k_pe, w_uv = (np.asarray(x, np.float64)
                                         for x in (q_latent, q_pe, c_rot, k_pe, w_uv))
    b, h, dc = q_latent.shape
    dr, sl = k_pe.shape[-1], dc // g
    tau = sm_scale * (g if tcfg.logit_scale == "g" else 1)
    out = np.zeros((b, h, w_uv.shape[-1]))
    for bi in range(b):
        n = int(lengths[bi])
        c = c_rot[bi, :n]
        for i in range(g):
            s_i = slice(i * sl, (i + 1) * sl)
            if tcfg.norm == "global":
                u = c[:, s_i] / np.sqrt(np.mean(c * c, -1, keepdims=True) + eps)
            else:
                u = c[:, s_i] / np.sqrt(np.mean(c[:, s_i] ** 2, -1, keepdims=True) + eps)
            if tcfg.rope == "replicated":
                rope = q_pe[bi] @ k_pe[bi, :n].T
            else:
                idx = rope_pair_order(dr, g)[i * dr // g:(i + 1) * dr // g]
                rope = q_pe[bi][:, idx] @ k_pe[bi, :n][:, idx].T
            s = tau * (q_latent[bi][:, s_i] @ u.T + rope)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[bi] += np.einsum("hc,chv->hv", p @ u, w_uv[s_i])
    return out


# ---- TPLA driving a `DeepSeek` model ------------------------------------------------------------
#
# The functions below take a model from `reparameterize` (gamma and R folded into the weights,
# kv_a_layernorm weight 1), because the TPLA cache holds the normalized ROTATED latent and
# `pack_latent` applies no norm weight. Prefill stays MLA (the model's own exact forward); it
# writes the packed (sliced, per-shard normalized) latent. Decode runs TPLA on the mesh axis.
#
# Shapes: B batch, S tokens, T cache length, H heads, d_c latent, d_r rope, d_v value, g shards,
# w = d_c/g + (d_r or d_r/g) cache values per token per device.

def _require_folded(model) -> None:
    """TPLA needs the kv_a_layernorm weight folded away (`reparameterize`); checked when the
    weights are concrete (a traced call cannot be checked and is trusted)."""
    for i, layer in enumerate(model.layers):
        scale = layer.attn.kv_norm.scale[...]
        if isinstance(scale, jax.core.Tracer):
            return
        if not np.allclose(np.asarray(scale, np.float32), 1.0):
            raise ValueError(f"layer {i}: kv_a_layernorm weight is not folded; pass the model "
                             f"through tpla.reparameterize(model, transform) first")


def raw_latent(attn, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B, S, E] -> (rotated latent BEFORE its RMSNorm [B, S, d_c], roped k_pe [B, S, d_r]);
    `MLAttention.latent` without the norm (TPLA normalizes per `TPLAConfig.norm`)."""
    cfg, dt = attn.cfg, x.dtype
    kv = x @ attn.kv_a[...].astype(dt)
    if cfg.attention_bias:
        kv = kv + attn.kv_a_bias[...].astype(dt)
    from jaxprefill.models.layers import apply_rope_pairs

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

    @partial(_shard_map, mesh=mesh,
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


def _w_uv(attn) -> jax.Array:
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
    _require_folded(model)
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
        o = tpla_attention(attn.absorb_query(q_nope), q_pe, ctx, own, _w_uv(attn), mesh=mesh,
                           tcfg=tcfg, sm_scale=cfg.softmax_scale, segment_ids=segment_ids)
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
    from jaxprefill.models.deepseek import write_latent

    _require_folded(model)
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
    from jaxprefill.models.deepseek import write_latent

    _require_folded(model)
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
                        cache_index + 1, _w_uv(attn), mesh=mesh, tcfg=tcfg,
                        sm_scale=cfg.softmax_scale, impl=impl)
        x = x + attn.out_proj(o[:, None].astype(x.dtype))
        x = x + layer.mlp(layer.mlp_norm(x))
    return model.logits(model.norm(x[:, 0])), TPLACache(tuple(pages), cache.page_table)
