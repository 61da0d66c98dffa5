"""The cut searches (pallas_kernels/gpu/mass_cut_triton.py: register-resident rows;
pallas_kernels/gpu/mass_cut_wide_triton.py: wide rows, one program per row; the TPU kernel), in
interpret mode, against the XLA bit search and the sort-based selections they serve
(jaxprefill.sparse.select: cumulative_keep, mass_count); the weighted cuts of the GPU kernels
(entries ordered by s, counting their weight) against the weighted reference; and the GPU
kernels' lowering for CUDA (Triton IR generation and its power-of-two tensor rules; the Triton
compile needs a GPU), FlexPrefill's chunk rows through the weighted kernel included."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprefill.sparse import estimators as est
from jaxprefill.sparse import select
from jaxprefill.sparse.estimation import Estimation
from jaxprefill.sparse.flexprefill import keep_after_uniform_prefix, mass_count_sort
from pallas_kernels import backends, estimation
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gpu.mass_cut_triton import mass_cut_triton
from pallas_kernels.gpu.mass_cut_wide_triton import mass_cut_wide_triton
from pallas_kernels.tpu.mass_cut_tpu import mass_cut_tpu

KERNELS = {  # both backends' kernels in interpret mode (TPU: uninitialized memory reads NaN)
    "gpu": lambda s, b, g: mass_cut_triton(s, b, g, interpret=True),
    "tpu": lambda s, b, g: mass_cut_tpu(s, b, g, block_rows=8,
                                        interpret=pltpu.InterpretParams(uninitialized_memory="nan")),
}
# Every TPU-interpret result is waited for (np.asarray / block_until_ready) before more JAX work
# is dispatched: its Python callbacks need the GIL, and eager ops queued behind it can fill the
# CPU client's in-flight queue and wait holding the GIL (a hang seen under pytest-xdist).


def _scores(seed: int, shape, ties: bool):
    rng = np.random.default_rng(seed)
    s = rng.exponential(size=shape).astype(np.float32) ** 3  # heavy-tailed, like block masses
    if ties:  # repeated values (pooled scores of empty cells, equal blocks)
        s = np.round(s * 4) / 4
    s[rng.random(shape) < 0.2] = 0.0
    return jnp.asarray(s)


@pytest.mark.parametrize("backend", sorted(KERNELS))
@pytest.mark.parametrize("shape, ties", [((3, 5, 37), False), ((2, 4, 64), True),
                                         ((1, 1, 1000), False), ((7, 16), True)])
def test_kernel_cut_equals_reference(shape, ties, backend):
    seed = int(np.random.default_rng().integers(2**31))
    s = _scores(seed, shape, ties)
    total = s.sum(-1)
    base = 0.1 * total
    goal = jnp.asarray(np.random.default_rng(seed + 1).uniform(0.5, 1.0, shape[:-1]),
                       jnp.float32) * total
    goal = goal.at[(0,) * (len(shape) - 1)].set(0.0)  # a row no cut satisfies
    ref = estimation.mass_cut_reference(s, base, goal)
    out = jax.block_until_ready(KERNELS[backend](s, base, goal))
    assert out.dtype == jnp.uint32 and out.shape == shape[:-1]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref), err_msg=f"seed {seed}")
    assert int(out[(0,) * (len(shape) - 1)]) == 0xFFFFFFFF
    # The reference is the XLA search of select.cumulative_keep (uint32 keys, 32 bits).
    key = select.sort_key(s)
    xla = select._search(lambda u: base[..., None] + jnp.sum(
        jnp.where(select.above(key, u), s[..., None, :], 0.0), -1) < goal[..., None], shape[:-1])
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(xla))


@pytest.mark.parametrize("impl", ["triton", "mosaic_tpu"])
@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_cumulative_keep_with_kernel_equals_sort(gamma, impl):
    seed = int(np.random.default_rng().integers(2**31))
    s = _scores(seed, (2, 3, 8, 40), ties=True)
    rng = np.random.default_rng(seed + 2)
    valid = jnp.asarray(rng.random(s.shape) < 0.9)
    valid = valid.at[0, 0, 0].set(False)  # a row with nothing valid
    forced = jnp.asarray(rng.random(s.shape) < 0.05)
    how = Estimation(impl, interpret=True)
    out = np.asarray(select.cumulative_keep(s, valid, gamma, forced, how=how))
    ref = est.cumulative_keep_sort(s, valid, gamma, forced)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref), err_msg=f"seed {seed}")
    assert not np.asarray(out[0, 0, 0]).any()


def test_bad_inputs_are_named():
    s = jnp.ones((2, 8), jnp.float32)
    with pytest.raises(ValueError, match="base"):
        mass_cut_triton(s, jnp.zeros((3,)), jnp.zeros((2,)), interpret=True)
    with pytest.raises(ValueError, match="exceed"):
        mass_cut_triton(jnp.ones((1, 20000)), jnp.zeros((1,)), jnp.zeros((1,)), interpret=True)
    with pytest.raises(ValueError, match="block_rows"):
        mass_cut_tpu(s, jnp.zeros((2,)), jnp.zeros((2,)), block_rows=12, interpret=True)
    with pytest.raises(ValueError, match="XLA estimators"):
        estimation.mass_cut(s, jnp.zeros((2,)), jnp.zeros((2,)), impl="xla")
    wide = jnp.ones((1, (1 << 20) + 1))
    with pytest.raises(ValueError, match="exceed"):
        mass_cut_wide_triton(wide, jnp.zeros((1,)), jnp.zeros((1,)), interpret=True)
    with pytest.raises(ValueError, match="tile"):
        mass_cut_wide_triton(s, jnp.zeros((2,)), jnp.zeros((2,)), tile=48, interpret=True)
    with pytest.raises(ValueError, match="digit_bits"):
        mass_cut_wide_triton(s, jnp.zeros((2,)), jnp.zeros((2,)), digit_bits=5, interpret=True)


def test_policy_layouts_unchanged_by_the_kernel():
    """XAttention's layout with the interpret-mode estimation kernels equals the XLA one."""
    from jaxprefill import sparse
    q = jax.random.normal(jax.random.key(3), (2, 700, 6, 32), jnp.float32)
    k = jax.random.normal(jax.random.key(4), (2, 700, 2, 32), jnp.float32)
    lengths = jnp.array([700, 455], jnp.int32)
    layouts = {}
    for impl in ("xla", "triton"):
        policy = sparse.get("xattention", threshold=0.8, stride=8, block_size=64,
                            estimation={"impl": impl, "interpret": True})
        layouts[impl] = policy.build(q, k, lengths=lengths).to_block_mask()
    np.testing.assert_array_equal(np.asarray(layouts["xla"]), np.asarray(layouts["triton"]))


