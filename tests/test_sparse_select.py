"""Sort-free selection primitives (jaxprefill.sparse.select) equal their sort-based references.

Fresh random inputs per case, including exact ties (rounded values, zeros, forced entries) and
rows with nothing valid; odd row lengths.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprefill.sparse import estimators as est
from pallas_kernels import estimation
from jaxprefill.sparse import select
from jaxprefill.sparse.estimation import Estimation
from jaxprefill.sparse.flexprefill import (keep_after_uniform_prefix, mass_count_sort,
                                           uniform_prefix, uniform_prefix_cut)
from pallas_kernels.layout import block_mask_to_layout_arrays


def scores(rng, shape, ties: bool):
    x = rng.random(shape).astype(np.float32)
    if ties:  # few distinct values, many exact zeros
        x = np.round(x * 4) / 4
    return x


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("m", [7, 300, 2500])
def test_topk_and_cumulative_keep_equal_sort(m, ties):
    rng = np.random.default_rng(m + ties)
    x = scores(rng, (3, 4, m), ties)
    x[0, 0] = -rng.random(m)  # negative scores rank too (top-k of logits)
    valid = rng.random((3, 4, m)) < 0.8
    valid[1, 2] = False  # an empty row
    count = rng.integers(0, m + 3, (3, 4))
    got = jax.jit(select.topk_mask)(x, valid, count)
    want = est.topk_mask_sort(jnp.asarray(x), jnp.asarray(valid), jnp.asarray(count))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    xp = np.abs(x)
    forced = rng.random((3, 4, m)) < 0.05
    for gamma in (0.3, 0.9, 0.97):
        for f in (None, forced):
            got = jax.jit(lambda *a: select.cumulative_keep(*a, how=Estimation("xla")),
                          static_argnums=2)(xp, valid, gamma, None if f is None else jnp.asarray(f))
            want = est.cumulative_keep_sort(jnp.asarray(xp), jnp.asarray(valid), gamma,
                                            None if f is None else jnp.asarray(f))
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want),
                                          err_msg=f"gamma={gamma} forced={f is not None}")
    # Not vacuous: the selections are neither empty nor everything.
    assert 0 < np.asarray(got).sum() < valid.sum()


@pytest.mark.parametrize("impl", ["xla", "triton"])  # triton: the mass-cut kernel, interpreted
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_mass_count_equals_sort(ties, impl):
    rng = np.random.default_rng(5 + ties)
    x = scores(rng, (2, 5, 999), ties)
    x = x / x.sum(-1, keepdims=True)  # a distribution, as FlexPrefill's vertical / slash
    valid = rng.random(x.shape) < 0.9
    how = Estimation(impl, interpret=impl != "xla")
    for gamma in (0.5, 0.95):
        got = jax.jit(lambda *a: select.mass_count(*a, how=how), static_argnums=2)(x, valid,
                                                                                  gamma)
        want = mass_count_sort(jnp.asarray(x), jnp.asarray(valid), gamma)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert np.asarray(got).min() > 0


@pytest.mark.parametrize("n, nr", [(37, 5), (41, 410)])  # kernels: register-resident, wide
def test_keep_after_uniform_prefix_kernel_equals_xla_and_sort(n, nr):
    """FlexPrefill's chunk rows (:func:`keep_after_uniform_prefix`): [uniform prefix; scores]
    with prefix entry i of value 1/(i+1) counted i+1 times. Its cut as one weighted mass cut
    (the Triton kernel, interpreted; 37 + 185 and 41 + 16810 columns) equals the XLA search's,
    ties between prefix values and scores included, and the kept scores equal the XLA path's
    and the sort's. Rows: windows after 5 rows, none, all but 3; one row with nothing valid."""
    seed = int(np.random.default_rng().integers(2**31))
    rng = np.random.default_rng(seed)
    b, h, m = 3, 4, n * nr
    row0 = jnp.asarray([5, 0, n - 3], jnp.int32)
    value, count = uniform_prefix(types.SimpleNamespace(n=n, row0=row0))  # [1, n], [B, n]
    # pooled-softmax-like scores, 40% exactly a prefix value (the same float32: ties)
    same = np.asarray(value)[0, rng.integers(0, n, (b, h, m))]
    x = np.where(rng.random((b, h, m)) < 0.4, same, 0.5 * rng.random((b, h, m)))
    x = np.where(rng.random(x.shape) < 0.2, 0.0, x).astype(np.float32)
    valid = rng.random(x.shape) < 0.9
    valid[1, 2] = False  # no prefix (row0 0), nothing valid: nothing kept
    x, valid = jnp.asarray(x), jnp.asarray(valid)
    kernel = Estimation("triton", interpret=True)
    gammas = (0.6, 0.9, 0.97)

    @jax.jit
    def cuts(x, valid):  # the cut as keep_after_uniform_prefix computes it, both ways
        s = jnp.where(valid, x, 0.0)
        pv = jnp.broadcast_to(value[:, None, :], (b, h, n))
        pcount = jnp.broadcast_to(count[:, None, :], (b, h, n))
        pmass = pv * pcount
        out = []
        for gamma in gammas:
            goal = gamma * (s.sum(-1) + pmass.sum(-1))
            out.append([uniform_prefix_cut(s, valid, pv, pcount, pmass, goal, how=how)
                        for how in (kernel, Estimation("xla"))])
        return out

    @jax.jit
    def keeps(x, valid):
        return [[keep_after_uniform_prefix(x, valid, gamma, value, count, how=how)
                 for how in (kernel, Estimation("xla"), Estimation(selection="sort"))]
                for gamma in gammas]

    pkey = np.asarray(select.sort_key(value))[0]  # [n]
    skey = np.asarray(select.sort_key(jnp.where(valid, x, -1.0)))  # invalid: below every cut
    tied = 0
    for gamma, (got, want), kept in zip(gammas, cuts(x, valid), keeps(x, valid)):
        msg = f"seed {seed} gamma {gamma}"
        got, want = np.asarray(got), np.asarray(want)
        np.testing.assert_array_equal(got, want, err_msg=msg)
        assert got[1, 2] == 0xFFFFFFFF, msg
        live = np.arange(n)[None, :] < np.asarray(row0)[:, None]  # [B, n]
        at_prefix = ((pkey == got[..., None]) & live[:, None]).any(-1)
        tied += int((at_prefix & (skey == got[..., None]).any(-1)).sum())
        k, xla, srt = (np.asarray(a) for a in kept)
        np.testing.assert_array_equal(k, xla, err_msg=msg)
        np.testing.assert_array_equal(k, srt, err_msg=msg)
        assert 0 < k.sum() < np.asarray(valid).sum() and not k[1, 2].any(), msg
    assert tied > 0, f"seed {seed}: no cut at a prefix value tied with a score"


