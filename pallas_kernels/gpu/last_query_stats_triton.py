"""Vertical and slash sums of the last queries' attention (Pallas, Triton lowering).

Reference: :func:`pallas_kernels.estimation.last_query_sums_reference`.

The vertical-slash estimators (MInference, FlexPrefill, the ProxyAttn budgets and the PBS key
scores) start from P = softmax(scale * Q_last K^T, causal) of each row's last R queries and
reduce it two ways: ``vert[j] = sum_r P[r, j]`` (per key) and ``slash[o] = sum_r P[r, pos_r - o]``
(per diagonal offset). XLA materializes P as float32 [B, Hq, R, S] (2.1 GB at 128K tokens,
Hq = 32, R = 128) and reads it several times: 9.2 ms on an H100, 4% of a dense cuDNN prefill.
Here P never reaches HBM except in the skewed form the slash needs:

- Pass 1, grid (Hq, key tiles, B), heads fastest so a KV group's programs share the K tile in
  L2: each program scores its [R, block_k] tile and writes the tile's row max and row sum of
  exp (base 2) -> [B, Hq, n_tiles, R]; XLA combines them into the row log-sum-exp.
- Pass 2, same grid: recompute the tile, p = exp2(s - lse); the column sums of p are the
  tile's vertical sums (stored directly, every element written). For the slash, row r of the
  tile is stored shifted right by R - 1 - r into a skew buffer [B, Hq, R, S_pad + R - 1] (a
  scattered store with computed offsets): every column c of the buffer then holds one diagonal,
  offset o = L - 1 - c, and XLA sums its R rows (one read, masked to the written triangle).

Query r of a row of length L sits at position L - R + r (the row's last R queries, as in
:func:`jaxprefill.sparse.estimators.last_queries`); rows shorter than R have negative positions
for their first queries, which see no key and contribute 0. Keys at or past L are never visible
(they are after every query). Constraints (Triton block shapes): R and block_k powers of two
>= 16; the head dim is zero-padded to a power of two and S to a multiple of block_k.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gpu._triton_common import (
    CompilerParams as _CompilerParams, LOG2E as _LOG2E, pow2 as _pow2, f32_dot_precision,
)


def _tile_scores(q_ref, k_ref, len_ref, *, n_rows: int, bk: int, qk_scale: float, precision):
    """Base-2 scores of this program's [R, bk] tile, -inf where the key is not visible."""
    t = pl.program_id(1)
    length = len_ref[0]
    s = lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32) * qk_scale
    pos = length - n_rows + lax.broadcasted_iota(jnp.int32, (n_rows,), 0)  # query positions
    key = t * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
    return jnp.where(key[None, :] <= pos[:, None], s, -jnp.inf)


def _stats_kernel(q_ref, k_ref, len_ref, m_ref, l_ref, **kw):
    s = _tile_scores(q_ref, k_ref, len_ref, **kw)
    m = jnp.max(s, axis=1)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    m_ref[...] = m
    l_ref[...] = jnp.sum(jnp.exp2(s - m_safe[:, None]), axis=1)


def _sums_kernel(q_ref, k_ref, len_ref, lse_ref, vert_ref, *rest, slash: bool, width: int, **kw):
    s = _tile_scores(q_ref, k_ref, len_ref, **kw)
    lse = lse_ref[...]
    lse_safe = jnp.where(lse == -jnp.inf, 0.0, lse)  # rows that see nothing: s is -inf anyway
    p = jnp.exp2(s - lse_safe[:, None])
    vert_ref[...] = jnp.sum(p, axis=0)
    if slash:
        (skew_ref,) = rest
        n_rows, bk = kw["n_rows"], kw["bk"]
        r = lax.broadcasted_iota(jnp.int32, (n_rows, bk), 0)
        key = pl.program_id(1) * bk + lax.broadcasted_iota(jnp.int32, (n_rows, bk), 1)
        skew_ref[r * width + key + (n_rows - 1) - r] = p.astype(skew_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "slash", "slash_dtype", "block_k",
                                             "num_warps", "num_stages", "interpret",
                                             "f32_dot"))
