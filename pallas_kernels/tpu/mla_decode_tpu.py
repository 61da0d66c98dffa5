"""Absorbed MLA decode over a paged latent cache for TPUs (Pallas, Mosaic).

Reference: :func:`pallas_kernels.mla_reference.mla_decode_reference` (same arguments).

Design: scalar prefetch of the flattened page table and the lengths (SMEM), grid
(B, num_splits, pages_per_split). The cache BlockSpec's index map reads the page id from the
page table, so the pipeline DMAs exactly the pages of the sequence, in table order, one
[page, Dc + Dr] tile per step; steps past the sequence's last page repeat the last page index
(the pipeline skips a DMA whose block index is unchanged) and are skipped with `pl.when`.
All H heads of a sequence share each tile (MQA view): scores [H, page] on the MXU, online
softmax in float32 VMEM scratch, partial outputs per split merged by `combine_splits`.
On hardware Dc should be a multiple of 128 (512 is) and H a multiple of 8; verified here in
TPU interpret mode only (no TPU reachable).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.mla_reference import check_mla_inputs, combine_splits
from pallas_kernels.online_softmax import normalize_rows

_CompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")


def _kernel(pt_ref, len_ref, ql_ref, qp_ref, kv_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
            page: int, pps: int, n_table: int, dc: int, scale: float):
    b, s, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = len_ref[b]
    t = s * pps + p  # page position within the sequence

    @pl.when(p == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(t * page < length)
    def _step():
        kv = kv_ref[...]  # [page, Dc + Dr]
        k_lat = kv[:, :dc]
        q = jnp.concatenate([ql_ref[...], qp_ref[...]], axis=-1).astype(kv.dtype)  # [H, Dc+Dr]
        sc = jax.lax.dot_general(q, kv, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * scale  # [H, page]
        kpos = t * page + jax.lax.broadcasted_iota(jnp.int32, sc.shape, 1)
        sc = jnp.where(kpos < length, sc, -jnp.inf)
        m_prev = m_sc[...]
        m_next = jnp.maximum(m_prev, jnp.max(sc, axis=1, keepdims=True))  # finite: key 0 valid
        pr = jnp.exp(sc - m_next)
        alpha = jnp.exp(m_prev - m_next)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(pr, axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + jax.lax.dot_general(
            pr.astype(kv.dtype), k_lat, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        m_sc[...] = m_next

    @pl.when(p == pps - 1)
    def _finish():
        out, lse = normalize_rows(acc_sc[...], m_sc[...], l_sc[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


@functools.partial(jax.jit, static_argnames=("sm_scale", "num_splits", "interpret"))
def mla_decode_tpu(q_latent: jax.Array, q_pe: jax.Array, cache: jax.Array, page_table: jax.Array,
                   lengths: jax.Array, *, sm_scale: float, num_splits: int | None = None,
                   interpret: Any = False) -> tuple[jax.Array, jax.Array]:
    """Pallas-TPU `mla_decode`: (out_latent f32 [B, H, Dc], lse f32 [B, H]).

    interpret: False on TPU; True or `pltpu.InterpretParams(...)` elsewhere.
    """
    b, h, dc, dr, page = check_mla_inputs(q_latent, q_pe, cache, page_table, lengths)
    p_max = page_table.shape[1]
    if num_splits is None:
        num_splits = 1 if b >= 8 else min(p_max, 4)
    pps = -(-p_max // num_splits)
    pt = page_table.astype(jnp.int32)
    lengths = lengths.astype(jnp.int32)

    def kv_map(bb, s, p, pt_ref, len_ref):
        # clamp to the sequence's last valid page: repeated indices skip the DMA
        n_pages = jnp.maximum((len_ref[bb] + page - 1) // page, 1)
        t = jnp.minimum(jnp.minimum(s * pps + p, n_pages - 1), p_max - 1)
        return (pt_ref[bb * p_max + t], 0, 0)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, num_splits, pps),
        in_specs=[
            pl.BlockSpec((None, h, dc), lambda bb, s, p, *_: (bb, 0, 0)),
            pl.BlockSpec((None, h, dr), lambda bb, s, p, *_: (bb, 0, 0)),
            pl.BlockSpec((None, page, dc + dr), kv_map),
        ],
        out_specs=[
            pl.BlockSpec((None, None, h, dc), lambda bb, s, p, *_: (bb, s, 0, 0)),
            pl.BlockSpec((None, None, h, 1), lambda bb, s, p, *_: (bb, s, 0, 0)),
        ],
        scratch_shapes=[pltpu.VMEM((h, 1), jnp.float32), pltpu.VMEM((h, 1), jnp.float32),
                        pltpu.VMEM((h, dc), jnp.float32)],
    )
    kernel = functools.partial(_kernel, page=page, pps=pps, n_table=p_max, dc=dc, scale=sm_scale)
    outs, lses = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, num_splits, h, dc), jnp.float32),
                   jax.ShapeDtypeStruct((b, num_splits, h, 1), jnp.float32)],
        compiler_params=_CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="mla_decode_tpu",
    )(pt.reshape(-1), lengths, q_latent, q_pe, cache)
    return combine_splits(outs, lses[..., 0])