@pytest.mark.parametrize("n,cap", [(9, 9), (300, 300), (300, 17), (1100, 1100)])
def test_mask_to_lists_equals_sort_conversion(n, cap):
    rng = np.random.default_rng(n + cap)
    mask = rng.random((2, 3, 5, n)) < rng.random((2, 3, 5, 1))
    mask[0, 0, 0] = False  # empty row: padding is 0
    got = jax.jit(select.mask_to_lists, static_argnums=1)(mask, cap)
    want = block_mask_to_layout_arrays(jnp.asarray(mask), cap)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))


def test_prefix_count_and_sort_key_order():
    rng = np.random.default_rng(0)
    x = rng.random((3, 2500)) < 0.5
    np.testing.assert_array_equal(np.asarray(select.prefix_count(jnp.asarray(x))),
                                  np.cumsum(x, axis=-1))
    v = np.concatenate([rng.standard_normal(500).astype(np.float32) * 1e3,
                        np.float32([0.0, -np.inf, np.inf, 1e-40, -1e-40])])
    k = np.asarray(select.sort_key(jnp.asarray(v)))
    np.testing.assert_array_equal(np.argsort(k, kind="stable"), np.argsort(v, kind="stable"))


@pytest.mark.parametrize("s,cap", [(300, 40), (2100, 1000), (64, 64)])
def test_minference_column_positions_equal_the_sort_reference(s, cap):
    from jaxprefill.sparse.columns import ascending_positions

    rng = np.random.default_rng(s + cap)
    sel = np.zeros((2, 3, s), bool)
    for row in np.ndindex(2, 3):
        sel[row][rng.choice(s, rng.integers(0, cap + 1), replace=False)] = True
    sel[0, 0] = False  # no column: all -1
    sel[1, 2] = False
    sel[1, 2, -cap:] = True  # full: the last positions
    fast = jax.jit(lambda m: ascending_positions(m, cap, Estimation()))(sel)
    ref = jax.jit(lambda m: ascending_positions(m, cap, Estimation(selection="sort")))(sel)
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(ref))
    want = np.full((2, 3, cap), -1)
    for row in np.ndindex(2, 3):
        p = np.flatnonzero(sel[row])
        want[row][:len(p)] = p
    np.testing.assert_array_equal(np.asarray(fast), want)