def last_query_sums_triton(
    q_last: jax.Array,
    k: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    slash: bool = True,
    slash_dtype: jnp.dtype = jnp.float32,
    block_k: int = 128,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
    f32_dot: str = "tf32x3",
) -> tuple[jax.Array, jax.Array | None]:
    """Vertical and slash sums of the last R queries' causal softmax.

    Args:
        q_last: [B, Hq, R, D], the queries at positions lengths - R .. lengths - 1.
        k: [B, S, Hkv, D] keys; Hq % Hkv == 0 (query head h reads KV head h // (Hq // Hkv)).
        lengths: int32 [B], valid tokens per row (1..S).
        scale: softmax scale of the logits.
        slash: also compute the diagonal sums (else the second output is None).
        slash_dtype: dtype of the skew buffer (float32: exact sums; bfloat16 halves its bytes).
        interpret: run in Pallas interpret mode (any backend).
        f32_dot: how float32 inputs are multiplied (see ``_triton_common.F32_DOTS``):
            ``"tf32x3"`` (default: three TF32 tensor-core products, float32 accuracy),
            ``"ieee"`` (CUDA-core exact products, far slower) or ``"tf32"``; ignored for
            16-bit inputs and in interpret mode (exact there).

    Returns:
        (vert float32 [B, Hq, S], slash float32 [B, Hq, S] or None): vert[j] = sum_r P[r, j],
        slash[o] = sum_r P[r, pos_r - o] (offset o = query position - key position), with P the
        row softmax over keys j <= pos_r; 0 for keys/offsets no query reaches.
    """
    b, hq, n_rows, d = q_last.shape
    seq, hkv = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d or hq % hkv:
        raise ValueError(f"last_query_sums: q_last {q_last.shape} and k {k.shape} do not match "
                         "([B, Hq, R, D] and [B, S, Hkv, D] with Hq % Hkv == 0)")
    if n_rows < 16 or n_rows & (n_rows - 1) or block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"last_query_sums: R={n_rows} and block_k={block_k} must be powers of "
                         "two >= 16 (Triton tile shapes)")
    group = hq // hkv
    d_p = _pow2(d)
    n_tiles = -(-seq // block_k)
    s_pad = n_tiles * block_k
    if d_p != d:
        q_last = jnp.pad(q_last, ((0, 0), (0, 0), (0, 0), (0, d_p - d)))
    if d_p != d or s_pad != seq:
        k = jnp.pad(k, ((0, 0), (0, s_pad - seq), (0, 0), (0, d_p - d)))
    lens = lengths.astype(jnp.int32).reshape(b, 1)
    precision = f32_dot_precision(f32_dot, q_last.dtype, interpret)
    common = dict(n_rows=n_rows, bk=block_k, qk_scale=scale * _LOG2E, precision=precision)
    grid = (hq, n_tiles, b)  # heads fastest: the group's programs read one K tile from L2
    in_specs = [
        pl.BlockSpec((None, None, n_rows, d_p), lambda h, t, i: (i, h, 0, 0)),
        pl.BlockSpec((None, block_k, None, d_p), lambda h, t, i: (i, t, h // group, 0)),
        pl.BlockSpec((None, 1), lambda h, t, i: (i, 0)),
    ]
    params = _CompilerParams(num_warps=num_warps, num_stages=num_stages)

    tile_spec = pl.BlockSpec((None, None, None, n_rows), lambda h, t, i: (i, h, t, 0))
    m_t, l_t = pl.pallas_call(
        functools.partial(_stats_kernel, **common),
        grid=grid, in_specs=in_specs, out_specs=[tile_spec, tile_spec],
        out_shape=[jax.ShapeDtypeStruct((b, hq, n_tiles, n_rows), jnp.float32)] * 2,
        compiler_params=params, interpret=interpret, name="last_query_stats_triton",
    )(q_last, k, lens)
    m = jnp.max(m_t, axis=2)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    l_sum = jnp.sum(l_t * jnp.exp2(m_t - m_safe[:, :, None]), axis=2)
    lse = jnp.where(l_sum > 0, m_safe + jnp.log2(jnp.where(l_sum > 0, l_sum, 1.0)), -jnp.inf)

    width = s_pad + n_rows - 1
    out_specs = [pl.BlockSpec((None, None, block_k), lambda h, t, i: (i, h, t))]
    out_shape = [jax.ShapeDtypeStruct((b, hq, s_pad), jnp.float32)]
    if slash:  # the whole [R * width] skew row of (b, h): programs write disjoint entries
        out_specs.append(pl.BlockSpec((None, None, n_rows * width), lambda h, t, i: (i, h, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, hq, n_rows * width), slash_dtype))
    outs = pl.pallas_call(
        functools.partial(_sums_kernel, slash=slash, width=width, **common),
        grid=grid,
        in_specs=in_specs + [pl.BlockSpec((None, None, n_rows), lambda h, t, i: (i, h, 0))],
        out_specs=out_specs, out_shape=out_shape,
        compiler_params=params, interpret=interpret, name="last_query_sums_triton",
    )(q_last, k, lens, lse)
    vert = outs[0][:, :, :seq]
    if not slash:
        return vert, None
    return vert, slash_from_skew(outs[1].reshape(b, hq, n_rows, width), lengths, seq)


def slash_from_skew(skew: jax.Array, lengths: jax.Array, seq: int) -> jax.Array:
    """Skew buffer [B, H, R, S_pad + R - 1] -> slash sums float32 [B, H, seq] by offset.

    Row r holds key j at column j + R - 1 - r; entries outside 0 <= j < S_pad were never
    written (masked here). Column c collects offset o = L - 1 - c of a row of length L.
    """
    b, h, n_rows, width = skew.shape
    s_pad = width - n_rows + 1
    r = jnp.arange(n_rows)[:, None]
    j = jnp.arange(width)[None, :] - (n_rows - 1 - r)
    written = (j >= 0) & (j < s_pad)
    col = jnp.sum(jnp.where(written, skew.astype(jnp.float32), 0.0), axis=2)  # [B, H, width]
    # slash[o] = col[L - 1 - o] for o < L: reverse, then start at width - L (zeros past o = L-1)
    rev = jnp.pad(col[..., ::-1], ((0, 0), (0, 0), (0, seq)))
    start = width - lengths.astype(jnp.int32)
    return jax.vmap(lambda x, c: lax.dynamic_slice_in_dim(x, c, seq, axis=-1))(rev, start)


__all__ = ["last_query_sums_triton", "slash_from_skew"]
