"""Reference block-sparse attention: pure jnp, float32, materializes the ``[B, Hq, Sq, Sk]`` mask.

For tests and small problems only (memory grows as Sq x Sk). Every kernel of this package is
checked against this function's semantics (and, in tests, against a float64 NumPy version).

Column path: query block i attends to its listed key blocks UNION its listed key columns
(``layout.col_idx``); causal and segment masks apply to both.

BLASST (``blasst_threshold = lambda``; arXiv 2512.12087) -- the exact semantics every kernel
implements. The *tiles* of a layout row (b, h, i), in processing order, are its listed blocks
in list order (tile t = block ``kv_idx[t]``, ``t < kv_cnt``), then its column chunks (tile
``max_nnz + c`` = columns ``col_idx[c*block_k : (c+1)*block_k]`` below ``col_cnt``). For each
query row r (one query token of one head) let ``x_t`` be the max of r's visible logits
(``q.k * sm_scale``, natural-log units) in tile t and ``M_t = max_{t' < t} x_t'`` the running max
before it (``-inf`` at the start). Tile t is *skipped for row r* iff ``x_t < M_t + ln(lambda)``:
its keys then add nothing to r's softmax (neither numerator nor denominator). The running max
still covers skipped tiles (a skipped tile's max is below it when lambda <= 1, so it does not
matter). ``lambda = 0`` never skips (exact attention); the paper's decision is per tile (all
rows of a GPU tile must agree), ours per query row: the result then does not depend on a
kernel's tile shape, and a kernel saves the exp / P.V work of a tile when all its rows skip.
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
    layout = layout.broadcast_batch(dims.B)
    blocks = jnp.repeat(layout.to_block_mask(), dims.Gl, axis=1)  # [B, Hq, nq, nk]
    qb = jnp.arange(dims.Sq) // dims.block_q
    kb = jnp.arange(dims.Sk) // dims.block_k
    mask = blocks[:, :, qb, :][:, :, :, kb]
    if layout.has_columns:
        cols = jnp.repeat(layout.column_mask(dims.Sk), dims.Gl, axis=1)  # [B, Hq, nq, Sk]
        mask = mask | cols[:, :, qb, :]
    if causal:
        i = jnp.arange(dims.Sq)[None, :, None] + q_offset[:, None, None]
        j = jnp.arange(dims.Sk)[None, None, :]
        mask = mask & (j <= i)[:, None]
    if segment_ids is not None:
        mask = mask & (segment_ids.q[:, None, :, None] == segment_ids.kv[:, None, None, :])
    return mask


def tile_ids(layout: BlockSparseLayout, dims: _prep.Dims) -> jax.Array:
    """int32 ``[B, Hq, Sq, Sk]``: BLASST tile (processing order) of key j in query i's row, -1
    for keys the row does not list (see the module docstring)."""
    layout = layout.broadcast_batch(dims.B)
    B, Hl, nq, nnz = layout.kv_idx.shape
    rows = B * Hl * nq
    r = jnp.arange(rows)[:, None]
    t = jnp.arange(nnz, dtype=jnp.int32)
    valid = t < layout.kv_cnt[..., None]
    tgt = jnp.where(valid, layout.kv_idx, dims.nk).reshape(rows, nnz)
    blk_tile = jnp.full((rows, dims.nk + 1), -1, jnp.int32)
    blk_tile = blk_tile.at[r, tgt].set(jnp.broadcast_to(t, (rows, nnz)))[:, : dims.nk]
    per_key = blk_tile.reshape(B, Hl, nq, dims.nk)[..., jnp.arange(dims.Sk) // dims.block_k]
    if layout.has_columns:
        nc = layout.max_cols
        c = jnp.arange(nc, dtype=jnp.int32)
        cvalid = c < layout.col_cnt[..., None]
        ctgt = jnp.where(cvalid, jnp.clip(layout.col_idx, 0, dims.Sk - 1), dims.Sk)
        col_tile = jnp.full((rows, dims.Sk + 1), -1, jnp.int32)
        col_tile = col_tile.at[r, ctgt.reshape(rows, nc)].set(
            jnp.broadcast_to(nnz + c // dims.block_k, (rows, nc)))[:, : dims.Sk]
        per_key = jnp.where(per_key >= 0, per_key, col_tile.reshape(B, Hl, nq, dims.Sk))
    per_key = jnp.repeat(per_key, dims.Gl, axis=1)  # [B, Hq, nq, Sk]
    return per_key[:, :, jnp.arange(dims.Sq) // dims.block_q, :]


def blasst_skips(s: jax.Array, tiles: jax.Array, n_tiles: int,
                 log_threshold: float) -> tuple[jax.Array, jax.Array]:
    """Per (row, tile) decisions: ``s`` masked logits (``-inf`` = invisible) and ``tiles`` tile
    ids, both ``[..., Sk]``. Returns (skip, live) bool ``[..., n_tiles]``: live = the tile holds
    a visible key of the row."""
    tmax = jnp.stack([jnp.max(jnp.where(tiles == t, s, -jnp.inf), axis=-1)
                      for t in range(n_tiles)], axis=-1)
    run = jax.lax.cummax(tmax, axis=tmax.ndim - 1)
    before = jnp.concatenate([jnp.full(tmax.shape[:-1] + (1,), -jnp.inf), run[..., :-1]], -1)
    live = tmax > -jnp.inf
    return live & (tmax < before + log_threshold), live


def _masked_logits(q, k, v, layout, causal, sm_scale, q_offset, segment_ids):
    dims = _prep.check_inputs(q, k, v, layout)
    off = _prep.normalize_q_offset(q_offset, dims.B)
    seg = _prep.normalize_segment_ids(segment_ids, dims)
    scale = _prep.default_scale(sm_scale, dims.Dqk)
    mask = token_mask(layout, dims, causal, off, seg)
    kf = jnp.repeat(k.astype(jnp.float32), dims.G, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kf,
                   precision=jax.lax.Precision.HIGHEST) * scale
    return dims, jnp.where(mask, s, -jnp.inf)


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
    blasst_threshold: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Dense masked softmax attention in float32.

    Args: see :func:`pallas_kernels.block_sparse_attention`; ``blasst_threshold`` is BLASST's
    lambda (module docstring), None = off.
    Returns: ``out [B, Sq, Hq, Dv]`` in ``q.dtype`` and ``lse [B, Hq, Sq]`` float32 (natural
    log; ``-inf`` and output 0 for rows that attend to nothing). With BLASST the lse is that of
    the kept keys.
    """
    log_thr = _prep.blasst_log_threshold(blasst_threshold)
    dims, s = _masked_logits(q, k, v, layout, causal, sm_scale, q_offset, segment_ids)
    if log_thr is not None:
        tiles = tile_ids(layout, dims)
        n_tiles = layout.max_nnz + layout.column_chunks()
        skip, _ = blasst_skips(s, tiles, n_tiles, log_thr)
        skipped = jnp.take_along_axis(skip, jnp.maximum(tiles, 0), axis=-1) & (tiles >= 0)
        s = jnp.where(skipped, -jnp.inf, s)
    vf = jnp.repeat(v.astype(jnp.float32), dims.G, axis=2)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhqk,bkhd->bqhd", p / jnp.where(l > 0, l, 1.0), vf,
                   precision=jax.lax.Precision.HIGHEST)
    lse = jnp.where(l > 0, m_safe + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]
    return o.astype(q.dtype), lse