def test_tpu_impls_dispatch_to_the_tpu_kernels():
    """``impl="mosaic_tpu", interpret=True`` reaches each TPU estimation kernel (one kernel per
    call: TPU interpret mode is not run inside whole policy builds, where XLA may run two
    interpreted kernels concurrently) and matches the references."""
    seed = int(np.random.default_rng().integers(2**31))
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(2, 4, 16, 32)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 100, 2, 32)), jnp.float32)
    lengths = jnp.asarray([100, 37], jnp.int32)
    got = jax.block_until_ready(
        estimation.last_query_sums(q, k, lengths, scale=0.2, impl="mosaic_tpu",
                                   interpret=True))
    ref = estimation.last_query_sums(q, k, lengths, scale=0.2, impl="reference")
    for a, b in zip(got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=str(seed))
    s = _scores(seed, (3, 40), ties=False)
    base, goal = jnp.zeros((3,)), 0.9 * s.sum(-1)
    np.testing.assert_array_equal(
        np.asarray(estimation.mass_cut(s, base, goal, impl="mosaic_tpu", interpret=True)),
        np.asarray(estimation.mass_cut_reference(s, base, goal)), err_msg=str(seed))
    qx = jnp.asarray(rng.normal(size=(1, 64, 4, 64)), jnp.float32)
    kx = jnp.asarray(rng.normal(size=(1, 64, 2, 64)), jnp.float32)
    out = np.asarray(estimation.pooled_block_scores(qx, kx, jnp.asarray([50]), 0, r=8,
                                                    scale=0.1, impl="mosaic_tpu",
                                                    interpret=True))
    gpu = estimation.pooled_block_scores(qx, kx, jnp.asarray([50]), 0, r=8, scale=0.1,
                                         impl="triton", interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(gpu), atol=1e-6, err_msg=str(seed))


