"""The DSA lightning indexer on NVIDIA GPUs (Pallas, Triton lowering): fused scores and the
per-row k-th key search.

Reference: :func:`pallas_kernels.dsa_reference.index_topk_reference`; the top-k driver that
calls these kernels is :func:`pallas_kernels._dsa_common.topk_keys`.

``index_keys_triton``: order keys (``_dsa_common.order_key``) of the index scores of a block of
query rows against every key, INVALID where a query may not look:

    score[b, i, j] = kscale[b, j] * sum_h w[b, i, h] * relu(q[b, i, h] . k[b, j])

Design: the Hi index heads of BQ queries are the rows of one MMA (M = BQ * Hi = 256 at V3.2's
64 heads: q rows ordered (query, head)), so a key tile [BK, D] is read once for all of them and
the score tile [BQ * Hi, BK] goes through ReLU, the head weights and a sum over each query's Hi
rows in registers: the [S, Hi, T] intermediate of the XLA form never exists. A program keeps its
query block and walks the key tiles up to its rows' causal limit (and writes INVALID past it);
``key_splits`` divides the tiles among programs when there are few query blocks (decode).
FP8: q and k in float8 e4m3 (one scale per row, folded into w and ``kscale``); the MMA runs
in FP8 with float32 accumulation.

``segment_topk_triton``: per row of order keys [R, w] (w <= MAX_COLUMNS) its top-k, compacted:
the largest t with count(key >= t) >= k by a 32-step bit search on registers after one load
(``mass_cut_triton``'s structure with counts), the tie ranks and output slots by prefix counts
on the same registers, and one scatter of the selected keys and columns. Rows of 128K keys go
through it three times (8K segments, then their 32K candidates, then 8K).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._dsa_common import INVALID
from pallas_kernels.gpu._triton_common import (CompilerParams as _CompilerParams,
                                                f32_dot_precision, pow2 as _pow2)

MAX_COLUMNS = 8192  # segment_topk row width; wider rows go through segments (_dsa_common)
_TILE_ELEMS = 8192  # segment_topk: rows x columns per program (8 warps: 32 per thread)
_SIGN = -(2 ** 31)
_MAG = 2 ** 31 - 1


def _order_key(s):
    s = jnp.where(s == 0.0, 0.0, s)
    bits = lax.bitcast_convert_type(s, jnp.int32)
    return bits ^ ((bits >> 31) & _MAG)


def _scores_kernel(q_ref, w_ref, k_ref, ks_ref, qpos_ref, qseg_ref, kseg_ref, o_ref, *,
                   bq: int, hi: int, bk: int, n_tiles: int, tiles_per_split: int,
                   use_seg: bool, use_kscale: bool, precision):
    split = pl.program_id(1)
    q = q_ref[...]  # [bq * hi, D]
    w = w_ref[...]  # [bq * hi] float32
    qpos = qpos_ref[...]  # [bq]
    limit = jnp.max(qpos) + 1  # keys at or past this index are invalid for every row
    first = split * tiles_per_split
    last = jnp.minimum(first + tiles_per_split, n_tiles)
    causal_end = jnp.clip((limit + bk - 1) // bk, first, last)
    if use_seg:
        qseg = qseg_ref[...]

    def compute(j, carry):
        start = pl.multiple_of(j * bk, bk)
        kt = k_ref[pl.ds(start, bk), :]  # [bk, D]
        s = lax.dot_general(q, kt, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)
        s = jnp.maximum(s, 0.0) * w[:, None]
        s = jnp.sum(s.reshape(bq, hi, bk), axis=1)  # [bq, bk]
        if use_kscale:
            s = s * ks_ref[pl.ds(start, bk)][None, :]
        col = start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        ok = col <= qpos[:, None]
        if use_seg:
            ok &= qseg[:, None] == kseg_ref[pl.ds(start, bk)][None, :]
        o_ref[:, pl.ds(start, bk)] = jnp.where(ok, _order_key(s), INVALID)
        return carry

    def invalid(j, carry):
        start = pl.multiple_of(j * bk, bk)
        o_ref[:, pl.ds(start, bk)] = jnp.full((bq, bk), INVALID, jnp.int32)
        return carry

    lax.fori_loop(first, causal_end, compute, 0)
    lax.fori_loop(causal_end, last, invalid, 0)


def scores_block_q(hi: int, r: int) -> int:
    """Queries per program: M = BQ * Hi ~ 256 MMA rows (a key byte feeds 256 rows)."""
    return max(1, min(_pow2(r), 256 // hi))


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "key_splits", "num_warps",
                                             "num_stages", "interpret", "f32_dot"))
def index_keys_triton(q: jax.Array, w: jax.Array, k: jax.Array, q_pos: jax.Array,
                      seg_q: jax.Array | None = None, seg_k: jax.Array | None = None,
                      k_scale: jax.Array | None = None, *, block_q: int | None = None,
                      block_k: int = 64, key_splits: int = 1, num_warps: int = 8,
                      num_stages: int = 2, interpret: bool = False, f32_dot: str = "tf32x3"
                      ) -> jax.Array:
    """int32 order keys [B, R, T] of the index scores (module doc).

    Args:
      q: [B, R, Hi, D] (bf16, f16, f32 or float8_e4m3fn); w: float32 [B, R, Hi].
      k: [B, T, D] (q's dtype); q_pos: int32 [B, R], each query's position (causal limit).
      seg_q, seg_k: int32 [B, R], [B, T] or None; k_scale: float32 [B, T] or None (FP8).
      block_q: queries per program (default `scores_block_q`); block_k: keys per tile (a power
      of two >= 16); key_splits: programs per query block, each over a contiguous tile range.
      f32_dot: how float32 inputs are multiplied (``_triton_common.F32_DOTS``; exact in
      interpret mode).
    """
    b, r, hi, d = q.shape
    t = k.shape[1]
    hp, dp = _pow2(hi), max(16, _pow2(d))
    bq = block_q or scores_block_q(hp, r)
    if bq < 1 or bq != _pow2(bq):  # Triton arrays must have power-of-two sizes
        raise ValueError(f"block_q must be a power of two, got {block_q}")
    if block_k < 16 or block_k != _pow2(block_k):
        raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
    rp = -(-r // bq) * bq
    tp = -(-t // block_k) * block_k
    n_tiles = tp // block_k
    if hp != hi or dp != d:  # padded heads get weight 0, padded dims 0: scores unchanged
        q = jnp.pad(q, ((0, 0), (0, 0), (0, hp - hi), (0, dp - d)))
        w = jnp.pad(w, ((0, 0), (0, 0), (0, hp - hi)))
        k = jnp.pad(k, ((0, 0), (0, 0), (0, dp - d)))
    q = jnp.pad(q, ((0, 0), (0, rp - r), (0, 0), (0, 0))).reshape(b, rp * hp, dp)
    w = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, rp - r), (0, 0))).reshape(b, rp * hp)
    k = jnp.pad(k.astype(q.dtype), ((0, 0), (0, tp - t), (0, 0)))
    # padded queries sit at position -1: nothing is valid for them
    q_pos = jnp.pad(q_pos.astype(jnp.int32), ((0, 0), (0, rp - r)), constant_values=-1)
    use_seg, use_ks = seg_q is not None, k_scale is not None
    seg_q = jnp.zeros((b, rp), jnp.int32) if seg_q is None else jnp.pad(seg_q.astype(jnp.int32),
                                                                        ((0, 0), (0, rp - r)))
    seg_k = jnp.zeros((b, tp), jnp.int32) if seg_k is None else jnp.pad(
        seg_k.astype(jnp.int32), ((0, 0), (0, tp - t)), constant_values=-1)
    k_scale = jnp.ones((b, tp), jnp.float32) if k_scale is None else jnp.pad(
        k_scale.astype(jnp.float32), ((0, 0), (0, tp - t)))
    key_splits = max(1, min(key_splits, n_tiles))
    tps = -(-n_tiles // key_splits)
    kernel = functools.partial(_scores_kernel, bq=bq, hi=hp, bk=block_k, n_tiles=n_tiles,
                               tiles_per_split=tps, use_seg=use_seg, use_kscale=use_ks,
                               precision=f32_dot_precision(f32_dot, q.dtype, interpret))
    out = pl.pallas_call(
        kernel,
        grid=(rp // bq, key_splits, b),
        in_specs=[
            pl.BlockSpec((None, bq * hp, dp), lambda i, s, bb: (bb, i, 0)),
            pl.BlockSpec((None, bq * hp), lambda i, s, bb: (bb, i)),
            pl.BlockSpec((None, tp, dp), lambda i, s, bb: (bb, 0, 0)),
            pl.BlockSpec((None, tp), lambda i, s, bb: (bb, 0)),
            pl.BlockSpec((None, bq), lambda i, s, bb: (bb, i)),
            pl.BlockSpec((None, bq), lambda i, s, bb: (bb, i)),
            pl.BlockSpec((None, tp), lambda i, s, bb: (bb, 0)),
        ],
        out_specs=pl.BlockSpec((None, bq, tp), lambda i, s, bb: (bb, i, 0)),
        out_shape=jax.ShapeDtypeStruct((b, rp, tp), jnp.int32),
        compiler_params=_CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="dsa_index_scores_triton",
    )(q, w, k, k_scale, q_pos, seg_q, seg_k)
    return out[:, :r, :t]


def _segment_topk_kernel(key_ref, cols_ref, okey_ref, ocol_ref, *, k: int, n_seg: int,
                         has_cols: bool):
    key = key_ref[...]  # [R, w] int32
    r, w = key.shape
    if has_cols:
        cols = cols_ref[...]
    else:  # row g of the launch is segment g % n_seg of its row
        g = pl.program_id(0) * r + lax.broadcasted_iota(jnp.int32, (r, w), 0)
        cols = (g % n_seg) * w + lax.broadcasted_iota(jnp.int32, (r, w), 1)

    def step(bit_index, ans):
        bit = lax.shift_left(jnp.int32(1), 31 - bit_index)
        cand = (ans | bit) ^ _SIGN
        count = jnp.sum((key >= cand[:, None]).astype(jnp.int32), axis=1)
        return jnp.where(count >= k, ans | bit, ans)

    tau = (lax.fori_loop(0, 32, step, jnp.zeros((r,), jnp.int32)) ^ _SIGN)[:, None]
    valid = key != INVALID
    above = valid & (key > tau)
    tie = valid & (key == tau)
    need = k - jnp.sum(above.astype(jnp.int32), axis=1)
    rank = jnp.cumsum(tie.astype(jnp.int32), axis=1) - 1
    sel = above | (tie & (rank < need[:, None]))
    pos = jnp.cumsum(sel.astype(jnp.int32), axis=1) - 1
    n_sel = jnp.sum(sel.astype(jnp.int32), axis=1)
    # the selected entries to their slots (column order kept); the others to the spare
    # column k, which the wrapper drops: no two writes of one program meet
    rows = lax.broadcasted_iota(jnp.int32, (r, w), 0)
    dest = jnp.where(sel, pos, k)
    plgpu.store(okey_ref.at[rows, dest], key, mask=sel)
    plgpu.store(ocol_ref.at[rows, dest], cols, mask=sel)
    # every slot past a row's selection gets the padding (rows with fewer than k valid
    # entries); over the whole padded width kp: Triton arrays must have power-of-two sizes,
    # k need not, and the wrapper drops the columns from k on. Disjoint from the scatter.
    kp = okey_ref.shape[1]
    empty = lax.broadcasted_iota(jnp.int32, (r, kp), 1) >= n_sel[:, None]
    plgpu.store(okey_ref, jnp.full((r, kp), INVALID, jnp.int32), mask=empty)
    plgpu.store(ocol_ref, jnp.full((r, kp), -1, jnp.int32), mask=empty)


@functools.partial(jax.jit, static_argnames=("k", "n_seg", "num_warps", "interpret"))
def segment_topk_triton(key: jax.Array, cols: jax.Array | None, k: int, n_seg: int = 1, *,
                        num_warps: int = 8, interpret: bool = False
                        ) -> tuple[jax.Array, jax.Array]:
    """Each row's top-k of order keys [R, w] (w <= MAX_COLUMNS), selected and compacted in one
    program: (keys, cols) int32 [R, min(k, w)] in column order, INVALID / -1 padded.

    cols: int32 [R, w], the column of each entry, or None: row g is segment g % n_seg of a
    longer row, its entry j column (g % n_seg) * w + j. The 32-step bit search, the tie ranks
    and the slots (prefix counts) run on registers; the selection is written with a scatter.
    """
    rows, w = key.shape
    if w > MAX_COLUMNS:
        raise ValueError(f"segment_topk_triton: rows of {w} entries exceed {MAX_COLUMNS}")
    k = min(k, w)
    wp = max(16, _pow2(w))
    if cols is None and n_seg > 1 and wp != w:
        raise ValueError(f"segment_topk_triton: implicit columns need segments of a power of "
                         f"two >= 16 entries, got {w}")
    kp = _pow2(k + 1)  # the k slots and the spare one, padded to a block shape
    r = max(1, min(_TILE_ELEMS // wp, _pow2(max(1, rows))))
    rp = -(-rows // r) * r
    key = jnp.pad(key, ((0, rp - rows), (0, wp - w)), constant_values=INVALID)
    has_cols = cols is not None
    if has_cols:
        cols = jnp.pad(cols.astype(jnp.int32), ((0, rp - rows), (0, wp - w)), constant_values=-1)
    else:  # unused operand; the kernel computes the columns (w, not wp, per segment)
        cols = jnp.zeros((rp, wp), jnp.int32)
    kernel = functools.partial(_segment_topk_kernel, k=k, n_seg=n_seg, has_cols=has_cols)
    okey, ocol = pl.pallas_call(
        kernel,
        grid=(rp // r,),
        in_specs=[pl.BlockSpec((r, wp), lambda i: (i, 0)),
                  pl.BlockSpec((r, wp), lambda i: (i, 0))],
        out_specs=[pl.BlockSpec((r, kp), lambda i: (i, 0)),
                   pl.BlockSpec((r, kp), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((rp, kp), jnp.int32),
                   jax.ShapeDtypeStruct((rp, kp), jnp.int32)],
        compiler_params=_CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="dsa_segment_topk_triton",
    )(key, cols)
    return okey[:rows, :k], ocol[:rows, :k]


__all__ = ["MAX_COLUMNS", "index_keys_triton", "scores_block_q", "segment_topk_triton"]