KERNELS = ("triton", "mosaic_tpu")


def kernel_top_positions(impl: str, count: int):
    """estimation.top_positions on a kernel in interpret mode, jitted whole: the TPU
    interpreter's callbacks must not meet eager dispatches (pallas_kernels.estimation)."""
    return jax.jit(lambda x, valid: estimation.top_positions(x, valid, count, impl=impl,
                                                             interpret=True))


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("m,count", [(2500, 16), (4099, 64), (300, 40), (37, 64), (64, 64)])
def test_top_positions_equal_the_sort_reference(m, count, ties):
    """Two top-k over cells (key columns) select what a stable sort of the whole row does:
    ties across cells and within a cell, negative scores, invalid entries, rows with fewer
    valid entries than count, an empty row, lengths that no cell size divides."""
    rng = np.random.default_rng(m + count + ties)
    x = scores(rng, (3, 4, m), ties)
    x[0, 0] = -rng.random(m)
    valid = rng.random((3, 4, m)) < 0.8
    valid[1, 2] = False  # an empty row: all -1
    valid[2, 1] = np.arange(m) < count // 2  # fewer valid entries than count
    if ties:  # a tie at the cut that spans many cells: lower positions must win
        x[2, 3] = 0.5
        x[0, 1, ::3] = -0.0  # ties with the row's +0.0 entries
    got = np.asarray(jax.jit(select.top_positions, static_argnums=2)(x, valid, count))
    # the kernels (interpret mode) and the stable-sort reference of pallas_kernels.estimation
    kernels = [estimation.top_positions_reference(x, valid, count)]
    if m >= 2500:  # rows within one register segment; longer rows: the next test
        kernels += [kernel_top_positions(impl, count)(x, valid) for impl in KERNELS]
    for other in kernels:
        np.testing.assert_array_equal(np.asarray(other), got)
    c = min(count, m)
    sel = est.topk_mask_sort(jnp.asarray(x), jnp.asarray(valid), jnp.asarray(c))
    want = np.full((3, 4, c), -1)
    for row in np.ndindex(3, 4):
        p = np.flatnonzero(np.asarray(sel[row]))
        want[row][:len(p)] = p
    np.testing.assert_array_equal(got, want)
    if ties:  # all tied: the first c valid positions
        first = np.flatnonzero(valid[2, 3])[:c]
        np.testing.assert_array_equal(got[2, 3, :len(first)], first)
    assert (got[1, 2] == -1).all() and (got[2, 1] >= 0).sum() == valid[2, 1].sum()