# ---- wide rows: mass_cut_wide_triton (one program per row, the row walked in tiles) --------

WIDE_CASES = [  # shape, ties, kernel arguments
    ((2, 3, 16384 + 1000), False, {}),  # leading dims; 5 tiles of 4096, the last one padded
    ((5, 20001), True, {}),  # exact ties at the cut
    ((1, 65536 + 37), False, {}),
    # few columns, many small tiles: each digit width (31 bits = 31 x 1, 1 + 15 x 2, 1 + 10 x 3,
    # 3 + 7 x 4: the first digit takes the leftover bits)
    ((6, 300), True, dict(tile=16, digit_bits=1)),
    ((6, 300), False, dict(tile=32, digit_bits=3)),
    ((6, 300), True, dict(tile=64, digit_bits=4)),
]


def _wide_problem(seed: int, shape, ties: bool):
    """(s, base, goal) float32 with edge rows first, then random rows whose goal lies half an
    entry past the mass of their k largest entries (k random, the entry above 1e-4 of the
    row's mass), so no float summation order can move the cut. Edge rows (where there are at
    least 5 rows): goal 0 (no cut qualifies: 0xFFFFFFFF), goal above the total (every entry
    kept: cut 0), all zeros, one value throughout (ties at the cut)."""
    rng = np.random.default_rng(seed)
    s = np.asarray(_scores(seed, shape, ties)).reshape(-1, shape[-1]).copy()
    rows = s.shape[0]
    special = rows >= 5
    if special:
        s[2] = 0.0
        s[3] = 0.5
    base = 0.1 * s.sum(-1, dtype=np.float64)
    srt = -np.sort(-s, axis=-1).astype(np.float64)
    big = np.maximum(1, (srt > 1e-4 * srt.sum(-1, keepdims=True)).sum(-1))
    k = rng.integers(0, big)  # the cut's entry, 0-based
    goal = base + np.cumsum(srt, -1)[np.arange(rows), k] - srt[np.arange(rows), k] / 2
    if special:
        goal[0] = 0.0
        goal[1] = 2 * (base[1] + s[1].sum(dtype=np.float64)) + 1
        goal[2] = 1.0
    lead = shape[:-1]
    return (jnp.asarray(s.reshape(shape)), jnp.asarray(base.reshape(lead), jnp.float32),
            jnp.asarray(goal.reshape(lead), jnp.float32))


@pytest.mark.parametrize("shape, ties, kwargs", WIDE_CASES,
                         ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else None)
def test_wide_kernel_cut_equals_reference(shape, ties, kwargs):
    seed = int(np.random.default_rng().integers(2**31))
    s, base, goal = _wide_problem(seed, shape, ties)
    out = mass_cut_wide_triton(s, base, goal, interpret=True, **kwargs)
    ref = estimation.mass_cut_reference(s, base, goal)
    assert out.dtype == jnp.uint32 and out.shape == shape[:-1]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref), err_msg=f"seed {seed}")
    flat = np.asarray(out).reshape(-1)
    if flat.size >= 5:  # the edge rows of _wide_problem
        key_half = int(np.float32(0.5).view(np.uint32)) | 0x80000000
        assert list(flat[:4]) == [0xFFFFFFFF, 0x80000000, 0x80000000, key_half]
    # the random rows' cut is the key of their (k+1)-th largest entry: not trivially 0 / all
    assert ((flat > 0x80000000) & (flat < 0xFFFFFFFF)).any()


