"""Reference block-sparse attention: pure jnp, float32, materializes the ``[B, Hq, Sq, Sk]`` mask.

For tests and small problems only (memory grows as Sq x Sk). Every kernel of this package is
checked against this function's semantics (and, in tests, against a float64 NumPy version).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import _prep
from pallas_kernels.layout import BlockSparseLayout


def token_mask(
    layout: BlockSparseLayout,
    dims: _prep.Dims,
    causal: bool,
    q_offset: jax.Array,
    segment_ids: _prep.SegmentIds | None,
) -> jax.Array:
    """bool ``[B, Hq, Sq, Sk]``: True where query i of head h attends key j."""
    blocks = layout.broadcast_batch(dims.B).to_block_mask()  # [B, Hl, nq, nk]
    blocks = jnp.repeat(blocks, dims.Gl, axis=1)  # per query head
    qb = jnp.arange(dims.Sq) // dims.block_q
    kb = jnp.arange(dims.Sk) // dims.block_k
    mask = blocks[:, :, qb, :][:, :, :, kb]
    if causal:
        i = jnp.arange(dims.Sq)[None, :, None] + q_offset[:, None, None]
        j = jnp.arange(dims.Sk)[None, None, :]
        mask = mask & (j <= i)[:, None]
    if segment_ids is not None:
        mask = mask & (segment_ids.q[:, None, :, None] == segment_ids.kv[:, None, None, :])
    return mask


def block_sparse_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layout: BlockSparseLayout,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    q_offset: Any = None,
    segment_ids: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """Dense masked softmax attention in float32.

    Args: see :func:`pallas_kernels.block_sparse_attention`.
    Returns: ``out [B, Sq, Hq, Dv]`` in ``q.dtype`` and ``lse [B, Hq, Sq]`` float32 (natural
    log; ``-inf`` and output 0 for rows that attend to nothing).
    """
    dims = _prep.check_inputs(q, k, v, layout)
    off = _prep.normalize_q_offset(q_offset, dims.B)
    seg = _prep.normalize_segment_ids(segment_ids, dims)
    scale = _prep.default_scale(sm_scale, dims.Dqk)
    mask = token_mask(layout, dims, causal, off, seg)
    kf = jnp.repeat(k.astype(jnp.float32), dims.G, axis=2)
    vf = jnp.repeat(v.astype(jnp.float32), dims.G, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kf,
                   precision=jax.lax.Precision.HIGHEST) * scale
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhqk,bkhd->bqhd", p / jnp.where(l > 0, l, 1.0), vf,
                   precision=jax.lax.Precision.HIGHEST)
    lse = jnp.where(l > 0, m_safe + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]
    return o.astype(q.dtype), lse
