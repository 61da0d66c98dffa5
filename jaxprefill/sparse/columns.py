"""Key columns: single keys that every query block of a row attends besides its listed blocks
(the layout's column path), chosen from the attention of the row's last queries.

Why: in some layers attention is sharp at the token level (a few dozen keys hold most of each
query's mass), and block-pooled estimates (XAttention's antidiagonals, ProxyAttn's pooled
proxies, FlexPrefill's pooled query-aware pass) spread such a key's score over its block and
rank the block low. The last queries' exact attention sees the key itself (MInference's
vertical lines), and a column costs 1 / block_k of a block per query block in the kernel.

:func:`top_columns` picks the keys, :func:`attach_columns` adds them to a layout; a policy's
``key_columns`` parameter (:class:`jaxprefill.sparse.base.Policy`) runs both, MInference its
own vertical lines through the same :func:`attach_columns`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import BlockSparseLayout, estimation, with_columns
from jaxprefill.sparse import estimators as est
from jaxprefill.sparse import select
from jaxprefill.sparse.estimation import Estimation
from jaxprefill.sparse.geometry import Geometry

LAST_QUERIES = 64  # the queries whose attention ranks the keys (MInference's last_q)


def top_columns(q: jax.Array, k: jax.Array, geo: Geometry, count: int) -> jax.Array:
    """int32 [B, Hq, c], c = min(count, S): per query head, the c valid keys with the most
    attention mass from the row's last ``LAST_QUERIES`` queries, ascending, -1 after the last.

    q [B, S or the window's rows, Hq, D], k [B, S, Hkv, D]. Row-local: a window (``geo.row0``)
    ranks by its own last queries, as the whole-prompt call does for the same rows.
    """
    vert, _ = est.last_q_sums(q, k, geo, LAST_QUERIES, slash=False)  # [B, Hq, S]
    valid = (jnp.arange(geo.S)[None, :] < geo.lengths[:, None])[:, None, :]
    c = max(1, min(count, geo.S))
    if not geo.estimation.sort:
        how = geo.estimation
        impl = how.backend("top_positions", rows=geo.B * geo.Hq, columns=geo.S)
        if impl != "xla":
            return estimation.top_positions(vert, valid, c, impl=impl, interpret=how.interpret)
        return select.top_positions(vert, valid, c)
    sel = est.topk_mask(vert, valid, jnp.asarray(c), how=geo.estimation)
    return ascending_positions(sel, c, geo.estimation)


def ascending_positions(sel: jax.Array, cap: int, how: Estimation) -> jax.Array:
    """bool [..., S] -> int32 [..., cap]: the selected positions in ascending order, -1 after
    the last (a row has at most ``cap``). By prefix count and scatter (no sort over S); the
    sort-based reference (``Estimation(selection="sort")``) takes top_k of -position."""
    if how.sort:
        key = jnp.where(sel, -jnp.arange(sel.shape[-1], dtype=jnp.int32), -(2**30))
        val, _ = jax.lax.top_k(key, cap)
        return jnp.where(val > -(2**30), -val, -1).astype(jnp.int32)
    pos, cnt = select.mask_to_lists(sel, cap)
    return jnp.where(jnp.arange(cap) < cnt[..., None], pos, -1)


def attach_columns(layout: BlockSparseLayout, cols: jax.Array, geo: Geometry) -> BlockSparseLayout:
    """``layout`` [B, H, nq, nnz] with the key positions cols int32 [B, Hq, c] (-1 = unused)
    as columns of every query block of the row.

    A column inside one of the row's listed blocks, or after a query block's last query, is
    dropped (:func:`pallas_kernels.with_columns`). With one list per KV head (``heads="kv"``)
    a head's columns are the union of its group's. Query blocks in the right padding keep no
    columns (they list only their diagonal, as in ``Policy.finish``).
    """
    if layout.num_heads != geo.Hq:  # heads="kv": union of the group's columns
        cols = cols.reshape(geo.B, geo.Hkv, geo.G * cols.shape[-1])
    if geo.row0 is None:
        layout = with_columns(layout, cols[:, :, None, :], seq_q=geo.S)
    else:
        # Window row r is global row row0 + r: its last query is (row0 + r + 1) * block - 1.
        # The whole-prompt call clips the last row at S - 1, a no-op here: columns are valid
        # keys, all < lengths <= S.
        layout = with_columns(layout, cols[:, :, None, :], seq_q=geo.nq * geo.block,
                              q_offset=geo.query_start())
    pad = geo.query_rows()[:, None, :] >= geo.row_blocks()[:, None, None]
    return dataclasses.replace(layout, col_idx=jnp.where(pad[..., None], 0, layout.col_idx),
                               col_cnt=jnp.where(pad, 0, layout.col_cnt))
