"""Per-row cut of a cumulative-mass selection, searched in registers (Pallas GPU, Triton lowering).

Reference: :func:`jaxprefill.sparse.select.cumulative_keep` (its ``_search`` over ``cond``).
The estimators keep, per row of block scores, the largest entries until their mass reaches
``goal``. The sort-free XLA version finds the cut bit by bit: 32 passes of one masked row sum,
each pass a kernel that reads the whole [rows, m] score matrix from HBM (XAttention at 128K
tokens: 32 heads x 1024 x 1024 floats, 134 MB, ~3 ms of the estimate on an H100). Here a
program loads a tile of rows once and runs the 32-step search on registers: one read.

Semantics. ``s`` float32 [rows, m], every entry >= 0 (masses; entries that may not be chosen
are 0), ``base`` and ``goal`` float32 [rows]. For non-negative floats the int32 bit pattern
orders like the value, so the cut is searched over the low 31 bits: per row the smallest int32
``u`` in [0, 2^31 - 1] with ``base + sum(s[key(s) > u]) < goal`` (key = the bits of s), and
2^31 - 1 where no u qualifies. ``select.sort_key`` maps non-negative x to ``bits(x) + 2^31``,
so the uint32 cut of the reference is ``u + 2^31``; the wrapper returns that.

Weights. With ``weight`` (float32 [rows, m] >= 0) entry j is ordered by s[j] but counts
weight[j]: the condition is ``base + sum(weight[key(s) > u]) < goal`` (FlexPrefill's chunk rows:
a prefix row of value v counted c times has key bits(v) and mass v * c). The weighted kernel
reads the second matrix beside s (a static flag: the unweighted kernel is the same program as
without it, its mass the entry itself).

Row sums run in a different order than XLA's, so a cut can differ where a partial sum lands
within rounding of ``goal`` (the reference's own caveat: "up to float summation order at the
boundary").
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._estimation_common import cut_key, mass_cut_rows
from pallas_kernels.gpu._triton_common import CompilerParams as _CompilerParams, pow2 as _pow2

# rows x columns per program: 32 floats per thread with 4 warps (weighted: 32 keys + 32 masses)
_TILE_ELEMS = 4096
MAX_COLUMNS = 16384  # wider rows would spill registers: mass_cut_wide_triton takes them


def _kernel(*refs, weighted: bool):
    if weighted:
        s_ref, w_ref, base_ref, goal_ref, cut_ref = refs
    else:
        s_ref, base_ref, goal_ref, cut_ref = refs
    s = s_ref[...]  # [R, m] float32, >= 0
    key = lax.bitcast_convert_type(s, jnp.int32)
    mass = w_ref[...] if weighted else s  # [R, m] float32, >= 0
    base, goal = base_ref[...], goal_ref[...]

    def bit_step(b, ans):
        bit = 30 - b
        low = (jnp.int32(1) << bit) - 1
        cand = ans | low  # the largest u with this bit 0 under the bits fixed so far
        above = jnp.sum(jnp.where(key > cand[:, None], mass, 0.0), axis=1)
        return jnp.where(base + above < goal, ans, ans | (jnp.int32(1) << bit))

    cut_ref[...] = lax.fori_loop(0, 31, bit_step, jnp.zeros(base.shape, jnp.int32))


@functools.partial(jax.jit, static_argnames=("num_warps", "interpret"))
def mass_cut_triton(s: jax.Array, base: jax.Array, goal: jax.Array,
                    weight: jax.Array | None = None, *, num_warps: int = 4,
                    interpret: bool = False) -> jax.Array:
    """uint32 [...]: per row of s [..., m] the cut of ``select.cumulative_keep`` (module doc).

    Args:
        s: float32 [..., m], entries >= 0 (the order); m <= MAX_COLUMNS.
        base, goal: float32 [...] (mass already taken, mass to reach).
        weight: float32 [..., m] >= 0, the mass of each entry; None: the entry itself.
        num_warps: Triton launch parameter.
        interpret: Pallas interpret mode (any backend).
    """
    lead, m = s.shape[:-1], s.shape[-1]
    mp = max(16, _pow2(m))
    r = max(1, min(_TILE_ELEMS // mp, _pow2(max(1, math.prod(lead)))))
    x, w, b, g, rows = mass_cut_rows(s, base, goal, MAX_COLUMNS, "mass_cut_triton", r, mp,
                                     weight)
    n_prog = x.shape[0] // r
    rows_spec = pl.BlockSpec((r, mp), lambda i: (i, 0))
    matrices = (x,) if w is None else (x, w)
    cut = pl.pallas_call(
        functools.partial(_kernel, weighted=w is not None),
        grid=(n_prog,),
        in_specs=[rows_spec] * len(matrices) + [pl.BlockSpec((r,), lambda i: (i,)),
                                                pl.BlockSpec((r,), lambda i: (i,))],
        out_specs=pl.BlockSpec((r,), lambda i: (i,)),
        out_shape=jax.ShapeDtypeStruct((n_prog * r,), jnp.int32),
        compiler_params=_CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="mass_cut_triton" if w is None else "mass_cut_triton_weighted",
    )(*matrices, b, g)
    return cut_key(cut, rows, lead)


__all__ = ["MAX_COLUMNS", "mass_cut_triton"]