def blasst_skip_stats(
    q: jax.Array, k: jax.Array, v: jax.Array, layout: BlockSparseLayout, blasst_threshold: float,
    *, causal: bool = True, sm_scale: float | None = None, q_offset: Any = None,
    segment_ids: Any = None,
) -> dict[str, float]:
    """How much BLASST skips on this problem (reference semantics; small problems only).

    Returns ``row_tiles``: skipped / live (query row, tile) pairs; ``block_tiles``: fraction of
    live (query block of ``block_q`` rows, head, tile) triples in which every live row skips
    (the work a kernel with ``block_q``-row tiles can drop).
    """
    log_thr = _prep.blasst_log_threshold(blasst_threshold)
    dims, s = _masked_logits(q, k, v, layout, causal, sm_scale, q_offset, segment_ids)
    n_tiles = layout.max_nnz + layout.column_chunks()
    skip, live = blasst_skips(s, tile_ids(layout, dims), n_tiles, log_thr)  # [B,Hq,Sq,T]
    pad = dims.nq * dims.block_q - dims.Sq
    widths = ((0, 0), (0, 0), (0, pad), (0, 0))
    blk = (dims.B, dims.Hq, dims.nq, dims.block_q, n_tiles)
    live_b = jnp.pad(live, widths).reshape(blk)
    keep_b = jnp.pad(live & ~skip, widths).reshape(blk)
    any_live = live_b.any(axis=3)
    all_skip = any_live & ~keep_b.any(axis=3)
    return {
        "row_tiles": float(skip.sum() / jnp.maximum(live.sum(), 1)),
        "block_tiles": float(all_skip.sum() / jnp.maximum(any_live.sum(), 1)),
    }
