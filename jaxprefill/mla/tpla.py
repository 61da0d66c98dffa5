"""TPLA (tensor-parallel latent attention) decode for MLA models, with the paper's unknowns as
switches. Specification and derivation: docs/methods/tpla.md.

A `tensor` mesh axis of size g splits the latent dimension d_c into g contiguous slices S_i.
Device i caches only its slice of every token's latent (plus the RoPE key, replicated or split by
rotation pairs), computes attention for ALL heads on its slice with its own softmax, applies its
slice of W_UV, and the partial per-head outputs are summed with `psum` (before o_proj):

    q~_h^(i) = W_UK,h'[S_i]^T q_nope_h
    s^(i)    = tau_i (q~^(i) . c[S_i] + rope term^(i));  p^(i) = softmax(s^(i))
    o_h      = sum_i W_UV,h'[S_i] (sum_j p_j^(i) c_j[S_i])

Exact for g = 1 (it is MLA); an approximation for g > 1 (one softmax per shard).
`tpla_sparse_decode` is the same over DeepSeek-V3.2's selected rows (the indexer's top-k, the
same on every device): each shard's softmax runs over those rows of its slice only.

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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from jaxprefill.models.layers import hadamard
from pallas_kernels import mla_decode
from pallas_kernels.dsa_ops import sparse_mla

try:  # jax >= 0.6
    shard_map = jax.shard_map
except AttributeError:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map

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


# ---- orthogonal transforms (hadamard: jaxprefill.models.layers) ---------------------------------

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

def shard_scale(sm_scale: float, g: int, tcfg: TPLAConfig) -> float:
    """The softmax scale each shard applies to its partial logits (tau or g tau)."""
    return sm_scale * (g if tcfg.logit_scale == "g" else 1)


def over_latent_shards(attend_shard: Callable[..., jax.Array], q_latent: jax.Array,
                       q_pe: jax.Array, pages: jax.Array, replicated: tuple, w_uv: jax.Array, *,
                       mesh: Mesh, tcfg: TPLAConfig, output: str = "replicated") -> jax.Array:
    """TPLA's per-shard attention and merge, for any attention over a shard's cache slice.

    On device i of `tcfg.axis`: `o_lat_i = attend_shard(q_latent[.., S_i], q_pe_i, pages_i,
    *replicated)` [B, H, d_c/g] (its own softmax over its slice), then `W_UV'[S_i]^T o_lat_i`,
    summed over the devices (output "replicated": psum) or reduce-scattered over heads
    ("heads"). q_latent [B, H, d_c], q_pe [B, H, d_r] (permuted to the cache's rotation-pair
    order for rope="split"), pages [N, page, g*w] (`pack_latent` layout, sharded over its last
    axis), replicated: arrays every device reads whole, w_uv [d_c, H, d_v]. Returns
    [B, H, d_v] (output "heads": sharded over H).
    """
    if output not in ("replicated", "heads"):
        raise ValueError(f"output must be 'replicated' or 'heads', got {output!r}")
    g, ax = mesh.shape[tcfg.axis], tcfg.axis
    if output == "heads" and q_latent.shape[1] % g:
        raise ValueError(f"output='heads' needs the head count ({q_latent.shape[1]}) to divide "
                         f"by the {ax} axis size {g}")
    qpe_spec = P()
    if tcfg.rope == "split":
        q_pe = q_pe[..., rope_pair_order(q_pe.shape[-1], g)]
        qpe_spec = P(None, None, ax)

    @partial(shard_map, mesh=mesh,
             in_specs=(P(None, None, ax), qpe_spec, P(None, None, ax), *(P() for _ in replicated),
                       P(ax, None, None)),
             out_specs=P() if output == "replicated" else P(None, ax, None), check_vma=False)
    def body(ql, qp, pg, *rest):
        *args, wuv = rest
        out_lat = attend_shard(ql, qp, pg, *args)  # [B, H, d_c/g]
        part = jnp.einsum("bhc,chv->bhv", out_lat, wuv.astype(jnp.float32))
        if output == "heads":
            return jax.lax.psum_scatter(part, ax, scatter_dimension=1, tiled=True)
        return jax.lax.psum(part, ax)

    return body(q_latent, q_pe, pages, *replicated, w_uv)


def tpla_decode(q_latent: jax.Array, q_pe: jax.Array, pages: jax.Array, page_table: jax.Array,
                lengths: jax.Array, w_uv: jax.Array, *, mesh: Mesh, tcfg: TPLAConfig,
                sm_scale: float, impl: str = "auto", output: str = "replicated",
                config: Any = None) -> jax.Array:
    """Per-head attention output o [B, H, d_v] (before o_proj), TPLA over `tcfg.axis`.

    q_latent [B, H, d_c]: q_nope absorbed with the reparameterized W_UK'; q_pe [B, H, d_r];
    pages [N, page, g*w] from `pack_latent` (sharded over its last axis); w_uv [d_c, H, d_v]
    (W_UV', sharded over d_c); page_table [B, P]; lengths [B]. `impl` and `config` go to the
    `mla_decode` of each shard (e.g. `MLADecodeMosaicConfig(pages_per_step=2)`).

    output: "replicated" (psum: every device gets all heads) or "heads" (reduce-scatter over
    the head axis: device i gets heads [i H/g, (i+1) H/g), the layout a row-parallel o_proj
    takes; half the all-reduce's traffic; H must divide by g).
    """
    tau = shard_scale(sm_scale, mesh.shape[tcfg.axis], tcfg)

    def attend_shard(ql, qp, pg, table, lens):  # every cached token of the shard's slice
        return mla_decode(ql, qp, pg, table, lens, tau, impl=impl, config=config)[0]

    return over_latent_shards(attend_shard, q_latent, q_pe, pages, (page_table, lengths), w_uv,
                              mesh=mesh, tcfg=tcfg, output=output)


def tpla_sparse_decode(q_latent: jax.Array, q_pe: jax.Array, pages: jax.Array, rows: jax.Array,
                       w_uv: jax.Array, *, mesh: Mesh, tcfg: TPLAConfig, sm_scale: float,
                       impl: str = "auto", output: str = "replicated") -> jax.Array:
    """`tpla_decode` over selected cache rows only (DSA): o [B, H, d_v] before o_proj.

    rows int32 [B, K]: rows of the flattened pages [N * page] each query attends to (-1: none;
    the indexer's top-k, the same on every device). Each device runs `sparse_mla` (backend
    `impl`) of all heads over those rows of its own slice, with its own softmax; the merge is
    `tpla_decode`'s. Other arguments as `tpla_decode`.
    """
    tau = shard_scale(sm_scale, mesh.shape[tcfg.axis], tcfg)

    def attend_shard(ql, qp, pg, r):  # one query per row: S = 1
        out, _ = sparse_mla(ql[:, None], qp[:, None], pg.reshape(-1, pg.shape[-1]), r[:, None],
                            tau, impl=impl)
        return out[:, 0]

    return over_latent_shards(attend_shard, q_latent, q_pe, pages, (rows,), w_uv, mesh=mesh,
                              tcfg=tcfg, output=output)
