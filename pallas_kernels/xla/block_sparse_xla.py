"""Block-sparse flash attention in plain XLA: block gather + online softmax (the CPU path).

Reference: :func:`pallas_kernels.reference.block_sparse_attention_reference`.

A ``lax.fori_loop`` walks the list positions ``t < max(kv_cnt)``. At each step every
(batch, layout head, query block) gathers its ``t``-th key/value block, computes the
``[block_q, block_k]`` logits of its query heads and folds them into a running (max, sum, acc)
in float32. Memory is ``O(B * Hq * Sq * (block_k + Dv))``: no ``Sq x Sk`` array. Then, if
the layout has columns, a second loop walks the column lists in chunks of ``block_k`` token
positions, gathering those K/V rows, with the same masks (by original position) and softmax.
BLASST (``blasst_threshold``) zeroes a tile's probabilities for the rows it skips.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _prep
from pallas_kernels.layout import BlockSparseLayout
from pallas_kernels.online_softmax import normalize_rows

_HI = lax.Precision.HIGHEST


def block_sparse_attention_xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layout: BlockSparseLayout,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    q_offset: Any = None,
    segment_ids: Any = None,
    blasst_threshold: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Block-sparse attention with XLA ops.

    Args:
        q: ``[B, Sq, Hq, Dqk]``; k: ``[B, Sk, Hkv, Dqk]``; v: ``[B, Sk, Hkv, Dv]``.
        layout: :class:`BlockSparseLayout` with ``H in (Hq, Hkv)``.
        causal, sm_scale, q_offset, segment_ids, blasst_threshold: see
            ``block_sparse_attention``.
    Returns:
        ``out [B, Sq, Hq, Dv]`` (``q.dtype``) and ``lse [B, Hq, Sq]`` float32.
    """
    d = _prep.check_inputs(q, k, v, layout)
    layout = layout.broadcast_batch(d.B)
    off = _prep.normalize_q_offset(q_offset, d.B)
    seg = _prep.pad_segment_ids(_prep.normalize_segment_ids(segment_ids, d), d)
    scale = _prep.default_scale(sm_scale, d.Dqk)
    log_thr = _prep.blasst_log_threshold(blasst_threshold)
    bq, bk, Gl = d.block_q, d.block_k, d.Gl

    # [B, Sq, Hq, D] -> [B, Hl, Gl, nq, bq, D]
    qp = _prep.pad_axis(q, 1, d.nq * bq).reshape(d.B, d.nq, bq, d.Hl, Gl, d.Dqk)
    qp = qp.transpose(0, 3, 4, 1, 2, 5).astype(jnp.float32)
    # [B, Sk, Hkv, D] -> [B, Hkv, nk, bk, D]
    kp = _prep.pad_axis(k, 1, d.nk * bk).reshape(d.B, d.nk, bk, d.Hkv, d.Dqk)
    kp = kp.transpose(0, 3, 1, 2, 4)
    vp = _prep.pad_axis(v, 1, d.nk * bk).reshape(d.B, d.nk, bk, d.Hkv, d.Dv)
    vp = vp.transpose(0, 3, 1, 2, 4)

    b_ix = jnp.arange(d.B)[:, None, None]
    kvh_ix = ((jnp.arange(d.Hl) * Gl) // d.G)[None, :, None]  # KV head of each layout head
    qpos = (jnp.arange(d.nq * bq, dtype=jnp.int32).reshape(d.nq, bq)[None]
            + off[:, None, None])  # [B, nq, bq]
    if seg is not None:
        seg_q = seg.q.reshape(d.B, d.nq, bq)

    def fold(carry, kb, vb, kpos, ok):
        """One tile of keys per row: kb [B,Hl,nq,bk,Dqk], vb [B,Hl,nq,bk,Dv], kpos and ok
        [B,Hl,nq,bk] (positions, listed & in range) -> updated online-softmax state."""
        m_prev, l_prev, acc_prev = carry
        s = jnp.einsum("bhgqid,bhqjd->bhgqij", qp, kb.astype(jnp.float32), precision=_HI) * scale
        ok = ok[:, :, None, :, None, :]  # [B, Hl, 1, nq, 1, bk]
        if causal:
            ok = ok & (kpos[:, :, None, :, None, :] <= qpos[:, None, None, :, :, None])
        if seg is not None:
            skv = seg.kv[b_ix[..., None], jnp.clip(kpos, 0, seg.kv.shape[1] - 1)]
            ok = ok & (seg_q[:, None, None, :, :, None] == skv[:, :, None, :, None, :])
        s = jnp.where(ok, s, -jnp.inf)
        tmax = jnp.max(s, axis=-1)
        m_next = jnp.maximum(m_prev, tmax)
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        p = jnp.exp(s - m_safe[..., None])
        if log_thr is not None:  # BLASST: drop the tile for rows far below their running max
            p = jnp.where((tmax < m_prev + log_thr)[..., None], 0.0, p)
        alpha = jnp.exp(m_prev - m_safe)
        l_next = alpha * l_prev + jnp.sum(p, axis=-1)
        acc_next = alpha[..., None] * acc_prev + jnp.einsum(
            "bhgqij,bhqjd->bhgqid", p, vb.astype(jnp.float32), precision=_HI)
        return m_next, l_next, acc_next

    def block_step(t, carry):
        idx = lax.dynamic_index_in_dim(layout.kv_idx, t, axis=3, keepdims=False)  # [B,Hl,nq]
        kpos = idx[..., None] * bk + jnp.arange(bk, dtype=jnp.int32)  # [B, Hl, nq, bk]
        ok = (kpos < d.Sk) & (t < layout.kv_cnt)[..., None]
        return fold(carry, kp[b_ix, kvh_ix, idx], vp[b_ix, kvh_ix, idx], kpos, ok)

    def column_step(c, carry):
        pos = lax.dynamic_slice_in_dim(col_idx, c * bk, bk, axis=3)  # [B, Hl, nq, bk]
        pos = jnp.clip(pos, 0, d.Sk - 1)
        ok = (c * bk + jnp.arange(bk, dtype=jnp.int32)) < layout.col_cnt[..., None]
        kb = kt[b_ix[..., None], kvh_ix[..., None], pos]  # [B, Hl, nq, bk, Dqk]
        vb = vt[b_ix[..., None], kvh_ix[..., None], pos]
        return fold(carry, kb, vb, pos, ok)

    shape = (d.B, d.Hl, Gl, d.nq, bq)
    init = (
        jnp.full(shape, -jnp.inf, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros(shape + (d.Dv,), jnp.float32),
    )
    steps = jnp.minimum(jnp.max(layout.kv_cnt), layout.max_nnz)
    carry = lax.fori_loop(0, steps, block_step, init)
    if layout.has_columns:  # after the blocks: the BLASST tile order of the reference
        col_idx, n_chunks = _prep.padded_columns(layout)
        kt = k.transpose(0, 2, 1, 3)  # [B, Hkv, Sk, Dqk]: token-indexed gathers
        vt = v.transpose(0, 2, 1, 3)
        c_steps = jnp.minimum((jnp.max(layout.col_cnt) + bk - 1) // bk, n_chunks)
        carry = lax.fori_loop(0, c_steps, column_step, carry)
    m, l, acc = carry
    out, lse = normalize_rows(acc, m, l)
    # [B, Hl, Gl, nq, bq, Dv] -> [B, Sq, Hq, Dv]
    out = out.transpose(0, 3, 4, 1, 2, 5).reshape(d.B, d.nq * bq, d.Hq, d.Dv)[:, : d.Sq]
    lse = lse.reshape(d.B, d.Hq, d.nq * bq)[:, :, : d.Sq]
    return out.astype(q.dtype), lse
