"""Sparse layouts on the ring: each device's rows of the policy's layout, then each step's part.

Runs inside ``shard_map`` (one device's view). A device holds the query chunks ``mine`` (global
chunk indices, :func:`jaxprefill.parallel.zigzag.chunk_table`) of ``c`` tokens, ``cb = c /
block`` query-block rows each. :func:`device_rows` returns the rows of the whole-prompt layout
(``Policy.build`` on the unsplit prompt) for those query blocks, over all ``nb`` key blocks,
through the public policy interface, on one of three paths by what the policy reads:

* ``static`` (dense, streaming, trianglemix, blasst: the pattern is a function of the geometry):
  ``Policy.build_rows`` of each own chunk with a key *shape* only; nothing is gathered.
* ``rows`` (xattention, oracle_topk: row-local estimates, each row from its own queries and the
  keys): ``Policy.build_rows`` of each own chunk over all keys; K is all-gathered for the
  estimate (not V), O(S) memory per device for the duration of one layer's estimate.
* ``whole`` (every other policy: minference, flexprefill and proxyattn estimate every row from
  the prompt's last queries or a threshold over all rows; and any policy with ``key_columns``,
  whose columns come from the prompt's last queries, which a device's own rows do not hold): Q
  and K are all-gathered and the device builds the whole-prompt layout
  (``jaxprefill.sparse.prefill.layout_for``), then keeps its rows. Exact, but each device pays
  the whole estimate.

What would make the ``whole`` path split its work: a policy method that returns the global part
of an estimate (the last queries' vertical and slash sums, budgets, FlexPrefill's global
threshold) separately from the per-row layout, so a device could build its rows from its own
queries plus that small broadcast state.

:func:`step_layout` then cuts, for one ring step, the columns of the visiting shard's key blocks
out of those rows (and its key columns out of the column lists) as a layout in the visiting
shard's local block indices.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import BlockSparseLayout
from pallas_kernels.layout import block_mask_to_layout_arrays
from jaxprefill.parallel import zigzag
from jaxprefill.sparse import Policy, Prefill
from jaxprefill.sparse.prefill import layout_for

STATIC = ("dense", "streaming", "trianglemix", "blasst")
ROW_LOCAL = ("xattention", "oracle_topk")


def estimate_path(policy: Policy) -> str:
    """"static", "rows" or "whole" (module docstring)."""
    if policy.has_columns:  # ranked by the prompt's last queries: not row-local
        return "whole"
    if policy.name in STATIC:
        return "static"
    if policy.name in ROW_LOCAL:
        return "rows"
    return "whole"


def check_policy(policy: Policy, *, tensor_split: bool) -> None:
    """Raises ValueError (one line) for a policy the ring cannot run."""
    if type(policy).attend is not Policy.attend:
        raise ValueError(f"context parallelism: sparse policy {policy.name!r} computes its own "
                         f"attention (it reorders keys), which cannot be split into ring steps")
    if tensor_split and getattr(policy, "head_config", None) is not None:
        raise ValueError(f"context parallelism: {policy.name!r} with a per-head head_config "
                         f"needs the heads unsplit (mesh tensor axis 1)")


@dataclasses.dataclass(frozen=True)
class DeviceRows:
    """One device's layout rows: mask bool [B, H, m*cb, nb] over global key blocks, optional key
    columns col_idx int32 [B, H, m*cb, C] (global token positions) and col_cnt [B, H, m*cb]."""

    mask: Any
    col_idx: Any = None
    col_cnt: Any = None


def all_gather_natural(x: jax.Array, axis_name: str, n: int, zig: bool) -> jax.Array:
    """This device's ring-order shard [B, s, ...] -> the whole array [B, n*s, ...] in natural
    order, on every device."""
    full = jax.lax.all_gather(x, axis_name, axis=1, tiled=True)
    return zigzag.from_ring(full, n, zig)


def own_rows(layout: BlockSparseLayout, rows: jax.Array) -> DeviceRows:
    """Rows ``rows`` (int32 [R]) of a whole-prompt layout as a DeviceRows."""
    take = lambda a: jnp.take(a, rows, axis=2)  # noqa: E731
    mask = BlockSparseLayout(take(layout.kv_idx), take(layout.kv_cnt), layout.block_q,
                             layout.block_k, layout.num_kv_blocks).to_block_mask()
    if layout.col_idx is None:
        return DeviceRows(mask)
    return DeviceRows(mask, take(layout.col_idx), take(layout.col_cnt))


def concat_rows(parts: list[BlockSparseLayout]) -> DeviceRows:
    """Row windows of one layout, in order -> DeviceRows."""
    cat = lambda name: jnp.concatenate([getattr(p, name) for p in parts], axis=2)  # noqa: E731
    first = parts[0]
    mask = BlockSparseLayout(cat("kv_idx"), cat("kv_cnt"), first.block_q, first.block_k,
                             first.num_kv_blocks).to_block_mask()
    if first.col_idx is None:
        return DeviceRows(mask)
    return DeviceRows(mask, cat("col_idx"), cat("col_cnt"))


def packed_rows(seg: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For packed rows seg int32 [B, S] (0 = padding), as `jaxprefill.sparse.prefill`'s packed
    layout decides: (single bool [B]: the row holds one document from token 0, its length [B])."""
    s = seg.shape[1]
    first = seg[:, :1]
    in_first = seg == first
    prefix = jnp.where(jnp.all(in_first, axis=1), s, jnp.argmin(in_first, axis=1))
    prefix = prefix.astype(jnp.int32)
    single = (first[:, 0] > 0) & (jnp.sum(seg > 0, axis=1) == prefix)
    return single, jnp.where(single, prefix, s)


