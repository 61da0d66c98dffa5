"""Key columns outside the kernel: attention over a layout's columns, merged by log-sum-exp
with a blocks-only kernel's output.

For a backend without a column path (Mosaic GPU): the kernel runs the listed blocks and returns
its logsumexp, a second call computes the same softmax pieces over each query block's columns,
and :func:`merge` combines the two as one softmax over blocks | columns. The layout's columns
never fall inside a listed block (``pallas_kernels.layout_columns``), so nothing is counted
twice. Exact: the result equals a kernel with a column path up to float rounding.

The column part runs as :func:`column_attention` (XLA; any device) or, on NVIDIA GPUs, as a
kernel with a column path over :func:`columns_only` (no listed blocks): the Triton kernel then
reads each query tile and its gathered columns once, where the XLA form moves float32 copies
of q and of the output through memory. Given the blocks' result as its starting softmax
(``prior``, ``columns_prior=True``), the Triton kernel also does the merge: one pass fewer
over the output.

Memory: query blocks go through ``lax.map`` in batches whose float32 logits stay within
``LOGITS_BYTES`` ([B, Hq, block_q, C] per query block, C the column list length).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _prep
from pallas_kernels.layout import BlockSparseLayout

LOGITS_BYTES = 256 << 20  # float32 logits per lax.map step


def column_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: BlockSparseLayout, *,
                     causal: bool = True, sm_scale: float | None = None, q_offset: Any = None,
                     segment_ids: Any = None) -> tuple[jax.Array, jax.Array]:
    """Softmax attention of each query block over its layout columns only.

    q [B, Sq, Hq, Dqk], k [B, Sk, Hkv, Dqk], v [B, Sk, Hkv, Dv]; ``layout`` with ``col_idx``
    [B|1, H, nq, C] / ``col_cnt`` (H = Hq or Hkv); causal, sm_scale, q_offset, segment_ids as
    in ``block_sparse_attention``. Returns (out [B, Sq, Hq, Dv] float32, lse [B, Hq, Sq]
    float32); a query with no visible column gives 0 and lse ``-inf``.
    """
    d = _prep.check_inputs(q, k, v, layout)
    layout = layout.broadcast_batch(d.B)
    off = _prep.normalize_q_offset(q_offset, d.B)
    seg = _prep.normalize_segment_ids(segment_ids, d)
    scale = _prep.default_scale(sm_scale, d.Dqk)
    bq, nq, hl, gl = d.block_q, d.nq, d.Hl, d.Gl
    col_idx, col_cnt = layout.col_idx, layout.col_cnt  # [B, Hl, nq, C], [B, Hl, nq]
    c = col_idx.shape[-1]
    kv_head = jnp.arange(hl) // (d.G if hl == d.Hq else 1)  # KV head of each layout head
    b_ix = jnp.arange(d.B)[:, None, None]

    # query blocks first (the mapped axis): q [nq, B, Hl, Gl, bq, D]
    qb = _prep.pad_axis(q, 1, nq * bq).reshape(d.B, nq, bq, hl, gl, d.Dqk)
    qb = qb.transpose(1, 0, 3, 4, 2, 5)
    pos = jnp.arange(nq * bq, dtype=jnp.int32).reshape(nq, bq)

    def block(args):
        qi, idx, cnt, qpos = args  # [B, Hl, Gl, bq, D], [B, Hl, C], [B, Hl], [bq]
        keys = jnp.clip(idx, 0, d.Sk - 1)
        kc = k[b_ix, keys, kv_head[None, :, None]]  # [B, Hl, C, Dqk]
        vc = v[b_ix, keys, kv_head[None, :, None]]  # [B, Hl, C, Dv]
        s = jnp.einsum("bhgqd,bhcd->bhgqc", qi.astype(jnp.float32), kc.astype(jnp.float32))
        ok = (jnp.arange(c) < cnt[..., None])[:, :, None, None, :]
        ok &= (qpos < d.Sq)[None, None, None, :, None]
        if causal:
            ok &= idx[:, :, None, None, :] <= (qpos[None, :] + off[:, None])[:, None, None, :,
                                                                              None]
        if seg is not None:
            sq = seg.q[:, jnp.minimum(qpos, d.Sq - 1)]  # [B, bq]
            sk = seg.kv[b_ix, keys]  # [B, Hl, C]
            ok &= sq[:, None, None, :, None] == sk[:, :, None, None, :]
        s = jnp.where(ok, s * scale, -jnp.inf)
        m = jnp.max(s, axis=-1)
        m0 = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.where(ok, jnp.exp(s - m0[..., None]), 0.0)
        total = jnp.sum(p, axis=-1)
        o = jnp.einsum("bhgqc,bhcd->bhgqd", p, vc.astype(jnp.float32))
        o = o / jnp.where(total > 0, total, 1.0)[..., None]
        return o, jnp.where(total > 0, m0 + jnp.log(total), -jnp.inf)

    per_block = d.B * d.Hq * bq * c * 4
    batch = max(1, min(nq, LOGITS_BYTES // max(per_block, 1)))
    o, lse = lax.map(block, (qb, col_idx.transpose(2, 0, 1, 3), col_cnt.transpose(2, 0, 1), pos),
                     batch_size=batch)  # [nq, B, Hl, Gl, bq, Dv], [nq, B, Hl, Gl, bq]
    o = o.transpose(1, 0, 4, 2, 3, 5).reshape(d.B, nq * bq, d.Hq, d.Dv)[:, :d.Sq]
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(d.B, d.Hq, nq * bq)[..., :d.Sq]
    return o, lse


def columns_only(layout: BlockSparseLayout) -> BlockSparseLayout:
    """``layout`` with its columns and no listed blocks (every row's block count 0)."""
    return dataclasses.replace(layout, kv_idx=jnp.zeros_like(layout.kv_idx[..., :1]),
                               kv_cnt=jnp.zeros_like(layout.kv_cnt))


def merge(out_a: jax.Array, lse_a: jax.Array, out_b: jax.Array,
          lse_b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One softmax from two over disjoint key sets: out [B, Sq, Hq, Dv], lse [B, Hq, Sq].
    Returns float32 (out, lse); rows empty in both give 0 and ``-inf``."""
    m = jnp.maximum(lse_a, lse_b)
    m0 = jnp.where(jnp.isfinite(m), m, 0.0)
    wa, wb = jnp.exp(lse_a - m0), jnp.exp(lse_b - m0)  # exp(-inf) = 0
    total = wa + wb
    t = lambda w: jnp.swapaxes(w, 1, 2)[..., None]  # noqa: E731  [B, Hq, Sq] -> [B, Sq, Hq, 1]
    out = (out_a.astype(jnp.float32) * t(wa) + out_b.astype(jnp.float32) * t(wb))
    out = out / t(jnp.where(total > 0, total, 1.0))
    return out, jnp.where(total > 0, m0 + jnp.log(total), -jnp.inf)


def with_merged_columns(kernel: Callable, q: jax.Array, k: jax.Array, v: jax.Array,
                        layout: BlockSparseLayout, *, columns: Callable | None = None,
                        columns_prior: bool = False, **kw) -> tuple[jax.Array, jax.Array]:
    """``kernel`` (a blocks-only backend: (q, k, v, layout, **kw) -> (out, lse)) over the
    layout's blocks, merged with the attention over its columns: ``columns`` (a backend with
    a column path, the same signature; run over :func:`columns_only`) or, when None,
    :func:`column_attention`. ``columns_prior``: ``columns`` takes ``prior=(out, lse)``, the
    blocks' result, and returns the merged softmax itself (the Triton kernel). Returns (out in
    q.dtype, lse float32)."""
    blocks = dataclasses.replace(layout, col_idx=None, col_cnt=None)
    out_b, lse_b = kernel(q, k, v, blocks, **kw)
    cols = {key: kw[key] for key in ("causal", "sm_scale", "q_offset", "segment_ids") if key in kw}
    if columns is not None and columns_prior:
        out, lse = columns(q, k, v, columns_only(layout), prior=(out_b, lse_b), **cols)
        return out.astype(q.dtype), lse
    if columns is None:
        out_c, lse_c = column_attention(q, k, v, layout, **cols)
    else:
        out_c, lse_c = columns(q, k, v, columns_only(layout), **cols)
    out, lse = merge(out_b, lse_b, out_c, lse_c)
    return out.astype(q.dtype), lse
