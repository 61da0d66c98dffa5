"""Host-side (jnp, outside any kernel body) preprocessing shared by every implementation.

Validates shapes, normalizes ``q_offset`` and ``segment_ids``, pads sequences to block multiples
and computes, per layout row, how many leading list entries need no in-block mask.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.layout import BlockSparseLayout, cdiv


class SegmentIds(NamedTuple):
    """Segment ids (packed sequences): a query attends to a key only if their ids are equal.

    Attributes:
        q: int32 ``[B, Sq]`` segment id of each query token.
        kv: int32 ``[B, Sk]`` segment id of each key token.

    ``block_sparse_attention`` also accepts a single int array ``[B, S]`` when ``Sq == Sk``,
    used for both.
    """

    q: Any
    kv: Any


@dataclasses.dataclass(frozen=True)
class Dims:
    """Static problem sizes. ``Hl``: layout heads; ``G = Hq // Hkv``; ``Gl = Hq // Hl``."""

    B: int
    Sq: int
    Sk: int
    Hq: int
    Hkv: int
    Hl: int
    Dqk: int
    Dv: int
    block_q: int
    block_k: int
    nq: int
    nk: int

    @property
    def G(self) -> int:
        return self.Hq // self.Hkv

    @property
    def Gl(self) -> int:
        return self.Hq // self.Hl