def test_mass_cut_dispatches_wide_rows_to_the_wide_kernel(monkeypatch):
    seed = int(np.random.default_rng().integers(2**31))
    wide, calls = estimation._mass_cut_wide, []

    def spy(s, *args, **kwargs):
        calls.append(s.shape[-1])
        return wide(s, *args, **kwargs)

    monkeypatch.setattr(estimation, "_mass_cut_wide", spy)
    for m in (16384, 16385):  # the register-resident kernel's last width, then the wide one
        s, base, goal = _wide_problem(seed + m, (2, m), ties=False)
        out = estimation.mass_cut(s, base, goal, impl="triton", interpret=True)
        np.testing.assert_array_equal(np.asarray(out),
                                      np.asarray(estimation.mass_cut_reference(s, base, goal)),
                                      err_msg=f"seed {seed + m}")
    assert calls == [16385]


@pytest.mark.parametrize("m", [999, 16384 + 1000])  # the register kernel, the wide kernel
def test_mass_count_through_the_kernel_equals_xla_and_sort(m):
    # Dyadic masses (0 to 4 units of 2^-bits(m), rows of 0.8 to 1.6): every partial sum is
    # exact in float32, so the kernel, the XLA search and the sort agree in any summation
    # order; 4 distinct positive values: ties at every cut.
    seed = int(np.random.default_rng().integers(2**31))
    rng = np.random.default_rng(seed)
    shape = (2, 1, 2, m)  # FlexPrefill's stacked [vertical, slash] budgets, [2, B, Hq, S]
    x = (rng.integers(0, 5, shape) * 2.0 ** -m.bit_length()).astype(np.float32)
    x = jnp.asarray(np.where(rng.random(shape) < 0.1, -x, x))  # negative entries never count
    valid = rng.random(shape) < 0.9
    valid[0, 0, 0] = False  # a row with nothing valid
    valid = jnp.asarray(valid)
    kernel = Estimation("triton", interpret=True)
    for gamma in (0.375, 0.75):  # dyadic too: the tied group's share is exact
        got = select.mass_count(x, valid, gamma, how=kernel)
        xla = select.mass_count(x, valid, gamma, how=Estimation("xla"))
        want = mass_count_sort(x, valid, gamma)
        msg = f"seed {seed} gamma {gamma}"
        np.testing.assert_array_equal(np.asarray(got), np.asarray(xla), err_msg=msg)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=msg)
        assert int(got[0, 0, 0]) == 0 and 0 < int(got[1, 0, 1]) < m


def test_cumulative_keep_over_wide_rows_equals_sort():
    """FlexPrefill's query-aware selection at 32K tokens keeps a mass share of rows of 65536
    pooled blocks: wide rows take the wide kernel (here a smaller width above 16384)."""
    seed = int(np.random.default_rng().integers(2**31))
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 9, (2, 16384 + 700)) * 2.0 ** -16  # exact sums (as above), ties
    s = jnp.asarray(x, jnp.float32)
    valid = jnp.asarray(rng.random(s.shape) < 0.9)
    forced = jnp.asarray(rng.random(s.shape) < 0.01)
    out = select.cumulative_keep(s, valid, 0.9, forced, how=Estimation("triton", interpret=True))
    ref = est.cumulative_keep_sort(s, valid, 0.9, forced)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref), err_msg=f"seed {seed}")


# ---- weighted cuts: entries ordered by s, counting weight ---------------------------------

WEIGHTED_CASES = [  # kernel, shape, ties, kernel arguments
    ("register", (3, 5, 37), False, {}),
    ("register", (7, 999), True, {}),
    ("wide", (5, 20001), True, {}),  # one tile of 4096 short of 5: the last one padded
    ("wide", (2, 3, 16384 + 1000), False, {}),
    ("wide", (6, 300), True, dict(tile=32, digit_bits=3)),  # many tiles, 1 + 10 x 3 bits
]
WEIGHTED_KERNELS = {"register": mass_cut_triton, "wide": mass_cut_wide_triton}


