"""Sparse MLA over gathered latent rows on TPUs (Pallas, Mosaic). Same semantics as
:func:`pallas_kernels.dsa_reference.sparse_mla_reference`.

Design: one grid step per query. The query's [H, Dc] and [H, Dr] blocks and its row list (SMEM
[1, K], and a [1, K] VMEM copy for the masks) stay in memory while the step walks its row
blocks of ``block_k``: one DMA per row from the flat latent in HBM into one of two
[block_k, Dc + Dr] VMEM buffers, each with its own DMA semaphore. The rows of block c + 1 are
in flight while block c's scores [H, block_k] and value product run on the MXU, with an
online softmax in float32 VMEM scratch (double buffering). A query's valid rows come first
(the indexer compacts them), so the walk stops after its last valid row: a row shorter than k
costs its own length, an empty one no DMA. Ids of -1 inside the last block are fetched as row
0 and masked. block_k: a multiple of 128.

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

from pallas_kernels.dsa_reference import check_sparse_inputs
from pallas_kernels.online_softmax import normalize_rows

_CompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")


def _kernel(rows_ref, ids_ref, ql_ref, qp_ref, kv_hbm, o_ref, lse_ref, buf, sem, m_sc, l_sc,
            acc_sc, *, bk: int, kp: int, dc: int, scale: float):
    def copy(row, slot, j):  # one latent row into row j of buffer `slot`
        return pltpu.make_async_copy(kv_hbm.at[pl.ds(row, 1)], buf.at[slot, pl.ds(j, 1)],
                                     sem.at[slot])

    def start(c, slot):  # the row DMAs of block c
        for j in range(bk):
            copy(jnp.maximum(rows_ref[0, c * bk + j], 0), slot, j).start()

    # valid rows come first: the blocks holding one are the first ceil(n_valid / bk)
    n_valid = lax.fori_loop(0, kp, lambda j, n: n + (rows_ref[0, j] >= 0).astype(jnp.int32),
                            jnp.int32(0))
    n_blocks = (n_valid + bk - 1) // bk
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(n_blocks > 0)
    def _first():
        start(0, 0)

    def step(c, carry):
        slot = lax.rem(c, 2)

        @pl.when(c + 1 < n_blocks)  # the next block's rows fly while this one computes
        def _prefetch():
            start(c + 1, 1 - slot)

        for j in range(bk):  # a wait needs only the destination's size and semaphore
            copy(0, slot, j).wait()
        kv = buf[slot]  # [bk, Dc + Dr]
        q = jnp.concatenate([ql_ref[...], qp_ref[...]], axis=-1).astype(kv.dtype)  # [H, Dc+Dr]
        s = lax.dot_general(q, kv, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale  # [H, bk]
        ids = ids_ref[:, pl.ds(pl.multiple_of(c * bk, bk), bk)]  # [1, bk]
        s = jnp.where(ids >= 0, s, -jnp.inf)
        m_prev = m_sc[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # finite: id 0 valid
        p = jnp.exp(s - m_next)
        alpha = jnp.exp(m_prev - m_next)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + lax.dot_general(
            p.astype(kv.dtype), kv[:, :dc], (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32)
        m_sc[...] = m_next
        return carry

    lax.fori_loop(0, n_blocks, step, 0)
    out, lse = normalize_rows(acc_sc[...], m_sc[...], l_sc[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_k", "interpret"))
def sparse_mla_tpu(q_latent: jax.Array, q_pe: jax.Array, kv: jax.Array, rows: jax.Array, *,
                   sm_scale: float, block_k: int = 128, interpret: Any = False
                   ) -> tuple[jax.Array, jax.Array]:
    """Pallas-TPU sparse MLA: (out f32 [B, S, H, Dc], lse f32 [B, S, H]).

    rows: int32 [B, S, K] into kv [N, Dc + Dr] (-1: none), a query's valid rows first.
    interpret: False on TPU; True or ``pltpu.InterpretParams`` elsewhere.
    """
    b, s, h, dc, dr, kk = check_sparse_inputs(q_latent, q_pe, kv, rows)
    if block_k % 128:
        raise ValueError(f"block_k must be a multiple of 128, got {block_k}")
    n = b * s
    kp = -(-kk // block_k) * block_k
    rows = jnp.pad(rows.reshape(n, kk).astype(jnp.int32), ((0, 0), (0, kp - kk)),
                   constant_values=-1)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=0,
        grid=(n,),
        in_specs=[
            pl.BlockSpec((None, 1, kp), lambda i: (i, 0, 0), memory_space=pltpu.SMEM),
            pl.BlockSpec((None, 1, kp), lambda i: (i, 0, 0)),
            pl.BlockSpec((None, h, dc), lambda i: (i, 0, 0)),
            pl.BlockSpec((None, h, dr), lambda i: (i, 0, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=[
            pl.BlockSpec((None, h, dc), lambda i: (i, 0, 0)),
            pl.BlockSpec((None, h, 1), lambda i: (i, 0, 0)),
        ],
        scratch_shapes=[pltpu.VMEM((2, block_k, dc + dr), kv.dtype),
                        pltpu.SemaphoreType.DMA((2,)),
                        pltpu.VMEM((h, 1), jnp.float32), pltpu.VMEM((h, 1), jnp.float32),
                        pltpu.VMEM((h, dc), jnp.float32)],
    )
    out, lse = pl.pallas_call(
        functools.partial(_kernel, bk=block_k, kp=kp, dc=dc, scale=sm_scale),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((n, h, dc), jnp.float32),
                   jax.ShapeDtypeStruct((n, h, 1), jnp.float32)],
        compiler_params=_CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
        name="sparse_mla_tpu",
    )(rows[:, None], rows[:, None], q_latent.reshape(n, h, dc), q_pe.reshape(n, h, dr), kv)
    return out.reshape(b, s, h, dc), lse[..., 0].reshape(b, s, h)


__all__ = ["sparse_mla_tpu"]
