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
- Online softmax in base 2 with float32 accumulators, one update per `block_n` tokens (a
  sub-tile of a page, or several pages whose scores share one max and one rescale of the
  accumulator); every tile is length-masked (only the last page of a sequence is partial, the
  mask is a few selects). Splits with no keys write out 0 and lse -inf.
- Large H (DeepSeek-V3's 128 heads) is compute-bound, not bandwidth-bound: per cached token
  2 * H * (Dc + Dr + Dc) FLOPs against (Dc + Dr) * 2 bytes, 242 FLOP/byte at H=128, so the
  heads are the MMA M dimension (64 per program, `default_block_h`) and the split count is
  chosen to fill whole waves of SMs (`default_num_splits`).
Constraints: Dc, Dr, block_h, page are powers of two >= 16 (else zero-padded: Dr=8 test dims
pad a copy of the cache, never the case for DeepSeek's 512/64/64).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gpu._triton_common import (
    CompilerParams as _CompilerParams, LOG2E as _LOG2E, pow2 as _pow2, f32_dot_precision,
)

from pallas_kernels.mla_reference import check_mla_inputs, combine_splits
from pallas_kernels.online_softmax import normalize_rows


def _kernel(ql_ref, qp_ref, cache_ref, pt_ref, meta_ref, o_ref, lse_ref, *, page: int, chunk: int,
            per_iter: int, iters_per_split: int, dc: int, dr: int, qk_scale: float,
            precision: Any):
    """One (head block, split, sequence) program. The KV sequence is walked in iterations of
    `per_iter` chunks of `chunk` tokens (chunk divides the page); one online-softmax update per
    iteration, so per_iter > 1 acts as a wider KV block (fewer accumulator rescales)."""
    split = pl.program_id(1)
    length = meta_ref[0]
    n_chunks = (length + chunk - 1) // chunk
    n_iters = (n_chunks + per_iter - 1) // per_iter
    first = split * iters_per_split
    last = jnp.minimum(first + iters_per_split, n_iters)
    q_lat = ql_ref[...]  # [bh, Dc]
    q_pe = qp_ref[...]  # [bh, Dr]
    bh = q_lat.shape[0]
    chunks_per_page = page // chunk

    def load(c):
        # Chunk c of the sequence: page c // chunks_per_page, rows at (c % cpp) * chunk. The last
        # iteration may run past the sequence's pages (per_iter > 1): the table slot there may
        # hold -1, so the page id is clamped to a valid page and its scores are masked.
        pid = jnp.maximum(pt_ref[c // chunks_per_page], 0)
        row0 = pl.multiple_of(pid * page + (c % chunks_per_page) * chunk, chunk)
        k_lat = cache_ref[pl.ds(row0, chunk), pl.ds(0, dc)]  # [chunk, Dc], also V
        k_pe = cache_ref[pl.ds(row0, chunk), pl.ds(dc, dr)]  # [chunk, Dr]
        s = lax.dot_general(q_lat, k_lat, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)
        s += lax.dot_general(q_pe, k_pe, (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)
        kpos = c * chunk + lax.broadcasted_iota(jnp.int32, (bh, chunk), 1)
        return jnp.where(kpos < length, s * qk_scale, -jnp.inf), k_lat

    def body(t, carry):
        acc, m_prev, l_prev = carry
        parts = [load(t * per_iter + j) for j in range(per_iter)]
        m_next = m_prev
        for s, _ in parts:
            m_next = jnp.maximum(m_next, jnp.max(s, axis=1))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        alpha = jnp.exp2(m_prev - m_safe)
        acc = acc * alpha[:, None]
        l_next = alpha * l_prev
        for s, v in parts:
            p = jnp.exp2(s - m_safe[:, None])
            l_next += jnp.sum(p, axis=1)
            acc += lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                   precision=precision, preferred_element_type=jnp.float32)
        return acc, m_next, l_next

    carry = (jnp.zeros((bh, dc), jnp.float32), jnp.full((bh,), -jnp.inf, jnp.float32),
             jnp.zeros((bh,), jnp.float32))
    out, lse = normalize_rows(*lax.fori_loop(first, last, body, carry), base2=True)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def default_block_h(h: int) -> int:
    """Query heads per program: small H takes all heads (padded to 16, the MMA minimum); large H
    takes 64, the M of one Hopper MMA tile: at H=128 on the H100 64 ran 1.66x faster than 32
    (benchmarks/results/2026-11-23/h100_bench_mla_decode_largeh_run2.log). 128 does not fit: Triton
    keeps the [128, 576] query block and the KV stages in shared memory (> 227 KB)."""
    if h <= 32:
        return min(max(16, _pow2(h)), 32) if h > 16 else 16
    return 64


def default_num_splits(batch: int, head_blocks: int, total_steps: int, num_sms: int = 132,
                       block_h: int = 16) -> int:
    """KV splits per sequence. Small head blocks (several programs per SM): enough programs for
    ~2 waves. Head blocks >= 64 (one program per SM: the [block_h, Dc] accumulator fills the
    register file): the split count whose last wave is fullest (>= 90% of an SM's worth of
    programs, at most 4 waves), since a program is long and a ragged last wave idles SMs."""
    programs = max(1, batch * head_blocks)
    cap = max(1, min(total_steps, 64))
    if block_h < 64:
        return int(min(-(-2 * num_sms // programs), cap))
    best, best_eff = 1, -1.0
    for s in range(1, cap + 1):
        n = programs * s
        waves = -(-n // num_sms)
        if waves > 4:
            break
        eff = n / (waves * num_sms)
        if n >= 0.9 * num_sms and eff > best_eff + 1e-9:
            best, best_eff = s, eff
    if best_eff < 0:  # too few programs for one wave even at the cap
        best = min(-(-num_sms // programs), cap)
    return int(best)


@functools.partial(jax.jit, static_argnames=("sm_scale", "num_splits", "block_h", "block_n",
                                             "interpret", "num_warps", "num_stages",
                                             "poison_output", "f32_dot"))
def mla_decode_triton(q_latent: jax.Array, q_pe: jax.Array, cache: jax.Array,
                      page_table: jax.Array, lengths: jax.Array, *, sm_scale: float,
                      num_splits: int | None = None, block_h: int | None = None,
                      block_n: int | None = None, interpret: Any = False,
                      num_warps: int | None = None, num_stages: int | None = None,
                      poison_output: bool = False, f32_dot: str = "tf32x3"
                      ) -> tuple[jax.Array, jax.Array]:
    """Pallas-Triton `mla_decode`: (out_latent f32 [B, H, Dc], lse f32 [B, H]).

    block_h: query heads per program, the MMA M dimension (default: see `default_block_h`; a
    [block_h, Dc] float32 accumulator lives in registers). block_n: KV tokens per online-softmax
    step, a power of two; < page walks a page in sub-tiles (smaller shared-memory stages), > page
    takes several pages per step (default: the page). num_splits: KV chunks per sequence
    (default: `default_num_splits`). poison_output: partial outputs start NaN, so unwritten ones
    show. f32_dot: how a float32 cache is multiplied: "tf32x3" (default, three TF32 tensor-core
    products, float32 accuracy), "ieee" (exact CUDA-core products) or "tf32"; ignored for 16-bit
    caches and in interpret mode (exact there).
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
        block_h = default_block_h(h)
    block_n = page if block_n is None else block_n
    if block_n != _pow2(block_n) or block_n < 16:
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    chunk, per_iter = min(block_n, page), max(1, block_n // page)
    h_pad = -(-h // block_h) * block_h
    dtype = cache.dtype
    q_latent = jnp.pad(q_latent.astype(dtype), ((0, 0), (0, h_pad - h), (0, 0)))
    q_pe = jnp.pad(q_pe.astype(dtype), ((0, 0), (0, h_pad - h), (0, 0)))
    n_hb = h_pad // block_h
    p_max = page_table.shape[1]
    total_iters = -(-p_max * page // block_n)
    if num_splits is None:
        num_splits = default_num_splits(b, n_hb, total_iters, block_h=block_h)
    ips = -(-total_iters // num_splits)
    # The last step of a sequence may read up to per_iter - 1 pages past its table row.
    p_pad = _pow2(max(p_max + per_iter, 16))
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
    kernel = functools.partial(_kernel, page=page, chunk=chunk, per_iter=per_iter,
                               iters_per_split=ips, dc=dc_p, dr=dr_p,
                               qk_scale=sm_scale * _LOG2E,
                               precision=f32_dot_precision(f32_dot, dtype, interpret))
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
