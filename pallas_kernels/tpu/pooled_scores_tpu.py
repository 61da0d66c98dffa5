"""Row-softmax of qx.kx^T pooled into r x r cells, in one pass (Pallas TPU, Mosaic).

Same arguments and result as the GPU kernel
:func:`pallas_kernels.gpu.pooled_scores_triton.pooled_block_scores_triton` and the XLA reference
:func:`jaxprefill.sparse.estimators.block_softmax_scores` (square cells, ``rk == r``,
``valid_cols == valid_rows``).

Semantics: those of the GPU kernel's module docstring (rows ``row_start[b] + t`` of qx
``[B, Mq, Hq, Dx]`` against kx ``[B, Mk, Hkv, Dx]``, causal at row granularity, rows and columns
``>= valid_rows[b]`` invisible, row softmax pooled over r x r cells by "sum" or "max"), result
float32 ``[B, Hq, nq, n]``.

Design
------
qx and kx are transposed to head-major ``[B, H, M, Dx]`` so blocks are 2-D ``(rows, Dx)`` tiles.
Grid ``(B, Hq, q tiles, k tiles)``; the k-tile axis is last and sequential (``"arbitrary"``),
the others ``"parallel"``. Four int32 arrays go to SMEM by scalar prefetch: ``row_start``,
``valid_rows`` and, per (batch, q tile), the number of key tiles any of its rows sees
(``n_visit``) and of leading tiles every row sees whole (``n_full``, no mask needed). Steps
``t >= n_visit`` (past the causal diagonal or the valid rows) are skipped with ``pl.when``; the
index maps of K and of the outputs clamp t to ``n_visit - 1``, so those steps issue no DMA and
write nothing back.

Scores are computed key-major, ``s = k . q^T`` ``[block_n, block_m]``: keys on sublanes, query
rows on lanes. The online softmax state (running max m, sum l: float32 ``[1, block_m]``,
lane-dense) lives in VMEM scratch. Per visited tile: ``m_t = max(m, colmax(s))``,
``p = exp(s - m_t)``, ``l = l * exp(m - m_t) + colsum(p)``. Pooling the r columns of a cell is
then a reduction over r *sublanes*: ``p.reshape(block_n // r, r, block_m)`` splits the
second-minor axis in groups of r (a multiple of the 8-row f32 tile: no lane relayout) and
``sum``/``max`` over axis 1 is elementwise VPU work. No pooling matmul is needed (an indicator
matmul on the MXU would need ``Precision.HIGHEST`` to keep float32 sums exact). The tile's cell
partials go to ``part[b, h, t, cell, row]`` and ``mt[b, h, t, 0, row] = m_t``; at the last k
step ``lse = m + log(l)`` (-inf for rows that saw nothing) goes to ``lse[b, h, 0, row]``.

The epilogue (plain jnp, fused by XLA) rescales each partial to the row's final normalizer,
``part * exp(mt - lse)`` (positive, so it commutes with max pooling), pools each cell's r rows
and transposes to ``[B, Hq, nq, n]``. Cells of tiles a row never visited hold stale or
uninitialized data (NaN in interpret mode) and are selected away by tile index (row i uses
tile t iff it sees column ``t * block_n``), never multiplied by 0.

Sizes: Mq and Mk are zero-padded to tile multiples (padded rows and columns are masked); Dx is
not padded (blocks span the whole Dx axis). Tiles are clamped to the problem size. On hardware
``block_m`` should be a multiple of 128 (it is the lane axis of the outputs) unless one tile
covers Mq, ``block_n`` a multiple of 8 and of r, and r a multiple of 8 (sublane-aligned
reshape); interpret mode accepts any powers of two.

VMEM per grid step (:func:`vmem_bytes`: double-buffered blocks, f32 ``s``/``p``/temporaries
counted 3x, bf16 inputs, r = 16), for the defaults 128 x 512: 1.1 MiB at Dx = 128 (ProxyAttn),
5.8 MiB at Dx = 2048 (XAttention, stride 16): within the default scoped VMEM (16 MiB v5e).

Status: verified in TPU interpret mode only (no TPU was reachable). Mosaic acceptance of the
sublane-splitting reshape and of the 3-D reductions over axis 1 is expected but unconfirmed on
hardware; neither has been timed against the XLA estimator.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._estimation_common import check_pooled_inputs, is_pow2, per_row, pow2

_CompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")


def vmem_bytes(block_m: int = 128, block_n: int = 512, dx: int = 128, r: int = 16,
               itemsize: int = 2) -> int:
    """Approximate VMEM bytes of one grid step (module docstring)."""
    rows8 = lambda x: -(-x // 8) * 8  # second-minor dims pad to 8 sublanes
    blocks = 2 * itemsize * (block_m + block_n) * dx  # q and k tiles, double-buffered
    blocks += 2 * 4 * block_m * (rows8(block_n // r) + 2 * 8)  # part, mt, lse blocks
    scratch = 2 * 4 * 8 * block_m  # m and l
    return blocks + scratch + 3 * 4 * block_n * block_m


def _kernel(rs_ref, vr_ref, nvis_ref, nfull_ref, q_ref, k_ref, part_ref, mt_ref, lse_ref,
            m_sc, l_sc, *, n_qt: int, n_kt: int, bm: int, bn: int, r: int, mk: int, pool: str,
            scale: float, precision: Any):
    """One step: query tile i of head h against key tile t.

    q_ref [bm, Dx]; k_ref [bn, Dx]; part_ref [bn // r, bm]; mt_ref, lse_ref, m_sc, l_sc [1, bm].
    """
    b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    n_visit = nvis_ref[b * n_qt + i]
    n_full = nfull_ref[b * n_qt + i]

    @pl.when(t == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)

    def step(masked: bool):
        s = lax.dot_general(k_ref[...], q_ref[...], (((1,), (1,)), ((), ())),
                            precision=precision, preferred_element_type=jnp.float32)
        s = s * scale  # [bn, bm]: keys on sublanes, query rows on lanes
        if masked:
            vr = vr_ref[b]
            cols = t * bn + lax.broadcasted_iota(jnp.int32, (bn, bm), 0)
            rows = rs_ref[b] + i * bm + lax.broadcasted_iota(jnp.int32, (bn, bm), 1)
            ok = jnp.logical_and(cols <= rows, cols < jnp.minimum(vr, mk))
            s = jnp.where(jnp.logical_and(ok, rows < vr), s, -jnp.inf)
        m_prev = m_sc[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=0, keepdims=True))
        # A row that has seen nothing yet keeps m = -inf: subtract 0 instead (exp(-inf) = 0).
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next) if masked else m_next
        p = jnp.exp(s - m_safe)
        l_sc[...] = l_sc[...] * jnp.exp(m_prev - m_safe) + jnp.sum(p, axis=0, keepdims=True)
        m_sc[...] = m_next
        # Pool the r keys of each cell: split the sublane axis (r a multiple of 8 on hardware).
        cells = p.reshape(bn // r, r, bm)
        part_ref[...] = jnp.sum(cells, axis=1) if pool == "sum" else jnp.max(cells, axis=1)
        mt_ref[...] = m_next

    @pl.when(t < n_full)
    def _full():
        step(masked=False)

    @pl.when(jnp.logical_and(t >= n_full, t < n_visit))
    def _partial():
        step(masked=True)

    @pl.when(t == n_kt - 1)
    def _finish():
        l = l_sc[...]
        lse_ref[...] = jnp.where(l > 0, m_sc[...] + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)


def _check(qx: jax.Array, kx: jax.Array, r: int, pool: str, block_m: int, block_n: int) -> None:
    for name, v in (("block_m", block_m), ("block_n", block_n)):
        if not is_pow2(v):
            raise ValueError(f"{name} must be a power of two, got {v}")
    check_pooled_inputs(qx, kx, r, pool, block_n)


def _pad_rows(x: jax.Array, size: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, size - x.shape[1]), (0, 0), (0, 0)))


@functools.partial(jax.jit,
                   static_argnames=("r", "scale", "pool", "block_m", "block_n", "interpret"))
def pooled_block_scores_tpu(qx: jax.Array, kx: jax.Array, valid_rows: jax.Array,
                            row_start: jax.Array, *, r: int, scale: float, pool: str = "sum",
                            block_m: int = 128, block_n: int = 512,
                            interpret: Any = False) -> jax.Array:
    """Pooled row-softmax scores, one pass over qx.kx^T (see the module docstring).

    Args:
        qx: ``[B, Mq, Hq, Dx]``, Mq = nq * r; row t is global row ``row_start[b] + t``.
        kx: ``[B, Mk, Hkv, Dx]``, Mk = n * r; Hq % Hkv == 0 (GQA).
        valid_rows: int32 ``[B]`` (or a scalar): rows and columns >= valid_rows[b] are padding.
        row_start: int32 ``[B]`` (or a scalar), a multiple of r; 0 for a whole prompt.
        r: cell side (rows and columns per cell), a power of two <= block_n.
        scale: logit scale.
        pool: "sum" or "max" over each r x r cell.
        block_m, block_n: query rows and key rows per grid step (powers of two, clamped to the
            padded problem size; on hardware multiples of 128 and 8).
        interpret: ``False`` on TPU; ``True`` or ``pltpu.InterpretParams(...)`` elsewhere.
    Returns:
        float32 ``[B, Hq, nq, n]``, equal to ``block_softmax_scores(qx, kx, geo, r, valid_rows,
        scale, pool)``.
    """
    _check(qx, kx, r, pool, block_m, block_n)
    b, mq, hq, dx = qx.shape
    mk, hkv = kx.shape[1], kx.shape[2]
    g, nq, n = hq // hkv, mq // r, mk // r
    bm, bn = min(block_m, pow2(mq)), min(block_n, pow2(mk))  # bn >= r: mk >= r, r a pow2
    n_qt, n_kt, cpt = -(-mq // bm), -(-mk // bn), bn // r

    dtype = jnp.promote_types(qx.dtype, kx.dtype)
    qt = _pad_rows(qx.astype(dtype), n_qt * bm).transpose(0, 2, 1, 3)  # [B, Hq, Mqp, Dx]
    kt = _pad_rows(kx.astype(dtype), n_kt * bn).transpose(0, 2, 1, 3)  # [B, Hkv, Mkp, Dx]
    vr = per_row(valid_rows, b, "valid_rows")
    rs = per_row(row_start, b, "row_start")
    col_lim = jnp.minimum(vr, mk)  # padded key rows are never visible

    # Key tiles per (batch, q tile): visited by some row, and seen whole by every row.
    first = rs[:, None] + bm * jnp.arange(n_qt, dtype=jnp.int32)[None, :]  # [B, n_qt]
    last = first + bm - 1
    live = jnp.logical_and(first < vr[:, None], col_lim[:, None] > 0)
    n_visit = jnp.where(live, jnp.minimum(jnp.minimum(last, col_lim[:, None] - 1) // bn + 1,
                                          n_kt), 0)
    n_full = jnp.where(last < vr[:, None], jnp.minimum(first + 1, col_lim[:, None]) // bn, 0)
    n_full = jnp.minimum(n_full, n_visit)

    def k_tile(b_, i, t, nvis_ref):  # steps past the visited tiles repeat the last one
        return jnp.minimum(t, jnp.maximum(nvis_ref[b_ * n_qt + i] - 1, 0))

    def k_map(b_, h, i, t, rs_ref, vr_ref, nvis_ref, nfull_ref):
        return (b_, h // g, k_tile(b_, i, t, nvis_ref), 0)

    def out_map(b_, h, i, t, rs_ref, vr_ref, nvis_ref, nfull_ref):
        return (b_, h, k_tile(b_, i, t, nvis_ref), 0, i)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(b, hq, n_qt, n_kt),
        in_specs=[
            pl.BlockSpec((None, None, bm, dx), lambda b_, h, i, t, *_: (b_, h, i, 0)),
            pl.BlockSpec((None, None, bn, dx), k_map),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, cpt, bm), out_map),
            pl.BlockSpec((None, None, None, 1, bm), out_map),
            pl.BlockSpec((None, None, 1, bm), lambda b_, h, i, t, *_: (b_, h, 0, i)),
        ],
        scratch_shapes=[pltpu.VMEM((1, bm), jnp.float32), pltpu.VMEM((1, bm), jnp.float32)],
    )
    kernel = functools.partial(
        _kernel, n_qt=n_qt, n_kt=n_kt, bm=bm, bn=bn, r=r, mk=mk, pool=pool, scale=float(scale),
        precision=lax.Precision.HIGHEST if dtype == jnp.float32 else None)
    part, mt, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((b, hq, n_kt, cpt, n_qt * bm), jnp.float32),  # part
            jax.ShapeDtypeStruct((b, hq, n_kt, 1, n_qt * bm), jnp.float32),  # mt
            jax.ShapeDtypeStruct((b, hq, 1, n_qt * bm), jnp.float32),  # lse
        ],
        compiler_params=_CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="pooled_block_scores_tpu",
    )(rs, vr, n_visit.reshape(-1), n_full.reshape(-1), qt, kt)

    # Epilogue (fused by XLA), in the kernel's layout [B, Hq, tile, cell, row]: rescale each
    # partial to its row's normalizer, select away tiles the row never visited (stale or
    # uninitialized data: select, never multiply), pool the r rows of each cell.
    part, mt, lse = part[..., :mq], mt[..., :mq], lse[:, :, None, :, :mq]
    grow = rs[:, None] + jnp.arange(mq, dtype=jnp.int32)[None, :]  # [B, Mq] global rows
    last_col = jnp.minimum(grow, col_lim[:, None] - 1)
    tile0 = bn * jnp.arange(n_kt, dtype=jnp.int32)[None, :, None]  # first column of each tile
    used = jnp.logical_and((grow < vr[:, None])[:, None], tile0 <= last_col[:, None])
    vals = jnp.where(used[:, None, :, None], part * jnp.exp(mt - lse), 0.0)
    vals = vals.reshape(b, hq, n_kt, cpt, nq, r)
    pooled = vals.sum(axis=-1) if pool == "sum" else vals.max(axis=-1)  # [B, Hq, n_kt, cpt, nq]
    return pooled.transpose(0, 1, 4, 2, 3).reshape(b, hq, nq, n_kt * cpt)[..., :n]


__all__ = ["pooled_block_scores_tpu", "vmem_bytes"]