@pytest.mark.parametrize("m", [20011, 40000])
def test_top_positions_kernels_take_rows_longer_than_a_segment(m):
    """Rows of several register segments (8192 entries on Triton, 32768 on the TPU kernel) go
    through the tournament: each segment keeps its top c, and the top c of those is the row's.
    A tie at the cut spanning segments (lower positions win), +0.0 / -0.0 ties, invalid
    entries, a row with fewer valid entries than c, an empty row; the kernels in interpret
    mode against the stable-sort reference and the XLA path."""
    rng = np.random.default_rng(m)
    x = rng.random((2, 3, m)).astype(np.float32)
    valid = rng.random((2, 3, m)) < 0.9
    x[0, 0, ::97] = 2.0  # more entries at the top value than c, in every segment
    x[0, 1] = 0.0
    x[0, 1, 1::2] = -0.0
    valid[1, 0] = False
    valid[1, 1] = False
    valid[1, 1, -5:] = True  # 5 valid entries, the last ones
    want = np.asarray(estimation.top_positions_reference(x, valid, 64))
    np.testing.assert_array_equal(np.asarray(select.top_positions(x, valid, 64)), want)
    for impl in KERNELS:
        got = kernel_top_positions(impl, 64)(x, valid)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=impl)
    tops = np.arange(0, m, 97)
    np.testing.assert_array_equal(want[0, 0], tops[valid[0, 0, tops]][:64])
    np.testing.assert_array_equal(want[0, 1], np.flatnonzero(valid[0, 1])[:64])
    assert (want[1, 0] == -1).all()
    np.testing.assert_array_equal(want[1, 1, :5], np.arange(m - 5, m))
    assert (want[1, 1, 5:] == -1).all()


def test_top_positions_kernel_lowers_for_cuda(monkeypatch):
    """The key columns' shape at 32K on SmolLM2 ([1, 9, 32768], 64 columns) on a pretend GPU:
    segment top-k calls (the segments, then the tournament over their winners)."""
    from pallas_kernels import backends

    monkeypatch.setattr(backends, "platform", lambda: "gpu")
    sds = jax.ShapeDtypeStruct
    fn = jax.jit(lambda x, valid: estimation.top_positions(x, valid, 64, impl="triton"))
    text = fn.trace(sds((1, 9, 32768), jnp.float32), sds((1, 1, 32768), jnp.bool_)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("dsa_segment_topk_triton") >= 2


@pytest.mark.parametrize("bits", [1, 2, 8])
def test_radix_search_equals_binary_search(bits):
    """The cut search fixes RADIX_BITS bits per pass; any digit width gives the bit-by-bit
    answer: per row the smallest key with fewer than `count` entries above it (ties, rows
    where no key qualifies: 0xFFFFFFFF)."""
    rng = np.random.default_rng(bits)
    x = jnp.asarray(np.round(rng.standard_normal((4, 6, 50)), 1), jnp.float32)  # many ties
    key = select.sort_key(x)
    count = jnp.asarray(rng.integers(0, 52, (4, 6)), jnp.int32)  # 0: never holds
    count = count.at[0, 0].set(0)

    def cond(u):
        return jnp.sum(select.above(key, u), axis=-1) < count[..., None]

    want = select._search(cond, (4, 6), bits=1)
    got = select._search(cond, (4, 6), bits=bits)
    default = select._search(cond, (4, 6))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(default), np.asarray(want))
    # the answer is the smallest qualifying key: fewer than count above it, not above its
    # predecessor (or it is 0)
    never = np.asarray(count) == 0
    assert never.any() and (np.asarray(want)[never] == 0xFFFFFFFF).all()
    n_above = np.sum(np.asarray(key)[..., None, :] > np.asarray(want)[..., None, None], -1)[..., 0]
    assert (n_above < np.asarray(count))[~never].all()
    prev = np.asarray(want).astype(np.int64) - 1
    n_prev = np.sum(np.asarray(key)[..., :].astype(np.int64) > prev[..., None], -1)
    assert ((np.asarray(want) == 0) | (n_prev >= np.asarray(count))).all()