def structured_rows(q_seg: jax.Array, kv_seg: jax.Array, row0: jax.Array, block: int
                    ) -> jax.Array:
    """bool [B, 1, R, nb]: blocks of query-block rows row0 + [0, R) that may hold a visible pair
    under causal masking and segment ids (q_seg [B, R*block] of those rows, kv_seg [B, S])."""
    b, rq = q_seg.shape
    r, nb = rq // block, kv_seg.shape[1] // block
    qlo, qhi = block_range(q_seg, block)
    klo, khi = block_range(kv_seg, block)
    rows = row0 + jnp.arange(r)
    mask = (jnp.arange(nb)[None, :] <= rows[:, None])[None]
    mask &= jnp.maximum(qlo[:, :, None], klo[:, None, :]) <= jnp.minimum(qhi[:, :, None],
                                                                         khi[:, None, :])
    return mask[:, None]


def block_range(seg: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Min and max segment id of each block of seg int32 [B, S] (S a multiple of block)."""
    b, s = seg.shape
    blocks = seg.reshape(b, s // block, block)
    return blocks.min(-1), blocks.max(-1)


def device_rows(policy: Policy, call: Prefill, q: jax.Array, k: jax.Array, *, axis_name: str,
                n: int, zig: bool, mine: jax.Array, lengths: jax.Array | None,
                q_seg: jax.Array | None) -> DeviceRows:
    """This device's rows of ``policy``'s whole-prompt layout for ``call`` (module docstring).

    q [B, m*c, Hq, D], k [B, m*c, Hkv, D]: the device's shards in ring order; mine int32 [m]:
    its global chunks; lengths [B] (prompt calls) or None; q_seg [B, m*c] (packed calls).
    """
    b, local, _, d = q.shape
    m = zigzag.chunks_per_device(zig)
    c, blk = local // m, policy.block_size
    total = local * n
    path = estimate_path(policy)
    seg_full = None if q_seg is None else all_gather_natural(q_seg, axis_name, n, zig)
    if path == "whole":
        q_full = all_gather_natural(q, axis_name, n, zig)
        k_full = all_gather_natural(k, axis_name, n, zig)
        full = layout_for(policy, q_full, k_full,
                          dataclasses.replace(call, lengths=lengths, segment_ids=seg_full))
        rows = (mine[:, None] * (c // blk) + jnp.arange(c // blk)[None, :]).reshape(-1)
        return own_rows(full, rows)
    if path == "static":
        k_full = jax.ShapeDtypeStruct((b, total, k.shape[2], d), k.dtype)  # geometry only
    else:
        k_full = all_gather_natural(k, axis_name, n, zig)
    if call.kind == "packed":
        single, lengths = packed_rows(seg_full)
    parts = [policy.build_rows(q[:, t * c:(t + 1) * c], k_full, row0=mine[t] * (c // blk),
                               layer=call.layer, lengths=lengths, min_length=call.min_length)
             for t in range(m)]
    rows = concat_rows(parts)
    if call.kind != "packed":
        return rows
    dense = jnp.concatenate([structured_rows(q_seg[:, t * c:(t + 1) * c], seg_full,
                                             mine[t] * (c // blk), blk) for t in range(m)],
                            axis=2)
    pick = single[:, None, None, None]
    mask = jnp.where(pick, rows.mask, dense)
    if rows.col_idx is None:
        return DeviceRows(mask)
    return DeviceRows(mask, rows.col_idx, jnp.where(single[:, None, None], rows.col_cnt, 0))


def visible_chunks(mine: jax.Array, theirs: jax.Array, *, causal: bool, own: bool) -> jax.Array:
    """bool [m, m]: query chunk a may see key chunk b (every pair, or b before a, or b == a on
    the device's own shard where the kernel applies the token-level causal mask)."""
    if not causal:
        return jnp.ones((mine.shape[0], theirs.shape[0]), bool)
    vis = theirs[None, :] < mine[:, None]
    return vis | (theirs[None, :] == mine[:, None]) if own else vis


def visiting_blocks(theirs: jax.Array, c: int, block: int) -> jax.Array:
    """int32 [m*cb]: global key block of each local key block of a shard holding ``theirs``."""
    cb = c // block
    return (theirs[:, None] * cb + jnp.arange(cb)[None, :]).reshape(-1)


def step_layout(rows: DeviceRows, mine: jax.Array, theirs: jax.Array, *, c: int, block: int,
                causal: bool, own: bool) -> BlockSparseLayout:
    """The layout of one ring step: the device's rows restricted to the visiting shard (chunks
    ``theirs``), in that shard's local key blocks and positions."""
    cb = c // block
    m = mine.shape[0]
    vis = visible_chunks(mine, theirs, causal=causal, own=own)  # [m, m]
    blocks = jnp.repeat(jnp.repeat(vis, cb, axis=0), cb, axis=1)  # [m*cb, m*cb]
    mask = jnp.take(rows.mask, visiting_blocks(theirs, c, block), axis=3) & blocks
    kv_idx, kv_cnt = block_mask_to_layout_arrays(mask, m * cb)
    layout = BlockSparseLayout(kv_idx, kv_cnt, block, block, m * cb)
    if rows.col_idx is None:
        return layout
    col_idx, col_cnt = step_columns(rows.col_idx, rows.col_cnt, theirs, c, cb, vis)
    return dataclasses.replace(layout, col_idx=col_idx, col_cnt=col_cnt)


def step_columns(col_idx: jax.Array, col_cnt: jax.Array, theirs: jax.Array, c: int, cb: int,
                 vis: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Key columns (global positions, [B, H, R, C]; row r in local chunk r // cb) that lie in
    the visiting chunks ``theirs`` and are visible (vis bool [m, m]) -> their local positions,
    ascending and padded with the last valid one (the layout convention)."""
    match = (col_idx // c)[..., None] == theirs  # [B, H, R, C, m]
    slot = jnp.argmax(match, axis=-1)
    local = slot * c + col_idx % c
    row_chunk = jnp.arange(col_idx.shape[2]) // cb
    ok = vis[row_chunk[None, None, :, None], slot]
    valid = (jnp.arange(col_idx.shape[-1]) < col_cnt[..., None]) & jnp.any(match, -1) & ok
    srt = jnp.sort(jnp.where(valid, local, np.int32(2**30)), axis=-1)
    cnt = jnp.sum(valid, axis=-1, dtype=jnp.int32)
    last = jnp.take_along_axis(srt, jnp.maximum(cnt - 1, 0)[..., None], axis=-1)
    last = jnp.where(cnt[..., None] > 0, last, 0)
    pos = jnp.arange(col_idx.shape[-1])
    return jnp.where(pos < cnt[..., None], srt, last).astype(jnp.int32), cnt


def has_work(layout: BlockSparseLayout) -> jax.Array:
    """bool []: the layout lists any block or column."""
    work = jnp.any(layout.kv_cnt > 0)
    if layout.col_cnt is not None:
        work |= jnp.any(layout.col_cnt > 0)
    return work


__all__ = ["DeviceRows", "ROW_LOCAL", "STATIC", "all_gather_natural", "block_range",
           "check_policy", "concat_rows", "device_rows", "estimate_path", "has_work", "own_rows",
           "packed_rows", "step_columns", "step_layout", "structured_rows", "visible_chunks",
           "visiting_blocks"]
