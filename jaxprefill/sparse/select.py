"""Sort-free selection primitives for the estimators: top-k, cumulative mass, list compaction.

The first GPU profile at 128K (H100, Llama-3-8B shapes) showed full sorts dominating the cheap
estimators: ``rank_desc`` (two stable argsorts per top-k), ``cumulative_keep`` (argsort + scatter
back over up to 32 x 1M entries), FlexPrefill's budget sorts, and the layout conversion
(a sort over every [n, n] block-mask row: 1.7 ms at block 128, 6.7 ms at block 64). Here:

* **threshold search**: a selection "keep the entries above a per-row cut" needs only the cut.
  Floats map to order-preserving uint32 keys; 8 passes of one fused masked reduction each find,
  4 bits at a time from the top (15 candidate cuts per pass), the smallest key U whose
  condition holds (count / mass of the entries with key > U). Memory-bound, no data movement;
  few dependent passes, since on small rows each pass costs a kernel launch more than its data.
* **exact ties**: entries tied *at* the cut are resolved in index order, as a stable sort would
  (rank among the tied entries = a prefix count), so the results equal the sort-based
  definitions exactly (up to float summation order at the boundary).
* **small top-k of long rows** (key columns: 64 of 32K keys) as two ``lax.top_k`` over short
  rows: the cells of ~sqrt(m / k) entries with the k largest maxima, then the top k of their
  entries (:func:`top_positions`), exact, instead of a search over the whole row.
* **prefix counts** as matrix products: a 0/1 row times an upper-triangular ones matrix (bf16
  operands, float32 accumulation: exact to 2^24) runs on tensor cores, where a scan runs log(n)
  elementwise passes.

Everything is jit-able with static shapes. ``Estimation(selection="sort")`` (a policy field)
switches the estimators back to the sort-based reference implementations
(:mod:`jaxprefill.sparse.estimators`), for A/B measurement.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import estimation
from jaxprefill.scatter import distinct_drops
from jaxprefill.sparse.estimation import Estimation

_CHUNK = 1024  # prefix counts: row chunk multiplied by a [chunk, chunk] triangle


def sort_key(x: jax.Array) -> jax.Array:
    """float32 [...] -> uint32 [...] with the same order (x < y <=> key(x) < key(y), no NaN)."""
    i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    i = jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)  # negative floats: reverse magnitudes
    return jax.lax.bitcast_convert_type(i, jnp.uint32) ^ jnp.uint32(0x80000000)


def prefix_count(x: jax.Array) -> jax.Array:
    """Inclusive prefix count of a bool [..., m] along the last axis -> int32 [..., m].

    Chunks of <= 1024 entries are multiplied by an upper-triangular ones matrix (tensor cores);
    chunk totals are then scanned (m / 1024 entries per row).
    """
    m = x.shape[-1]
    c = min(m, _CHUNK)
    a = -(-m // c)
    xf = jnp.pad(x.astype(jnp.bfloat16), [(0, 0)] * (x.ndim - 1) + [(0, a * c - m)])
    xf = xf.reshape(*x.shape[:-1], a, c)
    tri = jnp.triu(jnp.ones((c, c), jnp.bfloat16))  # tri[i, j] = 1 for i <= j
    inner = jnp.einsum("...ac,cd->...ad", xf, tri, preferred_element_type=jnp.float32)
    if a > 1:
        totals = inner[..., -1]
        inner = inner + (jnp.cumsum(totals, axis=-1) - totals)[..., None]
    return inner.reshape(*x.shape[:-1], a * c)[..., :m].astype(jnp.int32)


RADIX_BITS = 4  # bits of the cut fixed per search step: 8 steps of 15 candidates each
# fori_loop unroll of the search steps (1: a loop; True: straight-line steps). Read at trace
# time, like RADIX_BITS, so benchmarks can time both.
RADIX_UNROLL: int | bool = 1


def above(key: jax.Array, u: jax.Array) -> jax.Array:
    """bool [..., C, m]: key [..., m] strictly above each candidate cut u [..., C]."""
    return key[..., None, :] > u[..., :, None]


def _search(cond, shape, bits: int | None = None) -> jax.Array:
    """uint32 [shape]: per row the smallest U with cond(U) true (cond monotone false -> true
    in U; rows where it never holds get 0xFFFFFFFF).

    Radix search from the top: each of 32 / bits steps fixes one digit of U by testing the
    2^bits - 1 candidates "this digit, all lower bits set" at once (cond takes uint32
    candidates [*shape, C] and returns bool [*shape, C]; one fused reduction reads the data
    once for all C). The digit is the number of candidates where cond is still false. Same
    answer as a bit-by-bit binary search (bits=1) in 32 / bits dependent passes instead of
    32, which is what small arrays pay for (each pass is a kernel launch).
    """
    bits = RADIX_BITS if bits is None else bits  # read at trace time (benchmarks vary it)
    if 32 % bits:
        raise ValueError(f"radix search: bits must divide 32, got {bits}")
    digits = jnp.arange((1 << bits) - 1, dtype=jnp.uint32)

    def body(i, ans):
        shift = jnp.uint32(32 - bits) - i.astype(jnp.uint32) * jnp.uint32(bits)
        low = (jnp.uint32(1) << shift) - jnp.uint32(1)
        cand = ans[..., None] | (digits << shift) | low  # the largest U with each digit
        digit = jnp.sum(~cond(cand), axis=-1, dtype=jnp.uint32)
        return ans | (digit << shift)

    return jax.lax.fori_loop(0, 32 // bits, body, jnp.zeros(shape, jnp.uint32),
                             unroll=RADIX_UNROLL)


def topk_mask(scores: jax.Array, valid: jax.Array, count: jax.Array) -> jax.Array:
    """bool [..., m]: the ``count`` (int, broadcast to [...]) largest valid entries per row;
    ties in index order (equals ranking by a stable descending sort)."""
    key = sort_key(scores)
    count = jnp.broadcast_to(jnp.asarray(count, jnp.int32), scores.shape[:-1])

    def cond(u):  # fewer than `count` valid entries strictly above u
        n = jnp.sum(valid[..., None, :] & above(key, u), axis=-1, dtype=jnp.int32)
        return n < count[..., None]

    cut = _search(cond, scores.shape[:-1])[..., None]
    gt = valid & (key > cut)
    eq = valid & (key == cut)
    room = count - jnp.sum(gt, axis=-1, dtype=jnp.int32)
    return gt | (eq & (prefix_count(eq) <= room[..., None]))


def top_positions(scores: jax.Array, valid: jax.Array, count: int) -> jax.Array:
    """int32 [..., c], c = min(count, m): the positions of the c largest valid entries of each
    row of float scores [..., m] (finite; ties in index order, -0.0 == 0.0), ascending, -1
    after the last (rows with fewer valid entries). The set equals :func:`topk_mask`'s; for a
    small count over a long row.

    Two ``lax.top_k`` over short rows instead of one over m (a sort of the whole row on GPUs):
    the row is cut into cells of ``cell`` entries, the c cells with the largest maxima are kept
    (ties: lower cell), and the top c of their c x cell entries, gathered in position order, is
    the row's top c. Exact: an entry of a dropped cell is outranked by the c kept maxima (each
    larger, or equal and earlier), so it is not among the row's top c.
    """
    m = scores.shape[-1]
    c = max(1, min(count, m))
    x = scores.astype(jnp.float32)
    low = jnp.finfo(jnp.float32).min  # valid entries stay above the invalid ones' -inf
    key = jnp.where(valid, jnp.maximum(jnp.where(x == 0, 0.0, x), low), -jnp.inf)
    cell = 1 << max(0, int(round(math.log2(max(1.0, math.sqrt(m / c))))))  # ~ sqrt(m / c)
    n = -(-m // cell)
    if cell == 1 or n < c:
        pos = jax.lax.top_k(key, c)[1]
        taken = jnp.take_along_axis(key, pos, axis=-1)
    else:
        pad = [(0, 0)] * (key.ndim - 1) + [(0, n * cell - m)]
        cells = jnp.pad(key, pad, constant_values=-jnp.inf)
        cells = cells.reshape(*key.shape[:-1], n, cell)
        kept = jnp.sort(jax.lax.top_k(cells.max(axis=-1), c)[1], axis=-1)  # [..., c] cells
        cand = jnp.take_along_axis(cells, kept[..., None], axis=-2)  # [..., c, cell]
        taken, j = jax.lax.top_k(cand.reshape(*key.shape[:-1], c * cell), c)
        pos = jnp.take_along_axis(kept, j // cell, axis=-1) * cell + j % cell
    pos = jnp.where(taken > -jnp.inf, pos, m)  # invalid picks sort last
    pos = jnp.sort(pos, axis=-1)
    return jnp.where(pos < m, pos, -1).astype(jnp.int32)


def cumulative_keep(scores: jax.Array, valid: jax.Array, gamma: float,
                    forced: jax.Array | None = None, *, how: Estimation) -> jax.Array:
    """Threshold version of :func:`jaxprefill.sparse.estimators.cumulative_keep_sort` (same
    result): forced entries first, then descending scores (ties in index order) while the mass
    before an entry stays below gamma x the valid total."""
    if gamma >= 1.0:
        return valid
    s = jnp.where(valid, scores, 0.0).astype(jnp.float32)
    forced = (jnp.zeros_like(valid) if forced is None else (forced & valid))
    free = valid & ~forced
    base = jnp.sum(jnp.where(forced, s, 0.0), axis=-1)
    goal = gamma * jnp.sum(s, axis=-1)
    key = sort_key(s)
    cut = _mass_cut(jnp.where(free, s, 0.0), base, goal, how)[..., None]
    gt = free & (key > cut)
    eq = free & (key == cut)
    before = base + jnp.sum(jnp.where(gt, s, 0.0), axis=-1)
    rank = (prefix_count(eq) - 1).astype(jnp.float32)  # earlier tied entries (same value)
    keep_eq = eq & (before[..., None] + s * rank < goal[..., None])
    return forced | gt | keep_eq


def _mass_cut(s_free: jax.Array, base: jax.Array, goal: jax.Array,
              how: Estimation) -> jax.Array:
    """uint32 [...]: the smallest key U with base + (mass of s_free above U) < goal. On GPUs one
    pass of the Pallas kernel (:func:`pallas_kernels.estimation.mass_cut`; TPU kernel opt-in:
    ``Estimation(impl="mosaic_tpu")``), else the XLA radix search (32 / RADIX_BITS passes)."""
    impl = how.backend("mass_cut", columns=s_free.shape[-1], rows=math.prod(s_free.shape[:-1]))
    if impl != "xla":
        return estimation.mass_cut(s_free, base, goal, impl=impl, interpret=how.interpret)
    key = sort_key(s_free)

    def cond(u):  # forced mass + free mass strictly above u < goal (non-free entries are 0)
        mass = jnp.sum(jnp.where(above(key, u), s_free[..., None, :], 0.0), axis=-1)
        return base[..., None] + mass < goal[..., None]

    return _search(cond, s_free.shape[:-1])


def mass_count(x: jax.Array, valid: jax.Array, gamma: float, *, how: Estimation) -> jax.Array:
    """int32 [...]: how many of the largest positive valid entries of x [..., m] have an
    inclusive descending cumulative sum <= gamma (FlexPrefill's budget), without a sort.

    The cut (the smallest key U with mass(key > U) <= gamma) is a mass cut with base 0 and
    goal nextafter(gamma, +inf), since a float32 sum is <= gamma exactly when it is < the
    next float: on GPUs the estimation kernel (as :func:`_mass_cut`), else the XLA search."""
    if gamma >= 1.0:
        return valid.sum(-1)
    s = jnp.where(valid & (x > 0), x, 0.0).astype(jnp.float32)
    key = sort_key(s)
    impl = how.backend("mass_cut", columns=s.shape[-1], rows=math.prod(s.shape[:-1]))
    if impl != "xla":
        g = np.nextafter(np.float32(gamma), np.float32(np.inf))  # x <= gamma <=> x < g
        base = jnp.zeros(s.shape[:-1], jnp.float32)
        goal = jnp.full(s.shape[:-1], g, jnp.float32)
        cut = estimation.mass_cut(s, base, goal, impl=impl, interpret=how.interpret)[..., None]
    else:
        def cond(u):  # mass of the entries strictly above u <= gamma
            return jnp.sum(jnp.where(above(key, u), s[..., None, :], 0.0), axis=-1) <= gamma

        cut = _search(cond, s.shape[:-1])[..., None]
    gt = (key > cut) & (s > 0)
    mass_gt = jnp.sum(jnp.where(gt, s, 0.0), axis=-1)
    eq = (key == cut) & (s > 0)
    n_eq = jnp.sum(eq, axis=-1, dtype=jnp.int32)
    v = jnp.max(jnp.where(eq, s, 0.0), axis=-1)  # the tied value (0 when none)
    fit = jnp.where(v > 0, jnp.floor((gamma - mass_gt) / jnp.where(v > 0, v, 1.0)), 0.0)
    extra = jnp.clip(fit, 0, n_eq).astype(jnp.int32)
    return jnp.sum(gt, axis=-1, dtype=jnp.int32) + extra


def mask_to_lists(mask: jax.Array, cap: int) -> tuple[jax.Array, jax.Array]:
    """bool [..., n] -> (int32 [..., cap] ascending listed indices, int32 [...] counts).

    Same contract as ``pallas_kernels.layout.block_mask_to_layout_arrays`` (rows with more
    than ``cap`` entries keep the lowest; padding repeats the last valid index, 0 for an empty
    row), by prefix count + scatter instead of a sort over every row.
    """
    n = mask.shape[-1]
    lead = mask.shape[:-1]
    flat = mask.reshape(-1, n)
    pos = prefix_count(flat) - 1  # slot of each listed index
    cnt = jnp.minimum(pos[:, -1] + 1, cap)
    # overflow and unlisted entries go past the list, each to its own slot (dropped): every
    # (row, slot) pair is distinct, which lets the scatter skip collision handling
    slot = distinct_drops(jnp.where(flat & (pos < cap), pos, cap), cap)
    rows = jnp.arange(flat.shape[0])[:, None]
    lists = jnp.zeros((flat.shape[0], cap), jnp.int32).at[rows, slot].set(
        jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), flat.shape), mode="drop",
        unique_indices=True)
    last = jnp.take_along_axis(lists, jnp.maximum(cnt - 1, 0)[:, None], axis=1)
    t = jnp.arange(cap, dtype=jnp.int32)[None, :]
    lists = jnp.where(t < cnt[:, None], lists, jnp.where(cnt[:, None] > 0, last, 0))
    return lists.reshape(*lead, cap), cnt.reshape(lead).astype(jnp.int32)


__all__ = ["cumulative_keep", "mask_to_lists", "mass_count", "prefix_count",
           "sort_key", "top_positions", "topk_mask"]
