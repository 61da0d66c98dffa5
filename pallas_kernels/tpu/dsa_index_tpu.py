"""The DSA lightning indexer on TPUs (Pallas, Mosaic): fused scores and the per-row k-th key
search. Same semantics as the GPU kernels (:mod:`pallas_kernels.gpu.dsa_index_triton`).

``index_keys_tpu``: grid (B, query blocks, key tiles), key tiles innermost, so the query block
[Hi, BQ, D] stays in VMEM while the pipeline streams [BK, D] key tiles. Per tile the Hi heads
run as Hi MXU products [BQ, D] x [D, BK], each through ReLU and its weight column [BQ, 1] into
one float32 [BQ, BK] sum; tiles wholly past the block's causal limit skip the products and
write INVALID. Blocks: BQ a multiple of 8, BK of 128 (the wrapper pads).

``kth_key_tpu``: a tile of rows [R, m] in VMEM, the 32-step bit search of counts on it (one
compare / select / lane reduction per step), as ``mass_cut_tpu``.

Verified in TPU interpret mode and by lowering for a TPU (no TPU reachable).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._dsa_common import INVALID

_CompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
MAX_COLUMNS = 32768
_SIGN = -(2 ** 31)
_MAG = 2 ** 31 - 1


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _order_key(s):
    s = jnp.where(s == 0.0, 0.0, s)
    bits = lax.bitcast_convert_type(s, jnp.int32)
    return bits ^ ((bits >> 31) & _MAG)


def _scores_kernel(q_ref, w_ref, k_ref, ks_ref, qpos_ref, qseg_ref, kseg_ref, o_ref, *,
                   hi: int, bk: int, use_seg: bool, use_kscale: bool):
    j = pl.program_id(2)
    qpos = qpos_ref[...]  # [BQ, 1]
    start = j * bk

    @pl.when(start <= jnp.max(qpos))
    def _compute():
        kt = k_ref[...]  # [BK, D]

        def head(h, acc):
            s = lax.dot_general(q_ref[h], kt, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)  # [BQ, BK]
            return acc + jnp.maximum(s, 0.0) * w_ref[h]

        acc = lax.fori_loop(0, hi, head, jnp.zeros(o_ref.shape, jnp.float32))
        if use_kscale:
            acc = acc * ks_ref[...]
        col = start + lax.broadcasted_iota(jnp.int32, o_ref.shape, 1)
        ok = col <= qpos
        if use_seg:
            ok &= qseg_ref[...] == kseg_ref[...]
        o_ref[...] = jnp.where(ok, _order_key(acc), INVALID)

    @pl.when(start > jnp.max(qpos))
    def _invalid():
        o_ref[...] = jnp.full(o_ref.shape, INVALID, jnp.int32)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "interpret"))
def index_keys_tpu(q: jax.Array, w: jax.Array, k: jax.Array, q_pos: jax.Array,
                   seg_q: jax.Array | None = None, seg_k: jax.Array | None = None,
                   k_scale: jax.Array | None = None, *, block_q: int = 128, block_k: int = 512,
                   interpret: Any = False) -> jax.Array:
    """int32 order keys [B, R, T] of the index scores; arguments as ``index_keys_triton``.
    interpret: False on TPU; True or ``pltpu.InterpretParams`` elsewhere."""
    b, r, hi, d = q.shape
    t = k.shape[1]
    if block_q % 8 or block_k % 128:
        raise ValueError(f"block_q must be a multiple of 8 and block_k of 128, got "
                         f"{block_q}, {block_k}")
    bq = min(block_q, _round_up(r, 8))
    bk = min(block_k, _round_up(t, 128))
    rp, tp = _round_up(r, bq), _round_up(t, bk)
    q = jnp.pad(q, ((0, 0), (0, rp - r), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # [B, Hi, R, D]
    w = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, rp - r), (0, 0))).transpose(0, 2, 1)[..., None]
    k = jnp.pad(k.astype(q.dtype), ((0, 0), (0, tp - t), (0, 0)))
    q_pos = jnp.pad(q_pos.astype(jnp.int32), ((0, 0), (0, rp - r)), constant_values=-1)[..., None]
    use_seg, use_ks = seg_q is not None, k_scale is not None
    seg_q = (jnp.zeros((b, rp), jnp.int32) if seg_q is None else
             jnp.pad(seg_q.astype(jnp.int32), ((0, 0), (0, rp - r))))[..., None]
    seg_k = (jnp.zeros((b, tp), jnp.int32) if seg_k is None else
             jnp.pad(seg_k.astype(jnp.int32), ((0, 0), (0, tp - t)), constant_values=-1))[:, None]
    k_scale = (jnp.ones((b, tp), jnp.float32) if k_scale is None else
               jnp.pad(k_scale.astype(jnp.float32), ((0, 0), (0, tp - t))))[:, None]
    kernel = functools.partial(_scores_kernel, hi=hi, bk=bk, use_seg=use_seg, use_kscale=use_ks)
    out = pl.pallas_call(
        kernel,
        grid=(b, rp // bq, tp // bk),
        in_specs=[
            pl.BlockSpec((None, hi, bq, d), lambda bb, i, j: (bb, 0, i, 0)),
            pl.BlockSpec((None, hi, bq, 1), lambda bb, i, j: (bb, 0, i, 0)),
            pl.BlockSpec((None, bk, d), lambda bb, i, j: (bb, j, 0)),
            pl.BlockSpec((None, 1, bk), lambda bb, i, j: (bb, 0, j)),
            pl.BlockSpec((None, bq, 1), lambda bb, i, j: (bb, i, 0)),
            pl.BlockSpec((None, bq, 1), lambda bb, i, j: (bb, i, 0)),
            pl.BlockSpec((None, 1, bk), lambda bb, i, j: (bb, 0, j)),
        ],
        out_specs=pl.BlockSpec((None, bq, bk), lambda bb, i, j: (bb, i, j)),
        out_shape=jax.ShapeDtypeStruct((b, rp, tp), jnp.int32),
        compiler_params=_CompilerParams(dimension_semantics=("parallel", "parallel",
                                                             "arbitrary")),
        interpret=interpret,
        name="dsa_index_scores_tpu",
    )(q, w, k, k_scale, q_pos, seg_q, seg_k)
    return out[:, :r, :t]


def _kth_kernel(key_ref, tau_ref, *, k: int):
    key = key_ref[...]  # [R, m]

    def step(bit_index, ans):
        bit = lax.shift_left(jnp.int32(1), 31 - bit_index)
        cand = (ans | bit) ^ _SIGN  # [R, 1]
        count = jnp.sum((key >= cand).astype(jnp.int32), axis=1, keepdims=True)
        return jnp.where(count >= k, ans | bit, ans)

    ans = lax.fori_loop(0, 32, step, jnp.zeros(tau_ref.shape, jnp.int32))
    tau_ref[...] = ans ^ _SIGN


@functools.partial(jax.jit, static_argnames=("k", "block_rows", "interpret"))
def kth_key_tpu(key: jax.Array, k: int, *, block_rows: int = 8, interpret: Any = False
                ) -> jax.Array:
    """tau int32 [R] (as ``kth_key_triton``); m <= MAX_COLUMNS."""
    rows, m = key.shape
    if m > MAX_COLUMNS:
        raise ValueError(f"kth_key_tpu: rows of {m} entries exceed {MAX_COLUMNS}")
    if block_rows % 8:
        raise ValueError(f"block_rows must be a multiple of 8, got {block_rows}")
    r = min(block_rows, _round_up(rows, 8))
    rp, mp = _round_up(rows, r), _round_up(m, 128)
    key = jnp.pad(key, ((0, rp - rows), (0, mp - m)), constant_values=INVALID)
    tau = pl.pallas_call(
        functools.partial(_kth_kernel, k=k),
        grid=(rp // r,),
        in_specs=[pl.BlockSpec((r, mp), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((r, 1), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((rp, 1), jnp.int32),
        compiler_params=_CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
        name="dsa_kth_key_tpu",
    )(key)
    return tau[:rows, 0]


__all__ = ["MAX_COLUMNS", "index_keys_tpu", "kth_key_tpu"]