def check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, layout: BlockSparseLayout) -> Dims:
    """Validates ``q [B,Sq,Hq,Dqk]``, ``k [B,Sk,Hkv,Dqk]``, ``v [B,Sk,Hkv,Dv]`` and the layout."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, S, H, D]: {q.shape}, {k.shape}, {v.shape}")
    B, Sq, Hq, Dqk = q.shape
    Bk, Sk, Hkv, Dk = k.shape
    if (Bk, Dk) != (B, Dqk) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"incompatible q {q.shape}, k {k.shape}, v {v.shape}")
    if Hq % Hkv:
        raise ValueError(f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    Hl = layout.num_heads
    if Hl not in (Hq, Hkv):
        raise ValueError(f"layout has {Hl} heads; expected Hq={Hq} or Hkv={Hkv}")
    if layout.batch not in (1, B):
        raise ValueError(f"layout batch {layout.batch} vs B={B}")
    nq, nk = cdiv(Sq, layout.block_q), cdiv(Sk, layout.block_k)
    if layout.num_q_blocks != nq or layout.num_kv_blocks != nk:
        raise ValueError(
            f"layout grid ({layout.num_q_blocks}, {layout.num_kv_blocks}) does not match "
            f"Sq={Sq}, Sk={Sk} with blocks ({layout.block_q}, {layout.block_k}): ({nq}, {nk})"
        )
    if layout.col_idx is not None and (
            layout.col_idx.ndim != 4 or tuple(layout.col_idx.shape[:3]) != tuple(
                layout.kv_cnt.shape) or tuple(layout.col_cnt.shape) != tuple(layout.kv_cnt.shape)):
        raise ValueError(f"layout columns {layout.col_idx.shape}, {layout.col_cnt.shape} do not "
                         f"match its rows {layout.kv_cnt.shape}")
    return Dims(B, Sq, Sk, Hq, Hkv, Hl, Dqk, v.shape[-1], layout.block_q, layout.block_k, nq, nk)


def normalize_q_offset(q_offset: Any, batch: int) -> jax.Array:
    """``None`` | int | int array ``[]`` or ``[B]`` -> int32 ``[B]``."""
    if q_offset is None:
        return jnp.zeros((batch,), jnp.int32)
    off = jnp.asarray(q_offset, jnp.int32)
    if off.ndim == 0:
        return jnp.broadcast_to(off, (batch,))
    if off.shape != (batch,):
        raise ValueError(f"q_offset must be a scalar or [B]={batch}, got {off.shape}")
    return off


def normalize_segment_ids(segment_ids: Any, dims: Dims) -> SegmentIds | None:
    """``None`` | :class:`SegmentIds` | int ``[B, S]`` (Sq == Sk) -> ``SegmentIds`` int32."""
    if segment_ids is None:
        return None
    if isinstance(segment_ids, SegmentIds) or (
        isinstance(segment_ids, tuple) and len(segment_ids) == 2
    ):
        sq, skv = segment_ids
    else:
        if dims.Sq != dims.Sk:
            raise ValueError("a single segment-id array needs Sq == Sk; pass SegmentIds(q, kv)")
        sq = skv = segment_ids
    sq = jnp.asarray(sq, jnp.int32)
    skv = jnp.asarray(skv, jnp.int32)
    if sq.shape != (dims.B, dims.Sq) or skv.shape != (dims.B, dims.Sk):
        raise ValueError(f"segment ids {sq.shape}, {skv.shape}; want [B,Sq], [B,Sk]")
    return SegmentIds(sq, skv)


def pad_axis(x: jax.Array, axis: int, size: int, value: Any = 0) -> jax.Array:
    """Pads ``x`` along ``axis`` up to ``size`` (no-op when already that long)."""
    n = x.shape[axis]
    if n == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - n)
    return jnp.pad(x, widths, constant_values=value)


def pad_segment_ids(seg: SegmentIds | None, dims: Dims) -> SegmentIds | None:
    """Pads q ids with -1 and kv ids with -2 so padded tokens never match anything."""
    if seg is None:
        return None
    return SegmentIds(
        pad_axis(seg.q, 1, dims.nq * dims.block_q, -1),
        pad_axis(seg.kv, 1, dims.nk * dims.block_k, -2),
    )


def full_prefix_count(
    layout: BlockSparseLayout,
    q_offset: jax.Array,
    seq_k: int,
    causal: bool,
    has_segments: bool,
) -> jax.Array:
    """int32 ``[B, Hl, nq]``: number of leading list entries whose blocks need no mask.

    A key block j is mask-free for query block i when it lies inside the sequence
    (``(j+1)*block_k <= Sk``) and, if causal, its last key precedes the block's first query
    (``(j+1)*block_k - 1 <= i*block_q + q_offset[b]``). With segment ids every block is masked.
    Only a prefix counts, so the result is right for unsorted lists too.
    """
    B, H, nq, nnz = layout.kv_idx.shape
    if has_segments:
        return jnp.zeros((B, H, nq), jnp.int32)
    last_key = (layout.kv_idx + 1) * layout.block_k - 1
    ok = last_key < seq_k
    if causal:
        first_q = jnp.arange(nq, dtype=jnp.int32) * layout.block_q
        first_q = first_q[None, None, :, None] + q_offset[:, None, None, None]
        ok = ok & (last_key <= first_q)
    t = jnp.arange(nnz, dtype=jnp.int32)
    ok = ok & (t < layout.kv_cnt[..., None])
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def padded_columns(layout: BlockSparseLayout) -> tuple[jax.Array, int]:
    """(col_idx padded to ``n_chunks * block_k`` entries by repeating the last one, n_chunks).

    Kernels walk the columns in ``n_chunks = ceil(max_cols / block_k)`` chunks of ``block_k``
    positions; entries ``>= col_cnt`` are masked.
    """
    n_chunks = layout.column_chunks()
    idx = layout.col_idx
    extra = n_chunks * layout.block_k - layout.max_cols
    if extra:
        idx = jnp.concatenate([idx, jnp.repeat(idx[..., -1:], extra, axis=-1)], axis=-1)
    return idx.astype(jnp.int32), n_chunks


def blasst_log_threshold(blasst_threshold: float | None) -> float | None:
    """BLASST's ``lambda`` -> ``ln(lambda)`` (None = off). ``lambda`` must be in [0, 1]:
    0 gives ``-inf`` (never skips), 1 skips every tile whose max is below the running max."""
    if blasst_threshold is None:
        return None
    lam = float(blasst_threshold)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"blasst_threshold (lambda) must be in [0, 1], got {blasst_threshold}")
    return -math.inf if lam == 0.0 else math.log(lam)


def default_scale(sm_scale: float | None, head_dim: int) -> float:
    return float(sm_scale) if sm_scale is not None else float(head_dim) ** -0.5
