"""Absorbed MLA decode over a paged latent cache for NVIDIA GPUs (Pallas, Triton lowering).

Reference: :func:`pallas_kernels.mla_reference.mla_decode_reference` (same arguments).

Design (flash-decoding, FlashMLA's data layout):
- One KV "head" of width Dc + Dr = 576 shared by all H query heads (MQA view), so a program
  takes a block of `block_h` query heads and streams pages of 64 tokens: per page one
  [64, Dc] latent tile (also the V tile) and one [64, Dr] rope tile, read once for all its heads.
- Grid (head blocks, num_splits, B): the pages of a sequence are divided into `num_splits`
  contiguous chunks (split-KV) so that small batches still fill the GPU; each program writes a
  normalized partial output [block_h, Dc] and its LSE, merged afterwards by
  :func:`pallas_kernels.mla_reference.combine_splits` (a small XLA reduction).
- The page table row of the sequence comes in through a BlockSpec (the Triton lowering has no
  scalar prefetch); the cache is one flat [pages * page, Dc + Dr] operand addressed with
  `pl.ds(page_id * page, page)`.
- Online softmax in base 2 with float32 accumulators; every page is length-masked (only the
  last page of a sequence is partial, the mask is a few selects). Splits with no keys write
  out 0 and lse -inf.
Constraints: Dc, Dr, block_h, page are powers of two >= 16 (else zero-padded: Dr=8 test dims
pad a copy of the cache, never the case for DeepSeek's 512/64/64).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.mla_reference import check_mla_inputs, combine_splits

_CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _kernel(ql_ref, qp_ref, cache_ref, pt_ref, meta_ref, o_ref, lse_ref, *, page: int,
            pages_per_split: int, dc: int, dr: int, qk_scale: float, precision: Any):
    split = pl.program_id(1)
    length = meta_ref[0]
    n_pages = (length + page - 1) // page
    first = split * pages_per_split
    last = jnp.minimum(first + pages_per_split, n_pages)
    q_lat = ql_ref[...]  # [bh, Dc]
    q_pe = qp_ref[...]  # [bh, Dr]
    bh = q_lat.shape[0]

    def body(t, carry):
        acc, m_prev, l_prev = carry
        row0 = pl.multiple_of(pt_ref[t] * page, page)
        k_lat = cache_ref[pl.ds(row0, page), pl.ds(0, dc)]  # [page, Dc], also V
        k_pe = cache_ref[pl.ds(row0, page), pl.ds(dc, dr)]  # [page, Dr]
        s = lax.dot_general(q_lat, k_lat, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)
        s += lax.dot_general(q_pe, k_pe, (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)
        s = s * qk_scale
        kpos = t * page + lax.broadcasted_iota(jnp.int32, (bh, page), 1)
        s = jnp.where(kpos < length, s, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        p = jnp.exp2(s - m_safe[:, None])
        alpha = jnp.exp2(m_prev - m_safe)
        l_next = alpha * l_prev + jnp.sum(p, axis=1)
        pv = lax.dot_general(p.astype(k_lat.dtype), k_lat, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
        return acc * alpha[:, None] + pv, m_next, l_next

    carry = (jnp.zeros((bh, dc), jnp.float32), jnp.full((bh,), -jnp.inf, jnp.float32),
             jnp.zeros((bh,), jnp.float32))
    acc, m, l = lax.fori_loop(first, last, body, carry)
    has = l > 0.0
    l_safe = jnp.where(has, l, 1.0)
    o_ref[...] = jnp.where(has[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has, (m + jnp.log2(l_safe)) * _LN2, -jnp.inf)


def default_num_splits(batch: int, head_blocks: int, max_pages: int, num_sms: int = 132) -> int:
    """Enough (sequence, head block, split) programs for ~2 waves of the GPU's SMs."""
    want = -(-2 * num_sms // max(1, batch * head_blocks))
    return int(max(1, min(want, max_pages, 64)))


@functools.partial(jax.jit, static_argnames=("sm_scale", "num_splits", "block_h", "interpret",
                                             "num_warps", "num_stages", "poison_output"))
def mla_decode_triton(q_latent: jax.Array, q_pe: jax.Array, cache: jax.Array,
                      page_table: jax.Array, lengths: jax.Array, *, sm_scale: float,
                      num_splits: int | None = None, block_h: int | None = None,
                      interpret: Any = False, num_warps: int | None = None,
                      num_stages: int | None = None, poison_output: bool = False
                      ) -> tuple[jax.Array, jax.Array]:
    """Pallas-Triton `mla_decode`: (out_latent f32 [B, H, Dc], lse f32 [B, H]).

    block_h: query heads per program (default min(pow2(H), 32); a [block_h, Dc] float32
    accumulator lives in registers). num_splits: KV chunks per sequence (default: fill ~2
    waves of 132 SMs). poison_output: partial outputs start NaN, so unwritten ones show.
    """
    b, h, dc, dr, page = check_mla_inputs(q_latent, q_pe, cache, page_table, lengths)
    dc_p, dr_p, page_p = max(16, _pow2(dc)), max(16, _pow2(dr)), _pow2(page)
    if page_p != page:
        raise ValueError(f"page size must be a power of two, got {page}")
    if (dc_p, dr_p) != (dc, dr):  # test-size dims only: pad a copy of q and the cache
        q_latent = jnp.pad(q_latent, ((0, 0), (0, 0), (0, dc_p - dc)))
        q_pe = jnp.pad(q_pe, ((0, 0), (0, 0), (0, dr_p - dr)))
        cache = jnp.concatenate([
            jnp.pad(cache[..., :dc], ((0, 0), (0, 0), (0, dc_p - dc))),
            jnp.pad(cache[..., dc:], ((0, 0), (0, 0), (0, dr_p - dr)))], axis=-1)
    if block_h is None:
        block_h = min(max(16, _pow2(h)), 32)
    h_pad = -(-h // block_h) * block_h
    dtype = cache.dtype
    q_latent = jnp.pad(q_latent.astype(dtype), ((0, 0), (0, h_pad - h), (0, 0)))
    q_pe = jnp.pad(q_pe.astype(dtype), ((0, 0), (0, h_pad - h), (0, 0)))
    n_hb = h_pad // block_h
    p_max = page_table.shape[1]
    if num_splits is None:
        num_splits = default_num_splits(b, n_hb, p_max)
    pps = -(-p_max // num_splits)
    p_pad = _pow2(max(p_max, 16))
    pt = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, p_pad - p_max)))
    meta = jnp.stack([lengths.astype(jnp.int32)] + [jnp.zeros((b,), jnp.int32)] * 3, axis=-1)
    flat = cache.reshape(-1, dc_p + dr_p)

    in_specs = [
        pl.BlockSpec((None, block_h, dc_p), lambda hb, s, bb: (bb, hb, 0)),
        pl.BlockSpec((None, block_h, dr_p), lambda hb, s, bb: (bb, hb, 0)),
        pl.BlockSpec(flat.shape, lambda hb, s, bb: (0, 0)),
        pl.BlockSpec((None, p_pad), lambda hb, s, bb: (bb, 0)),
        pl.BlockSpec((None, 4), lambda hb, s, bb: (bb, 0)),
    ]
    o_spec = pl.BlockSpec((None, None, block_h, dc_p), lambda hb, s, bb: (bb, s, hb, 0))
    lse_spec = pl.BlockSpec((None, None, block_h), lambda hb, s, bb: (bb, s, hb))
    out_shape = [jax.ShapeDtypeStruct((b, num_splits, h_pad, dc_p), jnp.float32),
                 jax.ShapeDtypeStruct((b, num_splits, h_pad), jnp.float32)]
    args = [q_latent, q_pe, flat, pt, meta]
    aliases = {}
    kernel = functools.partial(_kernel, page=page, pages_per_split=pps, dc=dc_p, dr=dr_p,
                               qk_scale=sm_scale * _LOG2E,
                               precision=lax.Precision.HIGHEST if dtype == jnp.float32 else None)
    if poison_output:
        args += [jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape]
        in_specs += [o_spec, lse_spec]
        aliases = {5: 0, 6: 1}
        inner = kernel

        def kernel(*refs):  # skip the aliased poison inputs
            return inner(*refs[:5], *refs[7:])
    if num_warps is None:
        num_warps = 8 if block_h >= 32 else 4
    if num_stages is None:
        num_stages = 2 if dtype.itemsize < 4 else 1
    outs, lses = pl.pallas_call(
        kernel,
        grid=(n_hb, num_splits, b),
        in_specs=in_specs,
        out_specs=[o_spec, lse_spec],
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="mla_decode_triton",
    )(*args)
    out, lse = combine_splits(outs, lses)
    return out[:, :h, :dc], lse[:, :h]