def _weighted_problem(seed: int, shape, ties: bool):
    """(s, weight, base, goal) float32 with edge rows first, then random rows. s orders the
    entries (heavy-tailed, zeros; ties: few distinct values); weight is an independent mass of
    0 to 15 units of 2^-10 (also where s is 0: such entries are never above a cut), so every
    partial sum and base is exact in float32 in any summation order and the kernels must equal
    the reference bit for bit; goal a random share of base + the row's weight. Edge rows (at
    least 5 rows): goal 0 (no cut qualifies: 0xFFFFFFFF), goal above base + total (every entry
    counts: cut 0), s all zero (nothing above any cut: cut 0), s one value throughout (the cut
    is that value's key)."""
    rng = np.random.default_rng(seed)
    s = np.asarray(_scores(seed, shape, ties)).reshape(-1, shape[-1]).copy()
    rows = s.shape[0]
    w = rng.integers(0, 16, s.shape) * 2.0 ** -10
    s[2], s[3] = 0.0, 0.5
    base = np.floor(rng.uniform(0, 0.2, rows) * w.sum(-1)) * 2.0 ** -10  # dyadic, mostly > 0
    goal = base + rng.uniform(0.3, 1.0, rows) * w.sum(-1)
    goal[0] = 0.0
    goal[1] = 2 * (base[1] + w[1].sum()) + 1
    goal[2] = base[2] + 1.0
    lead = shape[:-1]
    as_f32 = lambda x, sh: jnp.asarray(x.reshape(sh), jnp.float32)  # noqa: E731
    return as_f32(s, shape), as_f32(w, shape), as_f32(base, lead), as_f32(goal, lead)


@pytest.mark.parametrize("kernel, shape, ties, kwargs", WEIGHTED_CASES,
                         ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else None)
def test_weighted_kernel_cut_equals_reference(kernel, shape, ties, kwargs):
    seed = int(np.random.default_rng().integers(2**31))
    s, w, base, goal = _weighted_problem(seed, shape, ties)
    out = np.asarray(WEIGHTED_KERNELS[kernel](s, base, goal, w, interpret=True, **kwargs))
    ref = np.asarray(estimation.mass_cut_reference(s, base, goal, w))
    assert out.dtype == np.uint32 and out.shape == shape[:-1]
    np.testing.assert_array_equal(out, ref, err_msg=f"seed {seed}")
    flat = out.reshape(-1)
    key_half = int(np.float32(0.5).view(np.uint32)) | 0x80000000
    assert list(flat[:4]) == [0xFFFFFFFF, 0x80000000, 0x80000000, key_half], f"seed {seed}"
    assert ((flat > 0x80000000) & (flat < 0xFFFFFFFF)).any()  # random rows: inner cuts
    # the weights matter: the entries' own masses cut elsewhere
    plain = np.asarray(estimation.mass_cut_reference(s, base, goal))
    assert (plain != ref).any(), f"seed {seed}"


@pytest.mark.parametrize("kernel", sorted(WEIGHTED_KERNELS))
def test_unweighted_kernels_read_one_matrix(kernel):
    """weight=None keeps the single-input kernel (no copy of s as weight) and equals
    weight=s."""
    seed = int(np.random.default_rng().integers(2**31))
    s, _, base, goal = _weighted_problem(seed, (5, 300), ties=True)
    fn = functools.partial(WEIGHTED_KERNELS[kernel], interpret=True)
    arity = {}
    for label, args in (("plain", (s, base, goal)), ("weighted", (s, base, goal, s))):
        calls = list(_pallas_calls(jax.make_jaxpr(fn)(*args).jaxpr))
        assert len(calls) == 1
        arity[label] = len(calls[0].invars)
    assert arity == {"plain": 3, "weighted": 4}  # s (, weight), base, goal
    np.testing.assert_array_equal(np.asarray(fn(s, base, goal)),
                                  np.asarray(fn(s, base, goal, s)), err_msg=f"seed {seed}")


