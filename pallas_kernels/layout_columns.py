"""Column-path builders for :class:`pallas_kernels.layout.BlockSparseLayout` (jit-able).

A column is one key position a query block attends to besides its listed key blocks (MInference's
vertical lines). :func:`build_columns` turns per-row key positions or a token-level vertical mask
into the layout's ``col_idx [B, H, nq, max_cols]`` / ``col_cnt [B, H, nq]``: sorted, deduplicated,
without the columns that fall inside one of the row's listed blocks (the kernels assume columns
and blocks are disjoint, so nothing is counted twice) and, optionally, without columns that are
causally invisible to the whole query block.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.layout import BlockSparseLayout, scatter_rows

_BIG = np.int32(2**30)


def with_columns(layout: BlockSparseLayout, columns: Any, *, max_cols: int | None = None,
                 seq_q: int | None = None, q_offset: Any = 0) -> BlockSparseLayout:
    """``layout`` with the given key columns (replacing any it has).

    Args:
        columns: either key positions, int ``[B|1, H, nq|1, L]`` (any order, negatives and
            positions ``>= nk * block_k`` are ignored, duplicates are merged; ``nq`` axis 1 =
            the same positions for every query block), or a token-level vertical mask, bool
            ``[B|1, H, nq|1, Sk]``.
        max_cols: static list length. Default: ``L`` for positions; for a concrete mask the
            largest row count. Rows with more columns keep the lowest positions.
        seq_q, q_offset: when ``seq_q`` is given, columns after the last causal key of a
            query block (``> min((i+1)*block_q, seq_q) - 1 + q_offset``) are dropped too
            (they would be masked anyway).

    Columns inside one of the row's listed blocks are always dropped. Jit-able when
    ``max_cols`` is static (or ``columns`` is positions).
    """
    idx, cnt = build_columns(layout, columns, max_cols=max_cols, seq_q=seq_q, q_offset=q_offset)
    return dataclasses.replace(layout, col_idx=idx, col_cnt=cnt)


def build_columns(layout: BlockSparseLayout, columns: Any, *, max_cols: int | None = None,
                  seq_q: int | None = None, q_offset: Any = 0) -> tuple[jax.Array, jax.Array]:
    """(col_idx int32 ``[B, H, nq, max_cols]``, col_cnt int32 ``[B, H, nq]``).

    See :func:`with_columns` for the arguments. Steps: normalize to sorted
    positions, drop invalid / duplicate / in-listed-block / (optionally) non-causal entries,
    compact the survivors to the front (cumsum + scatter: no per-row sort of the output) and
    pad with the last valid entry.
    """
    B, H, nq = tuple(layout.kv_cnt.shape)
    bk, nk = layout.block_k, layout.num_kv_blocks
    sk_max = nk * bk
    is_traced = isinstance(columns, jax.core.Tracer)
    cols = columns if isinstance(columns, jax.Array) else np.asarray(columns)
    if cols.ndim != 4:
        raise ValueError(f"columns must be [B|1, H, nq|1, L] positions or [B|1, H, nq|1, Sk] "
                         f"mask, got shape {tuple(cols.shape)}")
    cb, ch, cq, n_list = (int(x) for x in cols.shape)
    if cb not in (1, B) or ch != H or cq not in (1, nq):
        raise ValueError(f"columns shape {tuple(cols.shape)} does not fit the layout rows "
                         f"[B={B}, H={H}, nq={nq}] (batch and nq may be 1)")
    if cols.dtype == bool:
        if not (nk - 1) * bk < n_list <= sk_max:
            raise ValueError(f"a column mask needs Sk keys with ceil(Sk / {bk}) = {nk} blocks, "
                             f"got {n_list}")
        if max_cols is None and is_traced:
            raise ValueError("a traced column mask needs a static max_cols")
        pos = jnp.where(jnp.asarray(cols), jnp.arange(n_list, dtype=jnp.int32), _BIG)
    else:
        if not np.issubdtype(cols.dtype, np.integer):
            raise ValueError(f"column positions must be integers, got {cols.dtype}")
        pos = jnp.asarray(cols, jnp.int32)
        pos = jnp.where((pos < 0) | (pos >= sk_max), _BIG, pos)
        pos = jnp.sort(pos, axis=-1)
        if max_cols is None:
            max_cols = n_list
    if max_cols is not None and max_cols < 1:
        raise ValueError(f"max_cols must be >= 1, got {max_cols}")

    dup = jnp.concatenate([jnp.zeros(pos.shape[:-1] + (1,), bool),
                           pos[..., 1:] == pos[..., :-1]], axis=-1)
    valid = (pos < sk_max) & ~dup  # [cb, H, cq, L]
    pos = jnp.broadcast_to(pos, (B, H, nq, n_list))
    valid = jnp.broadcast_to(valid, (B, H, nq, n_list))
    listed = scatter_rows(layout.broadcast_batch(B).kv_idx, layout.broadcast_batch(B).kv_cnt, nk)
    in_block = jnp.take_along_axis(listed, jnp.clip(pos // bk, 0, nk - 1), axis=-1)
    valid = valid & ~in_block
    if seq_q is not None:
        off = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32).reshape(-1), (B,))
        last_q = jnp.minimum((jnp.arange(nq, dtype=jnp.int32) + 1) * layout.block_q, seq_q) - 1
        last_q = last_q[None, :] + off[:, None]  # [B, nq]: last query position of the block
        valid = valid & (pos <= last_q[:, None, :, None])
    count = jnp.sum(valid, axis=-1, dtype=jnp.int32)
    if max_cols is None:  # concrete mask: the longest row after dropping
        max_cols = max(1, int(jnp.max(count)))
    return compact_rows(pos, valid, count, int(max_cols))


def compact_rows(pos: jax.Array, valid: jax.Array, count: jax.Array,
                 max_cols: int) -> tuple[jax.Array, jax.Array]:
    """Moves the ``valid`` entries of each row of ``pos [..., L]`` (kept in order) to the front
    of a ``[..., max_cols]`` list padded with the last valid entry (0 for an empty row); rows
    with more than ``max_cols`` keep the first ones. Returns (idx, cnt) int32."""
    lead = tuple(pos.shape[:-1])
    n_list = pos.shape[-1]
    rows = int(np.prod(lead)) if lead else 1
    dest = jnp.cumsum(valid, axis=-1, dtype=jnp.int32) - 1
    keep = valid & (dest < max_cols)
    tgt = jnp.where(keep, dest, max_cols).reshape(rows, n_list)
    out = jnp.zeros((rows, max_cols + 1), jnp.int32)
    out = out.at[jnp.arange(rows)[:, None], tgt].set(pos.reshape(rows, n_list).astype(jnp.int32))
    out = out[:, :max_cols].reshape(lead + (max_cols,))
    cnt = jnp.minimum(count, max_cols).astype(jnp.int32)
    last = jnp.take_along_axis(out, jnp.maximum(cnt - 1, 0)[..., None], axis=-1)
    last = jnp.where(cnt[..., None] > 0, last, 0)
    t = jnp.arange(max_cols, dtype=jnp.int32)
    return jnp.where(t < cnt[..., None], out, last).astype(jnp.int32), cnt


__all__ = ["build_columns", "compact_rows", "with_columns"]
