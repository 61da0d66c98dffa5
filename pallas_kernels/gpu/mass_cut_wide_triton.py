"""Per-row cut of a cumulative-mass selection over wide rows, one program per row (Pallas GPU,
Triton lowering).

Same semantics and reference as :mod:`pallas_kernels.gpu.mass_cut_triton` (reference
:func:`pallas_kernels.estimation.mass_cut_reference`): ``s`` float32 [rows, m], every entry >= 0,
``base`` and ``goal`` float32 [rows]; per row the smallest int32 ``u`` in [0, 2^31 - 1] (the
bits of a non-negative float order like its value) with ``base + sum(s[bits(s) > u]) < goal``,
2^31 - 1 where none; returned as the uint32 key ``u + 2^31`` of ``select.sort_key``. With
``weight`` (float32 [rows, m] >= 0) entry j is ordered by s[j] but counts weight[j]:
``base + sum(weight[bits(s) > u]) < goal`` (a static flag: without it the kernel is the
single-input program).

Why a second kernel. The register-resident kernel holds a tile of whole rows in registers,
which stops at 16384 columns (``mass_cut_triton.MAX_COLUMNS``). FlexPrefill's budget rows at
32K tokens are 32768 keys long; on the XLA radix search they cost 8 dependent passes of
whole-matrix reductions (H100: 0.161 ms for the 18 rows, 0.096 here). A call takes as long as
its longest row, one program each: 9 rows of 65536 (FlexPrefill's query-aware rows at 32K)
took 0.132 ms against XLA's 0.103, so the resolver gives this kernel rows of at most 32768
entries (``pallas_kernels.estimation.WIDE_CUT_AUTO_COLUMNS``).
Here one program owns one row, which stays in global memory: the rows of one call are a few MB
(9 x 65536 floats: 2.4 MB), so after the first pass every re-read hits L2 (rows of <= 32768
floats, 128 KB, may stay in the SM's L1). Each search pass walks the row in tiles of ``tile``
entries (``pl.ds`` slices in a ``fori_loop``), accumulating the masses above each candidate in
[tile] vectors, reduced once per pass.

Digits. A pass fixes ``digit_bits`` bits of u by testing the 2^digit_bits - 1 candidates "this
digit, all lower bits set" at once (``jaxprefill.sparse.select._search``'s radix form); the
digit is the number of candidates whose condition is still false. The condition is monotone in
u and each candidate sums exactly the entries the bit-by-bit search sums at the same u, so the
cut equals the bitwise search's up to float summation order. The first digit takes the
31 mod digit_bits leftover bits. Default 2 bits: 16 passes (1 + 15 x 2 bits) of 3 candidates.
Why 2, from a rough model of one program on one H100 SM (the GPU benchmark
``scripts/benchmarks/bench_threshold_search_gpu.py`` times the widths; at 9 x 65536 and
32 x 2^20 3-bit digits and 4 warps ran faster, rows of 32768 are not swept yet): a pass reads
4 bytes per entry at ~64 B/clock from L2 (1/16 clock per entry) and spends ~3 instructions per
candidate (compare, select, add) at 128 lanes per clock (~1/43 clock per entry). Bitwise: 31
passes, memory-bound, ~1.9 clocks per entry; 2 bits: 16 passes at ~0.07, ~1.1; 3 bits: 11 x
~0.16, ~1.8; 4 bits: 8 x ~0.35, ~2.8 (and 15 accumulators spill registers).

Padding: the wrapper pads each row with zeros to a multiple of the tile (zero mass is never
above a cut). Rows may be any width up to ``MAX_COLUMNS``. Weighted rows read twice the bytes
per pass (s and weight tiles side by side), which the resolver's L2 bound counts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._estimation_common import cut_key, mass_cut_rows
from pallas_kernels.gpu._triton_common import CompilerParams as _CompilerParams, pow2 as _pow2

TILE = 4096  # entries per load: 16 per thread with 8 warps, 3 accumulators: ~80 registers
# (weighted: 16 more for the tile of masses)
DIGIT_BITS = 2  # bits of the cut per pass (module docstring)
# The widest row the backends send here: 1M entries (FlexPrefill's pooled matrix at 128K
# tokens, nq x n = 1024 x 1024). The row count is not bounded by this; past ~50 MB of rows per
# call (H100 L2) the re-reads come from HBM (the GPU benchmark times [32, 2^20] against XLA).
MAX_COLUMNS = 1 << 20


def _digits(digit_bits: int) -> tuple[int, int]:
    """(bits of the first digit, number of full digits after it) over the 31 searched bits."""
    return 31 % digit_bits, 31 // digit_bits


def _kernel(*refs, tile: int, n_tiles: int, digit_bits: int, weighted: bool):
    if weighted:
        s_ref, w_ref, base_ref, goal_ref, cut_ref = refs
    else:
        s_ref, base_ref, goal_ref, cut_ref = refs
    base, goal = base_ref[0], goal_ref[0]  # float32 scalars of this row

    def digit(ans, shift, n_cand):
        """ans with the digit at ``shift`` fixed: n_cand candidates, one pass over the row."""
        low = (jnp.int32(1) << shift) - 1
        cands = [ans | (jnp.int32(d) << shift) | low for d in range(n_cand)]  # ascending

        def tile_step(t, acc):
            start = pl.multiple_of(t * tile, tile)
            x = s_ref[pl.ds(start, tile)]  # [tile] float32 >= 0
            key = lax.bitcast_convert_type(x, jnp.int32)
            mass = w_ref[pl.ds(start, tile)] if weighted else x  # [tile] float32 >= 0
            return tuple(a + jnp.where(key > c, mass, 0.0) for a, c in zip(acc, cands))

        zeros = tuple(jnp.zeros((tile,), jnp.float32) for _ in cands)
        acc = lax.fori_loop(0, n_tiles, tile_step, zeros)
        # candidates where the condition is still false: a prefix, as the condition is monotone
        # in u, and so are these sums (same order for every candidate, zeros for the entries
        # not above it; rounding is monotone), so the digit is their count
        d = jnp.int32(0)
        for a in acc:
            d += jnp.where(base + jnp.sum(a) < goal, jnp.int32(0), jnp.int32(1))
        return ans | (d << shift)

    first, n_full = _digits(digit_bits)
    ans = jnp.int32(0)
    if first:  # the leftover top bits (bit 30 alone for 2-bit digits)
        ans = digit(ans, jnp.int32(31 - first), (1 << first) - 1)
    full = (1 << digit_bits) - 1
    ans = lax.fori_loop(
        0, n_full,
        lambda i, a: digit(a, jnp.int32(31 - first - digit_bits) - i * digit_bits, full), ans)
    cut_ref[0] = ans


@functools.partial(jax.jit, static_argnames=("tile", "digit_bits", "num_warps", "num_stages",
                                             "interpret"))
def mass_cut_wide_triton(s: jax.Array, base: jax.Array, goal: jax.Array,
                         weight: jax.Array | None = None, *, tile: int = TILE,
                         digit_bits: int = DIGIT_BITS, num_warps: int = 8,
                         num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """uint32 [...]: per row of s [..., m] the cut of ``select.cumulative_keep`` (module doc).

    Args:
        s: float32 [..., m], entries >= 0 (the order); m <= MAX_COLUMNS (any m: rows are
            padded).
        base, goal: float32 [...] (mass already taken, mass to reach).
        weight: float32 [..., m] >= 0, the mass of each entry; None: the entry itself.
        tile: entries per load, a power of two (rows narrower than it: the next power of two
            of m).
        digit_bits: bits of the cut fixed per pass, 1 to 4 (2^digit_bits - 1 accumulators).
        num_warps, num_stages: Triton launch parameters (2 stages: the tile loads are
            software-pipelined through shared memory).
        interpret: Pallas interpret mode (any backend).
    """
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"mass_cut_wide_triton: tile must be a power of two >= 16, got {tile}")
    if not 1 <= digit_bits <= 4:
        raise ValueError(f"mass_cut_wide_triton: digit_bits must be 1 to 4, got {digit_bits}")
    lead, m = s.shape[:-1], s.shape[-1]
    t = min(tile, max(16, _pow2(m)))
    n_tiles = -(-m // t)
    x, w, b, g, rows = mass_cut_rows(s, base, goal, MAX_COLUMNS, "mass_cut_wide_triton", 1,
                                     n_tiles * t, weight)
    if rows * n_tiles * t >= 2 ** 31:  # the Triton lowering computes element offsets in int32
        raise ValueError(f"mass_cut_wide_triton: {rows} rows of {n_tiles * t} entries exceed "
                         "int32 offsets")
    row_spec = pl.BlockSpec((None, n_tiles * t), lambda i: (i, 0))  # the whole row
    matrices = (x,) if w is None else (x, w)
    cut = pl.pallas_call(
        functools.partial(_kernel, tile=t, n_tiles=n_tiles, digit_bits=digit_bits,
                          weighted=w is not None),
        grid=(rows,),
        in_specs=[row_spec] * len(matrices) + [pl.BlockSpec((1,), lambda i: (i,)),
                                               pl.BlockSpec((1,), lambda i: (i,))],
        out_specs=pl.BlockSpec((1,), lambda i: (i,)),
        out_shape=jax.ShapeDtypeStruct((rows,), jnp.int32),
        compiler_params=_CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="mass_cut_wide_triton" if w is None else "mass_cut_wide_triton_weighted",
    )(*matrices, b, g)
    return cut_key(cut, rows, lead)


__all__ = ["DIGIT_BITS", "MAX_COLUMNS", "TILE", "mass_cut_wide_triton"]