def _pallas_calls(jaxpr):
    """The pallas_call equations of a jaxpr, nested ones (jit) included."""
    for e in jaxpr.eqns:
        if e.primitive.name == "pallas_call":
            yield e
        for p in e.params.values():
            inner = getattr(p, "jaxpr", p)  # ClosedJaxpr -> Jaxpr
            if hasattr(inner, "eqns"):
                yield from _pallas_calls(inner)


def test_weighted_mass_cut_dispatch():
    """estimation.mass_cut with weight: the reference and both Triton kernels agree; the TPU
    kernel takes no weights (a named mosaic_tpu call raises with the reason)."""
    seed = int(np.random.default_rng().integers(2**31))
    for m in (16384, 16385):  # the register-resident kernel's last width, then the wide one
        s, w, base, goal = _weighted_problem(seed + m, (5, m), ties=False)
        ref = np.asarray(estimation.mass_cut(s, base, goal, w, impl="reference"))
        out = np.asarray(estimation.mass_cut(s, base, goal, w, impl="triton", interpret=True))
        np.testing.assert_array_equal(out, ref, err_msg=f"seed {seed + m}")
    with pytest.raises(ValueError, match="takes no weights"):
        estimation.mass_cut(s[:, :64], base, goal, w[:, :64], impl="mosaic_tpu",
                            interpret=True)
    with pytest.raises(ValueError, match="weight"):
        mass_cut_triton(s[:, :64], base, goal, w[:, :63], interpret=True)


# ---- lowering for CUDA (no GPU needed) --------------------------------------------------

@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("shape, kernel", [((9, 65536), "mass_cut_wide_triton"),
                                           ((2 * 9, 32768), "mass_cut_wide_triton"),
                                           ((3, 20001), "mass_cut_wide_triton"),
                                           ((9, 16384), "mass_cut_triton")])
def test_triton_kernels_lower_for_cuda(shape, kernel, weighted, monkeypatch):
    # through the dispatcher on a pretend GPU (triton named; the width picks the kernel):
    # FlexPrefill's query-aware rows at 32K tokens [B * Hq, nq * n] and its stacked budgets
    monkeypatch.setattr(backends, "platform", lambda: "gpu")
    sds = jax.ShapeDtypeStruct
    f32 = jnp.float32
    args = [sds(shape, f32), sds(shape[:-1], f32), sds(shape[:-1], f32)]
    if weighted:
        args.append(sds(shape, f32))
    cut = functools.partial(estimation.mass_cut, impl="triton")
    text = jax.jit(cut).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert kernel in text
    assert (f"{kernel}_weighted" in text) == weighted


def test_mass_count_lowers_with_the_kernel_for_cuda(monkeypatch):
    monkeypatch.setattr(backends, "platform", lambda: "gpu")
    sds = jax.ShapeDtypeStruct
    fn = functools.partial(select.mass_count, gamma=0.95, how=Estimation())
    text = jax.jit(fn).trace(sds((2, 1, 9, 32768), jnp.float32),
                             sds((2, 1, 9, 32768), jnp.bool_)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mass_cut_wide_triton" in text


def test_chunk_rows_lower_with_the_weighted_kernel_for_cuda(monkeypatch):
    # FlexPrefill's chunk rows on a pretend GPU ("auto"): SmolLM2's 9 heads at 32K tokens, a
    # chunk of 64 query blocks after the uniform prefix: 256 prefix + 64 x 256 scores
    monkeypatch.setattr(backends, "platform", lambda: "gpu")
    sds = jax.ShapeDtypeStruct
    fn = functools.partial(keep_after_uniform_prefix, gamma=0.95, how=Estimation())
    text = jax.jit(fn).trace(sds((1, 9, 64 * 256), jnp.float32),
                             sds((1, 9, 64 * 256), jnp.bool_), value=sds((1, 256), jnp.float32),
                             count=sds((1, 256), jnp.float32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mass_cut_wide_triton_weighted" in text
