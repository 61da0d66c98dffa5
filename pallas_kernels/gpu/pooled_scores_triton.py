"""Row-softmax of qx.kx^T pooled into r x r cells, in one pass (Pallas GPU, Triton lowering).

Replaces the chunked-XLA :func:`jaxprefill.sparse.estimators.block_softmax_scores` (the
reference: same arguments, same result) used by XAttention (sum pooling of antidiagonal
"reshaped" queries, Dx = stride * D, e.g. 1024 or 2048) and ProxyAttn (max pooling, Dx = D).

Semantics
---------
qx ``[B, Mq, Hq, Dx]`` holds ``Mq = nq * r`` query rows; row t has the global index
``row_start[b] + t``. kx ``[B, Mk, Hkv, Dx]`` holds ``Mk = n * r`` key rows; query head h reads
kv head ``h // (Hq // Hkv)``. Row i sees column j iff ``j <= i`` and both are
``< valid_rows[b]``. P = softmax over the visible columns of ``scale * qx_i . kx_j`` (0 elsewhere;
rows seeing nothing are all 0). The result ``[B, Hq, nq, n]`` float32 is P pooled over each
r x r cell: "sum" or "max".

Design: why one pass, and where the partials go
-----------------------------------------------
The normalizer of a row (its log-sum-exp) is only known after the row's last key tile, but the
cells must be pooled over columns while the tile is in registers. A flash-style two-pass kernel
(lse first, then recompute) would do the GEMM twice. Instead each program keeps an online
softmax (running max m and sum l, float32, base 2) and, for every key tile t:

- ``s = sum_d q[:, d-chunk] @ k[tile, d-chunk]^T`` (Dx is walked in ``block_d`` chunks: a
  [block_m, 2048] query tile does not fit in registers; when Dx fits one chunk the query tile is
  loaded once before the key loop), scaled and masked (causal, column and row validity);
- ``m_t = max(m, rowmax(s))``, ``p = exp2(s - m_t)``, ``l = l * exp2(m - m_t) + rowsum(p)``;
- p is pooled over the columns of each r-wide cell (reshape [block_m, block_n] ->
  [block_m, block_n // r, r] and reduce the last axis; the Triton lowering accepts the
  reshape, so no pooling matmul is needed for either "sum" or "max") and the per-row partial is
  stored to ``part[b, h, rows, cells of t]`` together with ``mt[b, h, rows, t] = m_t``.

At the end ``lse = m + log2(l)`` (base 2; -inf for rows that saw nothing) is stored per row.
The epilogue (plain jnp in the wrapper; XLA fuses it into one read of ``part``) rescales each
partial to the final normalizer, ``part * exp2(mt[tile of the cell] - lse)``, and pools over
each cell's r rows. The factor is positive, so max pooling commutes with it. Cells of tiles a
program never visited are never written (uninitialized memory on a GPU, NaN in interpret mode):
the epilogue selects them away by tile index (a row uses tile t iff ``t * block_n`` is a column
it sees), never by multiplication.

Grid ``(G, q tiles, B * Hkv)``, the first axis varying fastest: the G query heads of one KV
group run side by side, then the query tiles (latest, i.e. longest, first), so concurrently
running programs stream the same K rows through L2. Tiles that every row of a program sees in
full (below its first row's diagonal) run a loop without masks.

Cost model (whole prompt, Mq = Mk): FLOPs = one causal GEMM, ``B * Hq * Mq * Mk * Dx``
(2 per multiply-add, half the matrix; the diagonal tiles add ``block_m / Mk`` of that), plus one
exp2 per score of the visited tiles. Memory: qx and kx once from HBM (the query chunks are
re-read from L1/L2 per key tile when Dx > block_d, as in any tiled GEMM), one float32 write
and one read of ``part`` (``B * Hq * Mq * Mk / r * 4`` bytes allocated, the causal half
written) and of ``mt`` (``r / block_n`` of that).

Constraints: ``block_m``, ``block_n``, ``block_d`` powers of two >= 16 (Triton tensor sizes and
tl.dot minimums); r a power of two with ``r <= block_n``; ``row_start`` a multiple of r. Mq and
Mk are zero-padded to tile multiples and Dx to a multiple of the chunk (zeros change no dot
product; padded rows and columns are masked). Tiles are clamped to the problem size.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._estimation_common import check_pooled_inputs, is_pow2, per_row, pow2
from pallas_kernels.gpu._triton_common import (
    CompilerParams as _CompilerParams, LOG2E as _LOG2E, f32_dot_precision,
)


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _kernel(meta_ref, q_ref, k_ref, part_ref, mt_ref, lse_ref, *,
            n_qt: int, bm: int, bn: int, bd: int, n_d: int, r: int, n_tiles: int, pool: str,
            qk_scale: float, precision: Any):
    """One program: query tile i of head h. meta = (row_start, valid_rows, column limit, 0).

    q_ref [bm, Dxp]; k_ref [Mkp, Dxp] (the whole KV head); part_ref [bm, n_tiles * cpt];
    mt_ref [bm, n_tiles]; lse_ref [bm].
    """
    cpt = bn // r  # cells per key tile
    i = n_qt - 1 - pl.program_id(1)
    row_lim = meta_ref[1]
    col_lim = meta_ref[2]  # min(valid_rows, Mk): padded key rows are never visible
    first = meta_ref[0] + i * bm
    last = first + bm - 1
    rows = first + lax.broadcasted_iota(jnp.int32, (bm,), 0)

    # Tiles holding a column some row of the program sees; none when every row is invalid.
    n_visit = jnp.minimum(jnp.minimum(last, col_lim - 1) // bn + 1, n_tiles)
    n_visit = jnp.where(first < row_lim, jnp.maximum(n_visit, 0), 0)
    # Tiles every row sees in full (all rows valid, tile below the first row's diagonal).
    n_full = jnp.where(last < row_lim, jnp.minimum(first + 1, col_lim) // bn, 0)
    n_full = jnp.minimum(n_full, n_visit)

    def dot_t(a, b):  # a [bm, bd] . b [bn, bd]^T -> float32 [bm, bn]
        return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)

    q_whole = q_ref[...] if n_d == 1 else None  # Dx fits one chunk: load the tile once

    def scores(start):
        if n_d == 1:
            return dot_t(q_whole, k_ref[pl.ds(start, bn), :])

        def chunk(d, acc):
            off = pl.multiple_of(d * bd, bd)
            return acc + dot_t(q_ref[:, pl.ds(off, bd)], k_ref[pl.ds(start, bn), pl.ds(off, bd)])

        return lax.fori_loop(0, n_d, chunk, jnp.zeros((bm, bn), jnp.float32))

    def tile(t, carry, masked: bool):
        m_prev, l_prev = carry
        start = pl.multiple_of(t * bn, bn)
        s = scores(start) * qk_scale  # base-2 logits
        if masked:
            cols = start + lax.broadcasted_iota(jnp.int32, (bn,), 0)
            ok = jnp.logical_and(cols[None, :] <= rows[:, None], (cols < col_lim)[None, :])
            # Invalid rows: the epilogue drops them anyway; masking keeps their lse -inf.
            ok = jnp.logical_and(ok, (rows < row_lim)[:, None])
            s = jnp.where(ok, s, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        # A row that has seen nothing yet keeps m = -inf; subtract 0 instead (exp2(-inf) = 0).
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next) if masked else m_next
        p = jnp.exp2(s - m_safe[:, None])
        l_next = l_prev * jnp.exp2(m_prev - m_safe) + jnp.sum(p, axis=1)
        cells = p.reshape(bm, cpt, r)
        pooled = jnp.sum(cells, axis=2) if pool == "sum" else jnp.max(cells, axis=2)
        part_ref[:, pl.ds(pl.multiple_of(t * cpt, cpt), cpt)] = pooled
        mt_ref[:, pl.ds(t, 1)] = m_next[:, None]
        return m_next, l_next

    carry = (jnp.full((bm,), -jnp.inf, jnp.float32), jnp.zeros((bm,), jnp.float32))
    carry = lax.fori_loop(0, n_full, functools.partial(tile, masked=False), carry)
    m, l = lax.fori_loop(n_full, n_visit, functools.partial(tile, masked=True), carry)
    lse_ref[...] = jnp.where(l > 0, m + jnp.log2(jnp.where(l > 0, l, 1.0)), -jnp.inf)


# (block_m, block_n, block_d, num_warps, num_stages) per input dtype, from H100 sweeps.
DEFAULT_TILINGS = {
    # scripts/benchmarks/tune_pooled_scores_gpu.py, 2026-11-23: at 128K tokens XAttention's GEMM ran at
    # 515 (stride 16) and 486 (stride 8) TFLOP/s; the earlier 128 x 64 x 128 / 4 warps at 136.
    "16-bit": (64, 512, 64, 8, 3),
    # scripts/benchmarks/bench_f32_estimation.py --tilings, 2026-11-24: the 16-bit tiling needs 288 KiB of
    # shared memory in float32 (560 KiB with three-TF32 dots) and does not compile; this one ran
    # 16K x stride 8 in 3.07 ms (XLA's estimator: 2.45 ms with the whole score matrix in HBM).
    "float32": (64, 128, 64, 4, 3),
}


def _check(qx: jax.Array, kx: jax.Array, r: int, pool: str, blocks: dict[str, int]) -> None:
    for name, v in blocks.items():
        if not (is_pow2(v) and v >= 16):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    check_pooled_inputs(qx, kx, r, pool, blocks["block_n"])


@functools.partial(
    jax.jit,
    static_argnames=("r", "scale", "pool", "block_m", "block_n", "block_d", "num_warps",
                     "num_stages", "interpret", "f32_dot"))
def pooled_block_scores_triton(qx: jax.Array, kx: jax.Array, valid_rows: jax.Array,
                               row_start: jax.Array, *, r: int, scale: float,
                               pool: str = "sum", block_m: int | None = None,
                               block_n: int | None = None, block_d: int | None = None,
                               num_warps: int | None = None, num_stages: int | None = None,
                               interpret: bool = False, f32_dot: str = "tf32x3") -> jax.Array:
    """Pooled row-softmax scores, one pass over qx.kx^T (see the module docstring).

    Args:
        qx: ``[B, Mq, Hq, Dx]``, Mq = nq * r; row t is global row ``row_start[b] + t``.
        kx: ``[B, Mk, Hkv, Dx]``, Mk = n * r; Hq % Hkv == 0 (GQA).
        valid_rows: int32 ``[B]``: rows and columns >= valid_rows[b] are padding.
        row_start: int32 ``[B]`` (or a scalar), a multiple of r; 0 for a whole prompt.
        r: cell side (rows and columns per cell), a power of two <= block_n.
        scale: logit scale.
        pool: "sum" or "max" over each r x r cell.
        block_m, block_n, block_d: query rows, key columns and Dx chunk per step (powers of two
            >= 16; clamped to the padded problem size). Defaults (with ``num_warps``,
            ``num_stages``) from H100 sweeps, see ``DEFAULT_TILINGS``.
        num_warps, num_stages: Triton launch parameters.
        interpret: Pallas interpret mode (any backend).
        f32_dot: how float32 inputs are multiplied (see ``_triton_common.F32_DOTS``):
            ``"tf32x3"`` (default: three TF32 tensor-core products, float32 accuracy),
            ``"ieee"`` (CUDA-core exact products, far slower) or ``"tf32"``; ignored for
            16-bit inputs and in interpret mode (exact there).
    Returns:
        float32 ``[B, Hq, nq, n]``, equal to ``block_softmax_scores(qx, kx, geo, r, valid_rows,
        scale, pool)``.
    """
    dtype = jnp.promote_types(qx.dtype, kx.dtype)
    given = (block_m, block_n, block_d, num_warps, num_stages)
    default = DEFAULT_TILINGS["float32" if dtype == jnp.float32 else "16-bit"]
    block_m, block_n, block_d, num_warps, num_stages = (
        d if v is None else v for v, d in zip(given, default))
    if given[1] is None:  # a tile spans whole cells (float32's 128 columns < r = 256 cells)
        block_n = max(block_n, r)
    _check(qx, kx, r, pool, dict(block_m=block_m, block_n=block_n, block_d=block_d))
    b, mq, hq, dx = qx.shape
    mk, hkv = kx.shape[1], kx.shape[2]
    g, nq, n = hq // hkv, mq // r, mk // r
    bm = min(block_m, max(16, pow2(mq)))
    bn = min(block_n, max(16, pow2(mk)))  # still >= r: mk >= r and r <= block_n
    bd = min(block_d, max(16, pow2(dx)))
    n_qt, n_tiles, n_d = -(-mq // bm), -(-mk // bn), -(-dx // bd)
    cpt = bn // r

    qp = _pad_to(_pad_to(qx.astype(dtype), 1, n_qt * bm), 3, n_d * bd)
    kp = _pad_to(_pad_to(kx.astype(dtype), 1, n_tiles * bn), 3, n_d * bd)
    vr = per_row(valid_rows, b, "valid_rows")
    rs = per_row(row_start, b, "row_start")
    meta = jnp.stack([rs, vr, jnp.minimum(vr, mk), jnp.zeros_like(vr)], axis=-1)  # [B, 4]

    # Grid (g, s, bh): g fastest (the heads of one KV group share K), query tiles reversed.
    def head(g_, bh):
        return (bh % hkv) * g + g_

    def row_map(g_, s, bh):
        return (bh // hkv, head(g_, bh), n_qt - 1 - s, 0)

    dxp = n_d * bd
    in_specs = [
        pl.BlockSpec((None, 4), lambda g_, s, bh: (bh // hkv, 0)),
        pl.BlockSpec((None, bm, None, dxp), lambda g_, s, bh: (bh // hkv, n_qt - 1 - s,
                                                                head(g_, bh), 0)),
        pl.BlockSpec((None, n_tiles * bn, None, dxp), lambda g_, s, bh: (bh // hkv, 0,
                                                                          bh % hkv, 0)),
    ]
    out_specs = [
        pl.BlockSpec((None, None, bm, n_tiles * cpt), row_map),
        pl.BlockSpec((None, None, bm, n_tiles), row_map),
        pl.BlockSpec((None, None, bm), lambda g_, s, bh: (bh // hkv, head(g_, bh), n_qt - 1 - s)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((b, hq, n_qt * bm, n_tiles * cpt), jnp.float32),  # part
        jax.ShapeDtypeStruct((b, hq, n_qt * bm, n_tiles), jnp.float32),  # mt (base 2)
        jax.ShapeDtypeStruct((b, hq, n_qt * bm), jnp.float32),  # lse (base 2)
    ]
    kernel = functools.partial(
        _kernel, n_qt=n_qt, bm=bm, bn=bn, bd=bd, n_d=n_d, r=r, n_tiles=n_tiles, pool=pool,
        qk_scale=float(scale) * _LOG2E,
        precision=f32_dot_precision(f32_dot, dtype, interpret))
    part, mt, lse = pl.pallas_call(
        kernel,
        grid=(g, n_qt, b * hkv),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="pooled_block_scores_triton",
    )(meta, qp, kp)

    # Epilogue (fused by XLA): rescale each row's partials to its final normalizer, then pool
    # the r rows of each cell. Row i uses tile t iff it sees column t * bn; other cells may be
    # unwritten memory, so they are selected away, not multiplied by 0.
    part, mt, lse = part[:, :, :mq, :n], mt[:, :, :mq], lse[:, :, :mq]
    tile_of_cell = jnp.arange(n, dtype=jnp.int32) // cpt
    grow = rs[:, None] + jnp.arange(mq, dtype=jnp.int32)[None, :]  # [B, Mq] global rows
    last_col = jnp.minimum(grow, jnp.minimum(vr, mk)[:, None] - 1)
    used = jnp.logical_and((grow < vr[:, None])[:, :, None],
                           tile_of_cell[None, None, :] * bn <= last_col[:, :, None])
    factor = jnp.exp2(jnp.repeat(mt, cpt, axis=-1)[..., :n] - lse[..., None])
    rows = jnp.where(used[:, None], part * factor, 0.0).reshape(b, hq, nq, r, n)
    return rows.sum(axis=3) if pool == "sum" else rows.max(axis=3)


__all__ = ["pooled_block_scores_triton"]
