"""Sparse MLA over gathered latent rows on NVIDIA GPUs (Pallas, Triton lowering): DSA's
attention of each query over its own top-k tokens, in the absorbed (MQA) form.

Reference: :func:`pallas_kernels.dsa_reference.sparse_mla_reference` (same arguments).

Design (``mla_decode_triton``'s, with gathers instead of pages):
- One program per (block of ``block_h`` heads, split, query): the query's [block_h, Dc + Dr]
  is the MMA's M side; its row list is walked ``block_k`` rows at a time, each step gathering
  [block_k, Dc] latent rows (also the values) and [block_k, Dr] rope keys from the flat
  [N, Dc + Dr] latent (pages flattened: row = page * page_size + slot), one read for all the
  block's heads.
- Online softmax in base 2 with float32 accumulators; slots holding -1 are masked. A query's
  valid rows come first (the indexer compacts them), so each program stops after its share of
  ``count`` rows: a row shorter than k costs only its own length.
- ``num_splits`` divides a query's rows among programs (flash-decoding) for decode, where a
  batch of B queries alone would not fill the GPU; the partial results are merged by
  ``mla_reference.combine_splits``.
Per selected token and head: 2 (Dc + Dr + Dc) FLOPs against (Dc + Dr) bytes of the row shared
by the block's heads: at 64 heads per program 2 * 64 * 1088 / 1152 = 121 FLOP/byte.
Constraints: Dc, Dr powers of two >= 16 (else a zero-padded copy: test dims only).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.dsa_reference import check_sparse_inputs
from pallas_kernels.gpu._triton_common import (CompilerParams as _CompilerParams,
                                                LOG2E as _LOG2E, f32_dot_precision,
                                                pow2 as _pow2)
from pallas_kernels.mla_reference import combine_splits
from pallas_kernels.online_softmax import normalize_rows


def _kernel(ql_ref, qp_ref, kv_ref, rows_ref, cnt_ref, o_ref, lse_ref, *, bk: int, dc: int,
            dr: int, steps_per_split: int, qk_scale: float, precision: Any):
    split = pl.program_id(1)
    count = cnt_ref[0]
    n_steps = (count + bk - 1) // bk
    first = split * steps_per_split
    last = jnp.minimum(first + steps_per_split, n_steps)
    q_lat, q_pe = ql_ref[...], qp_ref[...]
    bh = q_lat.shape[0]

    def body(t, carry):
        acc, m_prev, l_prev = carry
        idx = rows_ref[pl.ds(pl.multiple_of(t * bk, bk), bk)]  # [bk]
        ok = (idx >= 0) & (t * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0) < count)
        idx = jnp.where(ok, idx, 0)
        k_lat = kv_ref[idx, pl.ds(0, dc)]  # [bk, Dc] gathered, also V
        k_pe = kv_ref[idx, pl.ds(dc, dr)]  # [bk, Dr]
        s = lax.dot_general(q_lat, k_lat, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)
        s += lax.dot_general(q_pe, k_pe, (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)
        s = jnp.where(ok[None, :], s * qk_scale, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        alpha = jnp.exp2(m_prev - m_safe)
        p = jnp.exp2(s - m_safe[:, None])
        acc = acc * alpha[:, None] + lax.dot_general(
            p.astype(k_lat.dtype), k_lat, (((1,), (0,)), ((), ())), precision=precision,
            preferred_element_type=jnp.float32)
        return acc, m_next, alpha * l_prev + jnp.sum(p, axis=1)

    carry = (jnp.zeros((bh, dc), jnp.float32), jnp.full((bh,), -jnp.inf, jnp.float32),
             jnp.zeros((bh,), jnp.float32))
    out, lse = normalize_rows(*lax.fori_loop(first, last, body, carry), base2=True)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def default_block_h(h: int) -> int:
    """Heads per program: all of them up to 64 (>= 16, the MMA minimum); 64 at 128 heads (a
    [64, 512] float32 accumulator fills the register file, as in mla_decode_triton)."""
    return max(16, min(64, _pow2(h)))


@functools.partial(jax.jit, static_argnames=("sm_scale", "num_splits", "block_h", "block_k",
                                             "num_warps", "num_stages", "interpret",
                                             "poison_output", "f32_dot"))
def sparse_mla_triton(q_latent: jax.Array, q_pe: jax.Array, kv: jax.Array, rows: jax.Array, *,
                      sm_scale: float, num_splits: int = 1, block_h: int | None = None,
                      block_k: int = 64, num_warps: int | None = None,
                      num_stages: int | None = None, interpret: Any = False,
                      poison_output: bool = False, f32_dot: str = "tf32x3"
                      ) -> tuple[jax.Array, jax.Array]:
    """Pallas-Triton sparse MLA: (out f32 [B, S, H, Dc], lse f32 [B, S, H]).

    rows: int32 [B, S, K] indices into kv [N, Dc + Dr] (-1: none), a query's valid rows first.
    num_splits: programs per query over its rows (decode). block_h: heads per program.
    block_k: rows gathered per step (a power of two >= 16). poison_output: partial outputs
    start NaN, so unwritten ones show. f32_dot: as in mla_decode_triton.
    """
    b, s, h, dc, dr, kk = check_sparse_inputs(q_latent, q_pe, kv, rows)
    if block_k < 16 or block_k != _pow2(block_k):
        raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
    dc_p, dr_p = max(16, _pow2(dc)), max(16, _pow2(dr))
    if (dc_p, dr_p) != (dc, dr):  # test-size dims only: pad a copy of q and kv
        q_latent = jnp.pad(q_latent, ((0, 0),) * 3 + ((0, dc_p - dc),))
        q_pe = jnp.pad(q_pe, ((0, 0),) * 3 + ((0, dr_p - dr),))
        kv = jnp.concatenate([jnp.pad(kv[:, :dc], ((0, 0), (0, dc_p - dc))),
                              jnp.pad(kv[:, dc:], ((0, 0), (0, dr_p - dr)))], axis=-1)
    block_h = block_h or default_block_h(h)
    h_pad = -(-h // block_h) * block_h
    dtype = kv.dtype
    n = b * s
    q_latent = jnp.pad(q_latent.astype(dtype).reshape(n, h, dc_p), ((0, 0), (0, h_pad - h), (0, 0)))
    q_pe = jnp.pad(q_pe.astype(dtype).reshape(n, h, dr_p), ((0, 0), (0, h_pad - h), (0, 0)))
    k_pad = -(-kk // block_k) * block_k
    rows = jnp.pad(rows.reshape(n, kk).astype(jnp.int32), ((0, 0), (0, k_pad - kk)),
                   constant_values=-1)
    # the rows a program walks: up to the last valid slot (the indexer puts them first)
    slot = jnp.arange(k_pad, dtype=jnp.int32)
    count = jnp.max(jnp.where(rows >= 0, slot + 1, 0), axis=1)
    meta = jnp.stack([count] + [jnp.zeros_like(count)] * 3, axis=-1)
    n_hb = h_pad // block_h
    num_splits = max(1, min(num_splits, k_pad // block_k))
    sps = -(-(k_pad // block_k) // num_splits)
    in_specs = [
        pl.BlockSpec((None, block_h, dc_p), lambda hb, sp, i: (i, hb, 0)),
        pl.BlockSpec((None, block_h, dr_p), lambda hb, sp, i: (i, hb, 0)),
        pl.BlockSpec(kv.shape, lambda hb, sp, i: (0, 0)),
        pl.BlockSpec((None, k_pad), lambda hb, sp, i: (i, 0)),
        pl.BlockSpec((None, 4), lambda hb, sp, i: (i, 0)),
    ]
    o_spec = pl.BlockSpec((None, None, block_h, dc_p), lambda hb, sp, i: (i, sp, hb, 0))
    lse_spec = pl.BlockSpec((None, None, block_h), lambda hb, sp, i: (i, sp, hb))
    out_shape = [jax.ShapeDtypeStruct((n, num_splits, h_pad, dc_p), jnp.float32),
                 jax.ShapeDtypeStruct((n, num_splits, h_pad), jnp.float32)]
    args = [q_latent, q_pe, kv, rows, meta]
    kernel = functools.partial(_kernel, bk=block_k, dc=dc_p, dr=dr_p, steps_per_split=sps,
                               qk_scale=sm_scale * _LOG2E,
                               precision=f32_dot_precision(f32_dot, dtype, interpret))
    aliases = {}
    if poison_output:
        args += [jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape]
        in_specs += [o_spec, lse_spec]
        aliases = {5: 0, 6: 1}
        inner = kernel

        def kernel(*refs):  # skip the aliased poison inputs
            return inner(*refs[:5], *refs[7:])
    outs, lses = pl.pallas_call(
        kernel,
        grid=(n_hb, num_splits, n),
        in_specs=in_specs,
        out_specs=[o_spec, lse_spec],
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_CompilerParams(
            num_warps=num_warps or (8 if block_h >= 32 else 4),
            num_stages=num_stages or (2 if dtype.itemsize < 4 else 1)),
        interpret=interpret,
        name="sparse_mla_triton",
    )(*args)
    if num_splits == 1:  # prefill: no merge (and no second float32 copy of the output)
        out, lse = outs[:, 0], lses[:, 0]
    else:
        out, lse = combine_splits(outs, lses)
    return (out[:, :h, :dc].reshape(b, s, h, dc), lse[:, :h].reshape(b, s, h))


__all__ = ["default_block_h", "sparse_mla_triton"]
