"""Per-row cut of a cumulative-mass selection, searched in VMEM (Pallas TPU, Mosaic).

Same semantics and reference as the GPU kernel (:mod:`pallas_kernels.gpu.mass_cut_triton`;
reference :func:`pallas_kernels.estimation.mass_cut_reference`): ``s`` float32 [rows, m] >= 0,
``base`` and ``goal`` float32 [rows]; per row the smallest int32 ``u`` (over the low 31 bits: the
bits of a non-negative float order like its value) with ``base + sum(s[bits(s) > u]) < goal``,
2^31 - 1 where none; returned as the uint32 key ``u + 2^31`` of ``select.sort_key``.
Unlike the GPU kernels it takes no ``weight`` (a mass per entry other than the entry itself):
the resolver sends weighted cuts to XLA on TPUs (``estimation._kernel_shapes``).

Design: grid over tiles of ``block_rows`` rows (``"parallel"``); a tile [block_rows, m_pad]
sits in VMEM and the 31-step bit search runs on it (one compare/select/lane-reduction per
step), so the scores are read from HBM once instead of once per bit as in the XLA search.
``base`` and ``goal`` travel as [rows, 1] columns so each block is a legal (8k, 1) tile; the
cut is written the same way. VMEM per step (double-buffered input, m_pad = 1024, 32 rows, f32):
2 x 128 KiB + the int32 bits and a select temporary (256 KiB) ~ 0.5 MiB.

Hardware notes: ``block_rows`` a multiple of 8 and m_pad a multiple of 128 (the wrapper pads);
verified in TPU interpret mode only (no TPU reachable).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._estimation_common import cut_key, mass_cut_rows

_CompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
MAX_COLUMNS = 32768  # wider rows: keep the XLA search (a tile of 8 rows would pass 1 MiB)


def _kernel(s_ref, base_ref, goal_ref, cut_ref):
    s = s_ref[...]  # [R, m] float32, >= 0
    key = lax.bitcast_convert_type(s, jnp.int32)
    base, goal = base_ref[...], goal_ref[...]  # [R, 1]

    def bit_step(b, ans):
        bit = 30 - b
        cand = ans | ((jnp.int32(1) << bit) - 1)  # the largest u with this bit 0
        above = jnp.sum(jnp.where(key > cand, s, 0.0), axis=1, keepdims=True)
        return jnp.where(base + above < goal, ans, ans | (jnp.int32(1) << bit))

    cut_ref[...] = lax.fori_loop(0, 31, bit_step, jnp.zeros(base.shape, jnp.int32))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@functools.partial(jax.jit, static_argnames=("block_rows", "interpret"))
def mass_cut_tpu(s: jax.Array, base: jax.Array, goal: jax.Array, *, block_rows: int = 32,
                 interpret: Any = False) -> jax.Array:
    """uint32 [...]: per row of s [..., m] the cut of ``select.cumulative_keep`` (module doc).

    Args:
        s: float32 [..., m], entries >= 0; m <= MAX_COLUMNS.
        base, goal: float32 [...] (mass already taken, mass to reach).
        block_rows: rows per grid step (a multiple of 8).
        interpret: False on TPU; True or ``pltpu.InterpretParams`` elsewhere.
    """
    if block_rows % 8:
        raise ValueError(f"block_rows must be a multiple of 8, got {block_rows}")
    lead, m = s.shape[:-1], s.shape[-1]
    r = min(block_rows, _round_up(max(1, math.prod(lead)), 8))
    x, _, b, g, rows = mass_cut_rows(s, base, goal, MAX_COLUMNS, "mass_cut_tpu", r,
                                     _round_up(m, 128))
    n_prog = x.shape[0] // r
    b, g = b[:, None], g[:, None]  # [rows, 1] columns: legal (8k, 1) blocks
    cut = pl.pallas_call(
        _kernel,
        grid=(n_prog,),
        in_specs=[pl.BlockSpec((r, x.shape[1]), lambda i: (i, 0)),
                  pl.BlockSpec((r, 1), lambda i: (i, 0)),
                  pl.BlockSpec((r, 1), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((r, 1), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((n_prog * r, 1), jnp.int32),
        compiler_params=_CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
        name="mass_cut_tpu",
    )(x, b, g)
    return cut_key(cut[:, 0], rows, lead)


__all__ = ["MAX_COLUMNS", "mass_cut_tpu"]
