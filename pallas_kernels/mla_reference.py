"""Pure-jnp float32 reference of absorbed MLA decode over a paged latent cache.

The absorbed ("MQA") view of DeepSeek MLA decode (one query token per sequence):

    s[b,h,j]   = sm_scale * (q_latent[b,h] . c_j + q_pe[b,h] . k_pe_j)      j < lengths[b]
    out[b,h]   = sum_j softmax_j(s[b,h]) c_j                                   [Dc]
    lse[b,h]   = log sum_j exp(s[b,h,j])

with key j of sequence b stored at `cache[page_table[b, j // page], j % page]` as
`[c_j (Dc) | k_pe_j (Dr)]`. Shapes: q_latent [B, H, Dc], q_pe [B, H, Dr],
cache [num_pages, page, Dc + Dr], page_table int32 [B, P], lengths int32 [B] (0 <= len <= P*page).
A sequence of length 0 gives out 0 and lse -inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_mla_inputs(q_latent, q_pe, cache, page_table, lengths) -> tuple[int, int, int, int, int]:
    """Validate shapes; returns (B, H, Dc, Dr, page)."""
    if q_latent.ndim != 3 or q_pe.ndim != 3 or q_latent.shape[:2] != q_pe.shape[:2]:
        raise ValueError(f"q_latent [B,H,Dc] and q_pe [B,H,Dr] must share B, H; got "
                         f"{q_latent.shape}, {q_pe.shape}")
    b, h, dc = q_latent.shape
    dr = q_pe.shape[-1]
    if cache.ndim != 3 or cache.shape[-1] != dc + dr:
        raise ValueError(f"cache must be [pages, page, Dc + Dr = {dc + dr}], got {cache.shape}")
    if page_table.ndim != 2 or page_table.shape[0] != b:
        raise ValueError(f"page_table must be [B={b}, P], got {page_table.shape}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be [B={b}], got {lengths.shape}")
    return b, h, dc, dr, cache.shape[1]


def mla_decode_reference(q_latent: jax.Array, q_pe: jax.Array, cache: jax.Array,
                         page_table: jax.Array, lengths: jax.Array, sm_scale: float
                         ) -> tuple[jax.Array, jax.Array]:
    """(out_latent float32 [B, H, Dc], lse float32 [B, H]); see the module docstring."""
    b, h, dc, dr, page = check_mla_inputs(q_latent, q_pe, cache, page_table, lengths)
    pt = jnp.clip(page_table.astype(jnp.int32), 0, cache.shape[0] - 1)  # unused slots may be junk
    kv = jnp.take(cache, pt, axis=0).astype(jnp.float32)  # [B, P, page, Dc+Dr]
    kv = kv.reshape(b, -1, dc + dr)
    q = jnp.concatenate([q_latent, q_pe], axis=-1).astype(jnp.float32)
    s = jnp.einsum("bhd,btd->bht", q, kv, precision=jax.lax.Precision.HIGHEST) * sm_scale
    valid = jnp.arange(kv.shape[1])[None, None, :] < lengths.astype(jnp.int32)[:, None, None]
    s = jnp.where(valid, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(valid, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1)
    out = jnp.einsum("bht,btc->bhc", p, kv[..., :dc], precision=jax.lax.Precision.HIGHEST)
    has = denom > 0
    out = jnp.where(has[..., None], out / jnp.where(has, denom, 1.0)[..., None], 0.0)
    lse = jnp.where(has, m[..., 0] + jnp.log(jnp.where(has, denom, 1.0)), -jnp.inf)
    return out, lse


def combine_splits(outs: jax.Array, lses: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Merge split-KV partial results: outs [B, S, H, Dc] (each normalized over its split),
    lses [B, S, H] (-inf for an empty split) -> (out [B, H, Dc], lse [B, H])."""
    m = jnp.max(lses, axis=1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lses - m_safe[:, None])  # exp(-inf) = 0 for empty splits
    total = jnp.sum(w, axis=1)
    has = total > 0
    out = jnp.einsum("bsh,bshc->bhc", w, outs.astype(jnp.float32))
    out = jnp.where(has[..., None], out / jnp.where(has, total, 1.0)[..., None], 0.0)
    lse = jnp.where(has, m_safe + jnp.log(jnp.where(has, total, 1.0)), -jnp.inf)
    return out, lse
