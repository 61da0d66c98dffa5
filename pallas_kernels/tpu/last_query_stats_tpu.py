"""Vertical and slash sums of the last queries' attention for TPUs (Pallas, Mosaic).

Reference: :func:`pallas_kernels.estimation.last_query_sums_reference` (same semantics as the
GPU kernel :func:`pallas_kernels.gpu.last_query_stats_triton.last_query_sums_triton`).

Semantics: P = softmax(scale * Q_last K^T) of each row's last R queries (query r of a row of
length L sits at position L - R + r and sees keys j <= its position; rows shorter than R have
queries at negative positions, which see nothing and contribute 0). Outputs, float32 [B, Hq, S]:
``vert[j] = sum_r P[r, j]`` and ``slash[o] = sum_r P[r, pos_r - o]``; both are 0 past L.

Design
------
The G = Hq / Hkv query heads of a KV group and their R queries form the matmul M dimension: one
[G*R, D] query block against one [block_k, D] tile of k (transposed outside to [B, Hkv, S, D]),
so each K tile is read once per group and pass. The queries go in *reversed* (row i of a head
is the query at distance i from the last one, position L - 1 - i; ``dist`` [G*R, 1] holds i).

- Pass 1, grid (B, Hkv, key tiles), the key axis "arbitrary": online row max / sum of exp in
  VMEM scratch ``m, l`` [G*R, 1] float32 -> per-row log-sum-exp [B, Hkv, G*R, 1].
- Pass 2, same grid, all "parallel": p = exp(s - lse) (masked scores are -inf -> 0). Per head:
  the column sums of its [R, block_k] slice are the tile's vertical sums; for the slash the
  slice is zero-padded to width W = block_k + round_up(R - 1, 128) and strided-rolled
  (``pltpu.roll(x, 0, 1, stride=1, stride_axis=0)``: row i moves right by i), which puts every
  diagonal of the tile in one column: column u of tile t holds offset o = L - 1 - (t*block_k + u)
  (that is why the rows are reversed: the strided roll only takes non-negative strides, and
  Mosaic's apply_vector_layout takes the stride modulo the number of rows, so a stride of
  W - 1 would not act as -1 on hardware as it does in interpret mode).
  The column sums of the rolled slice, [G, W] per tile, go to HBM as partial diagonal vectors.
- XLA overlap-adds the partials (tile t covers global columns t*block_k .. t*block_k + W - 1)
  and reads offset o at column L - 1 - o.

Choice and cost of the slash: the rolled partials are B * Hq * n_tiles * W * 4 bytes, 1.25x a
float32 [B, Hq, S] at the defaults with R = 128 (the GPU kernel's skew buffer is R times that),
and the roll is one XLU pass over [R, W] per head and tile, next to the exp over [R, block_k]
(the VPU/EUP cost that dominates). Writing a full skewed [R, S + R - 1] buffer as on the GPU
would need per-row unaligned stores and R times the HBM traffic. Keys past every query of a row
are skipped (``pl.when``; the K index map clamps to the last needed tile, so no DMA either).
Every computed tile is masked (no mask-free fast path for tiles all queries see: one select
per score, small next to the exp).

Constraints: on hardware block_k should be a multiple of 128 and R a multiple of 8; the strided
roll needs TPU v5 or later (Mosaic limitation). Interpret mode accepts any sizes. block_k is
clamped to S rounded up to 128; S is padded to a multiple of block_k and D to a multiple of 128
(zeros; padded keys are masked).

VMEM per grid step (:func:`vmem_bytes`; pass 2, double-buffered blocks, bf16, D = 128, defaults
block_k = 512): G*R = 256 (G = 4, R = 64): 2.8 MiB; G*R = 512 (R = 128): 5.2 MiB; G*R = 1024
(G = 8, R = 128): 9.4 MiB, within the default scoped VMEM (16 MiB v5e, 32 MiB v6e). Pass 1
holds less (no slash temporaries, two [G*R, 1] scratch arrays).

Verified in TPU interpret mode only (no TPU was reachable): Mosaic lowering, the strided roll on
hardware and the performance are untested.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_CompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
_LANES = 128


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def vmem_bytes(rows: int, n_rows: int, block_k: int = 512, d: int = 128, itemsize: int = 2) -> int:
    """Approximate VMEM bytes of one pass-2 grid step ([rows, 1] arrays lane-padded to 128)."""
    width = block_k + _round_up(n_rows - 1, _LANES)
    group = rows // n_rows
    blocks = 2 * itemsize * (rows * d + block_k * d)  # q, k
    blocks += 2 * 2 * 4 * rows * _LANES  # dist, lse
    blocks += 2 * 4 * max(group, 8) * (block_k + width)  # vert, slash partials
    temps = 3 * 4 * rows * block_k + 2 * 4 * n_rows * width  # s / p, padded + rolled slice
    return blocks + temps


def _scores(q_ref, k_ref, dist_ref, length, t, *, bk: int, scale: float, precision):
    """Scaled scores [G*R, bk] of key tile t, -inf where the key is not visible."""
    s = lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32) * scale
    key = t * bk + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    pos = length - 1 - dist_ref[...]  # [G*R, 1] query positions
    return jnp.where(key <= pos, s, -jnp.inf)


def _stats_kernel(len_ref, q_ref, k_ref, dist_ref, lse_ref, m_sc, l_sc, *, n_tiles: int, **kw):
    b, t = pl.program_id(0), pl.program_id(2)
    length = len_ref[b]

    @pl.when(t == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)

    @pl.when(t * kw["bk"] < length)  # tiles past the last query are skipped
    def _step():
        s = _scores(q_ref, k_ref, dist_ref, length, t, **kw)
        m_prev = m_sc[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # rows that saw nothing yet
        l_sc[...] = (jnp.exp(m_prev - m_safe) * l_sc[...]
                     + jnp.sum(jnp.exp(s - m_safe), axis=1, keepdims=True))
        m_sc[...] = m_next

    @pl.when(t == n_tiles - 1)
    def _finish():
        l = l_sc[...]
        lse_ref[...] = jnp.where(l > 0, m_sc[...] + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)


def _sums_kernel(len_ref, q_ref, k_ref, dist_ref, lse_ref, vert_ref, *slash_ref, group: int,
                 n_rows: int, width: int, **kw):
    b, t, bk = pl.program_id(0), pl.program_id(2), kw["bk"]
    length = len_ref[b]
    active = t * bk < length

    @pl.when(active)
    def _tile():
        s = _scores(q_ref, k_ref, dist_ref, length, t, **kw)
        lse = lse_ref[...]
        p = jnp.exp(s - jnp.where(lse == -jnp.inf, 0.0, lse))  # [G*R, bk]; masked -> 0
        for g in range(group):
            pg = p[g * n_rows:(g + 1) * n_rows]  # [R, bk], head g
            vert_ref[g:g + 1, :] = jnp.sum(pg, axis=0, keepdims=True)
            if slash_ref:
                x = jnp.concatenate([pg, jnp.zeros((n_rows, width - bk), jnp.float32)], axis=1)
                x = pltpu.roll(x, 0, 1, stride=1, stride_axis=0)  # row i moves right by i
                slash_ref[0][g:g + 1, :] = jnp.sum(x, axis=0, keepdims=True)

    @pl.when(jnp.logical_not(active))
    def _zeros():
        for ref in (vert_ref, *slash_ref):
            ref[...] = jnp.zeros(ref.shape, jnp.float32)


def _check_inputs(q_last: jax.Array, k: jax.Array, lengths: jax.Array, block_k: int) -> None:
    if q_last.ndim != 4 or k.ndim != 4:
        raise ValueError(f"last_query_sums_tpu: expected q_last [B, Hq, R, D] and k "
                         f"[B, S, Hkv, D], got shapes {q_last.shape} and {k.shape}")
    (b, hq, _, d), (kb, _, hkv, kd) = q_last.shape, k.shape
    if kb != b or kd != d:
        raise ValueError(f"last_query_sums_tpu: shape mismatch: q_last {q_last.shape} and k "
                         f"{k.shape} must share B and D")
    if hq % hkv:
        raise ValueError(f"last_query_sums_tpu: Hq % Hkv != 0 (Hq={hq}, Hkv={hkv})")
    if lengths.shape != (b,):
        raise ValueError(f"last_query_sums_tpu: lengths shape {lengths.shape} != (B,) = ({b},)")
    if block_k < 1:
        raise ValueError(f"last_query_sums_tpu: block_k={block_k} must be positive")


@functools.partial(jax.jit, static_argnames=("scale", "slash", "block_k", "interpret"))
def last_query_sums_tpu(q_last: jax.Array, k: jax.Array, lengths: jax.Array, *, scale: float,
                        slash: bool = True, block_k: int = 512,
                        interpret: Any = False) -> tuple[jax.Array, jax.Array | None]:
    """Vertical and slash sums of the last R queries' causal softmax (Pallas TPU).

    Arguments and results as :func:`pallas_kernels.gpu.last_query_stats_triton.
    last_query_sums_triton` (q_last [B, Hq, R, D], k [B, S, Hkv, D], lengths [B] -> vert and
    slash float32 [B, Hq, S]), except: block_k is the keys per tile (a multiple of 128 on
    hardware; clamped to S rounded up to 128), and interpret is False on TPU, True or
    ``pltpu.InterpretParams(...)`` elsewhere.
    """
    _check_inputs(q_last, k, lengths, block_k)
    b, hq, n_rows, d = q_last.shape
    seq, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    rows = group * n_rows
    bk = min(block_k, _round_up(seq, _LANES))
    n_tiles = -(-seq // bk)
    s_pad, d_pad = n_tiles * bk, _round_up(d, _LANES)
    width = bk + _round_up(n_rows - 1, _LANES)
    dtype = jnp.result_type(q_last.dtype, k.dtype)

    # [B, Hkv, G*R, D], rows of each head reversed; k -> [B, Hkv, S_pad, D_pad]
    q = jnp.pad(q_last[:, :, ::-1].astype(dtype), ((0, 0), (0, 0), (0, 0), (0, d_pad - d)))
    q = q.reshape(b, hkv, rows, d_pad)
    kt = jnp.pad(jnp.swapaxes(k.astype(dtype), 1, 2),
                 ((0, 0), (0, 0), (0, s_pad - seq), (0, d_pad - d)))
    dist = jnp.tile(jnp.arange(n_rows, dtype=jnp.int32), group).reshape(rows, 1)
    lengths = lengths.astype(jnp.int32)
    kw = dict(bk=bk, scale=scale,
              precision=lax.Precision.HIGHEST if dtype == jnp.float32 else None)

    def k_map(bb, h, t, len_ref):  # clamp to the last tile a query sees: no DMA past it
        return (bb, h, jnp.minimum(t, jnp.maximum(len_ref[bb] - 1, 0) // bk), 0)

    in_specs = [
        pl.BlockSpec((None, None, rows, d_pad), lambda bb, h, t, _: (bb, h, 0, 0)),
        pl.BlockSpec((None, None, bk, d_pad), k_map),
        pl.BlockSpec((rows, 1), lambda bb, h, t, _: (0, 0)),
    ]
    lse_spec = pl.BlockSpec((None, None, rows, 1), lambda bb, h, t, _: (bb, h, 0, 0))
    grid = (b, hkv, n_tiles)
    lse = pl.pallas_call(
        functools.partial(_stats_kernel, n_tiles=n_tiles, **kw),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=lse_spec,
            scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32)] * 2),
        out_shape=jax.ShapeDtypeStruct((b, hkv, rows, 1), jnp.float32),
        compiler_params=_CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="last_query_stats_tpu",
    )(lengths, q, kt, dist)

    out_specs = [pl.BlockSpec((None, None, group, bk), lambda bb, h, t, _: (bb, h, 0, t))]
    out_shape = [jax.ShapeDtypeStruct((b, hkv, group, s_pad), jnp.float32)]
    if slash:
        out_specs.append(pl.BlockSpec((None, None, None, group, width),
                                      lambda bb, h, t, _: (bb, h, t, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, hkv, n_tiles, group, width), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_sums_kernel, group=group, n_rows=n_rows, width=width, **kw),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid, in_specs=in_specs + [lse_spec],
            out_specs=out_specs),
        out_shape=out_shape,
        compiler_params=_CompilerParams(dimension_semantics=("parallel",) * 3),
        interpret=interpret, name="last_query_sums_tpu",
    )(lengths, q, kt, dist, lse)
    vert = outs[0].reshape(b, hq, s_pad)[:, :, :seq]
    if not slash:
        return vert, None
    part = jnp.swapaxes(outs[1], 2, 3).reshape(b, hq, n_tiles, width)
    return vert, _slash_from_partials(part, lengths, seq, bk)


def _slash_from_partials(part: jax.Array, lengths: jax.Array, seq: int, bk: int) -> jax.Array:
    """Partial diagonal vectors [B, H, n_tiles, W] -> slash float32 [B, H, seq].

    Tile t's column u is global column c = t*bk + u, which holds offset o = L - 1 - c.
    """
    b, h, n_tiles, width = part.shape
    m = -(-width // bk)
    part = jnp.pad(part, ((0, 0), (0, 0), (0, 0), (0, m * bk - width)))
    part = part.reshape(b, h, n_tiles, m, bk)
    total = (n_tiles + m - 1) * bk
    col = sum(jnp.pad(part[:, :, :, i].reshape(b, h, n_tiles * bk),
                      ((0, 0), (0, 0), (i * bk, (m - 1 - i) * bk))) for i in range(m))
    # slash[o] = col[L - 1 - o] for o < L: reverse, pad with zeros, start at total - L
    rev = jnp.pad(col[..., ::-1], ((0, 0), (0, 0), (0, seq)))
    return jax.vmap(lambda x, c: lax.dynamic_slice_in_dim(x, c, seq, axis=-1))(
        rev, total - lengths)


__all__ = ["last_query_sums_tpu", "vmem_bytes"]
