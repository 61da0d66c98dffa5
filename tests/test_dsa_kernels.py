"""DSA ops (`pallas_kernels.dsa_ops`): the indexer's top-k and sparse MLA, every backend against
the float32 reference, the Pallas kernels in interpret mode, and their lowering for a GPU
(Triton) and a TPU (Mosaic) on the CPU.

Index inputs with small integer values make every score exact in float32 whatever the
summation order, so backends must agree index for index; they also tie often, which checks
the tie rule (lower key index first). Fresh normal inputs check that a selection is a top-k
of the reference scores up to rounding. Problems: odd lengths, non-power-of-two heads and dims,
rows shorter than k, ragged batches (per-row query offsets, i.e. chunks of a longer prompt),
packed segments, FP8 rounding; sparse rows with -1 slots and empty queries, split rows.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import backends, dsa_ops
from pallas_kernels._dsa_common import INVALID, kth_key_xla, kth_select, order_key, topk_keys
from pallas_kernels.dsa_reference import (allowed, index_scores_reference, index_topk_reference,
                                          query_positions, select_topk, sparse_mla_reference)
from pallas_kernels.gpu.dsa_index_triton import index_keys_triton, segment_topk_triton
from pallas_kernels.gpu.sparse_mla_triton import sparse_mla_triton
from pallas_kernels.tpu.dsa_index_tpu import index_keys_tpu, kth_key_tpu
from pallas_kernels.tpu.sparse_mla_tpu import sparse_mla_tpu
from scripts.checks import check_dsa_gpu

KERNEL_OPTS = {  # kernel backends in interpret mode, tiles small enough to cross several
    "xla": dict(chunk=8),
    "triton": dict(interpret=True, chunk=16, config=dict(block_k=16)),
    "mosaic_tpu": dict(interpret=True, config=dict(block_q=40, block_k=128)),  # one grid row
}


def run(fn, *args) -> np.ndarray | tuple:
    """fn(*args) as one jitted computation, waited for. TPU interpret mode runs Python
    callbacks that need the GIL: eager ops dispatched while one is in flight can deadlock
    (pallas_kernels/estimation.py), so nothing else runs meanwhile."""
    out = jax.block_until_ready(jax.jit(fn)(*args))
    return jax.tree.map(np.asarray, out)


def index_problem(seed, b=2, s=37, hi=6, d=24, t=50, integer=True, offsets=(0, 13)):
    rng = np.random.default_rng(seed)
    draw = ((lambda shape: rng.integers(-2, 3, shape)) if integer else rng.standard_normal)
    q = jnp.asarray(draw((b, s, hi, d)), jnp.float32)
    w = jnp.asarray(draw((b, s, hi)), jnp.float32)
    k = jnp.asarray(draw((b, t, d)), jnp.float32)
    return q, w, k, jnp.asarray(offsets, jnp.int32)


def segments(seed, b, s, t):
    rng = np.random.default_rng(seed)
    cut_q = np.sort(rng.integers(0, s, (b, 2)), axis=1)
    seg = (np.arange(t)[None] >= cut_q[:, :1]).astype(np.int32) + \
        (np.arange(t)[None] >= cut_q[:, 1:]).astype(np.int32)
    return jnp.asarray(seg[:, :s]), jnp.asarray(seg)


@pytest.mark.parametrize("impl, variant", [
    ("xla", "causal"), ("xla", "segments_fp8"), ("triton", "causal"),
    ("triton", "segments_fp8"), ("mosaic_tpu", "segments_fp8")])  # TPU interpret is slow
def test_index_topk_equals_reference_exactly(impl, variant):
    q, w, k, off = index_problem(1)
    kw = {}
    if variant == "segments_fp8":  # segments within each row (packed prompts), FP8 scores
        kw = dict(segment_ids=segments(2, 2, 37, 50), fp8=True)
    if kw.get("fp8"):  # the reference on the FP8-rounded operands
        want = np.asarray(dsa_ops.index_topk(q, w, k, 7, q_offset=off, impl="reference", **kw))
    else:
        want = np.asarray(index_topk_reference(q, w, k, 7, q_offset=off))
    got = run(lambda q, w, k: dsa_ops.index_topk(q, w, k, 7, q_offset=off, impl=impl, **kw,
                                                 **KERNEL_OPTS[impl]), q, w, k)
    np.testing.assert_array_equal(got, want)
    # rows shorter than k are filled with their allowed keys, then -1; others have 7
    n = (got >= 0).sum(-1)
    assert n.min() < 7 and n.max() == 7
    padded = np.where(got >= 0, got, (1 << 20) + np.arange(got.shape[-1]))
    assert np.all(np.diff(padded, axis=-1) > 0)  # ascending, -1 only after the selection


def test_reference_tie_rule_and_padding():
    # key scores: one query at position 5 over 8 keys, k = 4
    scores = jnp.asarray([[3.0, 1.0, 3.0, -0.0, 3.0, 3.0, 9.0, 3.0]])
    ok = allowed(jnp.asarray([[5]]), 8)[0]
    got = np.asarray(select_topk(scores, ok, 4))
    # allowed 0..5; 3.0 ties at 0, 2, 4, 5: the lower indices win
    np.testing.assert_array_equal(got, [[0, 2, 4, 5]])
    got = np.asarray(select_topk(jnp.zeros((1, 8)), allowed(jnp.asarray([[2]]), 8)[0], 4))
    np.testing.assert_array_equal(got, [[0, 1, 2, -1]])
    # -0.0 and +0.0 are one score: the lower index wins
    s = jnp.asarray([[-0.0, 0.0, -0.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(select_topk(s, jnp.ones((1, 4), bool), 2)),
                                  [[0, 1]])
    keys = order_key(s)
    assert np.all(np.asarray(keys) == np.asarray(keys)[0, 0])


def assert_is_topk(idx, scores, ok, k, tol):
    """Each row's selection is a top-k of the reference scores up to `tol`."""
    idx, scores, ok = np.asarray(idx), np.asarray(scores), np.asarray(ok)
    for row in range(idx.shape[0]):
        sel = idx[row][idx[row] >= 0]
        assert len(sel) == min(k, ok[row].sum())
        assert ok[row][sel].all()
        rest = np.setdiff1d(np.nonzero(ok[row])[0], sel)
        if len(rest) and len(sel):
            assert scores[row, sel].min() >= scores[row, rest].max() - tol


@pytest.mark.parametrize("impl", ["triton"])  # the other backends: the exact tests only
def test_index_topk_is_a_topk_on_fresh_random_inputs(impl):
    q, w, k, off = index_problem(3, s=21, t=77, integer=False, offsets=(56, 3))
    got = run(lambda q, w, k: dsa_ops.index_topk(q, w, k, 9, q_offset=off, impl=impl,
                                                 **KERNEL_OPTS[impl]), q, w, k)
    b, s = q.shape[:2]
    scores = index_scores_reference(q, w, k)
    ok = allowed(query_positions(b, s, off), k.shape[1])
    assert_is_topk(got.reshape(b * s, -1), scores.reshape(b * s, -1), ok.reshape(b * s, -1), 9,
                   1e-4)


@pytest.mark.parametrize("backend", ["xla", "triton", "mosaic_tpu"])
def test_long_rows_go_through_segments(backend):
    # rows of 300 keys against 64-key tiles: a tournament of segment top-ks (implicit columns,
    # then the candidates' explicit ones), with many ties (values in 0..5) and invalid
    # entries; k = 40 shrinks the rows four times, then they are counted whole (80 >= 2 x 40)
    rng = np.random.default_rng(4)
    vals = jnp.asarray(rng.integers(0, 6, (5, 300)), jnp.float32)
    ok = jnp.asarray(rng.random((5, 300)) < 0.8).at[4, 20:].set(False)  # row 4: 16 valid
    fn = {"xla": kth_select(kth_key_xla),
          "triton": functools.partial(segment_topk_triton, interpret=True),
          "mosaic_tpu": kth_select(functools.partial(kth_key_tpu, interpret=True))}[backend]
    key = jax.block_until_ready(order_key(vals, ok))
    for k in {"xla": (40,), "triton": (40,), "mosaic_tpu": (10,)}[backend]:
        got = run(lambda key: topk_keys(key, k, fn, 64), key)
        np.testing.assert_array_equal(got, np.asarray(select_topk(vals, ok, k)))


def test_segment_topk_kernels_on_negative_and_invalid_keys():
    rng = np.random.default_rng(5)
    s = jnp.asarray(rng.standard_normal((9, 200)) * 1e3, jnp.float32)
    key = order_key(s, jnp.asarray(rng.random((9, 200)) < 0.7))
    key = key.at[0].set(INVALID).at[1, :190].set(INVALID)  # no valid entry; fewer than k
    want = np.asarray(kth_key_xla(key, 33))
    assert want[0] == INVALID
    np.testing.assert_array_equal(run(lambda x: kth_key_tpu(x, 33, interpret=True), key), want)
    cols = jnp.asarray(rng.permutation(1000)[:200][None].repeat(9, 0), jnp.int32)
    want_key, want_cols = kth_select(kth_key_xla)(key, cols, 33, 1)
    got_key, got_cols = segment_topk_triton(key, cols, 33, interpret=True)
    np.testing.assert_array_equal(np.asarray(got_key), np.asarray(want_key))
    np.testing.assert_array_equal(np.asarray(got_cols), np.asarray(want_cols))
    n_valid = int(np.sum(np.asarray(key)[1] != INVALID))
    assert np.all(np.asarray(got_cols)[0] == -1) and np.sum(np.asarray(got_cols)[1] >= 0) == n_valid


def test_fp8_triton_exact_on_the_gpu_checks_power_of_two_scale_inputs():
    # the GPU check's FP8 inputs: every per-row scale amax / 448 a power of two (varying per
    # row), so the FP8 scores equal the unquantized float32 scores exactly and the FP8 kernel
    # must select what the float32 reference selects; at V3.2's index heads, k = 37 (not a
    # power of two), rows shorter than k (offset 0) and longer (offset 36)
    q, w, k = check_dsa_gpu.fp8_exact_inputs(7, 2, 24, 60, 64, 128, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(check_dsa_gpu.fp8_scores(q, w, k)),
                                  np.asarray(index_scores_reference(q, w, k)))
    off = jnp.asarray([0, 36], jnp.int32)
    got = run(lambda q, w, k: dsa_ops.index_topk(q, w, k, 37, q_offset=off, fp8=True,
                                                 impl="triton", **KERNEL_OPTS["triton"]),
              q, w, k)
    np.testing.assert_array_equal(got, np.asarray(index_topk_reference(q, w, k, 37,
                                                                       q_offset=off)))
    n = (got >= 0).sum(-1)
    assert n.min() < 37 and n.max() == 37


def sparse_problem(seed, b=2, s=5, h=6, dc=32, dr=8, n=90, k=20, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    ql = jnp.asarray(rng.standard_normal((b, s, h, dc)), dtype)
    qp = jnp.asarray(rng.standard_normal((b, s, h, dr)), dtype)
    kv = jnp.asarray(rng.standard_normal((n, dc + dr)), dtype)
    rows = np.full((b, s, k), -1, np.int32)
    for i in range(b):
        for j in range(s):
            m = [0, k, 1, 7, 13][(i * s + j) % 5]  # empty, full, one row, partial
            rows[i, j, :m] = rng.choice(n, m, replace=False)  # valid first, any order
    return ql, qp, kv, jnp.asarray(rows)


def check_sparse(got, want, tol):
    (o, lse), (ro, rlse) = got, want
    o, lse, ro, rlse = map(np.asarray, (o, lse, ro, rlse))
    assert np.all(np.isfinite(o))
    assert np.max(np.abs(o - ro)) < tol
    fin = np.isfinite(rlse)
    np.testing.assert_array_equal(np.isfinite(lse), fin)
    assert np.max(np.abs(lse[fin] - rlse[fin])) < tol


def test_sparse_mla_reference_matches_dense_numpy():
    ql, qp, kv, rows = sparse_problem(6)
    out, lse = sparse_mla_reference(ql, qp, kv, rows, 0.3)
    b, s, h, dc = ql.shape
    for i, j in ((0, 1), (1, 3)):
        r = np.asarray(rows[i, j])
        r = r[r >= 0]
        g = np.asarray(kv, np.float64)[r]
        sc = np.concatenate([ql[i, j], qp[i, j]], -1).astype(np.float64) @ g.T * 0.3
        p = np.exp(sc - sc.max(-1, keepdims=True))
        want = (p / p.sum(-1, keepdims=True)) @ g[:, :dc]
        np.testing.assert_allclose(np.asarray(out[i, j]), want, atol=1e-5)
    assert np.all(np.asarray(out[0, 0]) == 0) and np.all(np.isneginf(np.asarray(lse[0, 0])))


@pytest.mark.parametrize("impl, opts", [
    ("xla", dict(chunk=4)),
    ("triton", dict(interpret=True, num_splits=1, config=dict(block_k=16, poison_output=True))),
    ("triton", dict(interpret=True, num_splits=3, config=dict(block_k=16, poison_output=True))),
    ("mosaic_tpu", dict(interpret=True)),
])
def test_sparse_mla_backends_match_reference(impl, opts):
    # TPU interpret mode runs one DMA per row: 4 queries (empty, full, one row, partial)
    args = sparse_problem(7, s=5 if impl != "mosaic_tpu" else 2)
    want = run(lambda *a: sparse_mla_reference(*a, 0.3), *args)
    check_sparse(run(lambda *a: dsa_ops.sparse_mla(*a, 0.3, impl=impl, **opts), *args), want,
                 2e-5)


def test_sparse_mla_tpu_walks_several_row_blocks():
    # 260 rows = blocks of 128, 128, 4: the next block's DMAs fly while one computes (two
    # buffers); queries with 0, 260, 1 and 7 valid rows
    args = sparse_problem(8, s=2, n=400, k=260)
    want = run(lambda *a: sparse_mla_reference(*a, 0.3), *args)
    check_sparse(run(lambda *a: dsa_ops.sparse_mla(*a, 0.3, impl="mosaic_tpu", interpret=True),
                     *args), want, 2e-5)


def test_sparse_mla_bf16_xla_close_to_float32():
    args = sparse_problem(8, dtype=jnp.bfloat16)
    want = sparse_mla_reference(*args, 0.3)
    check_sparse(dsa_ops.sparse_mla(*args, 0.3, impl="xla"), want, 5e-2)


def test_named_backends_refuse_clearly():
    q, w, k, off = index_problem(9)
    with pytest.raises(ValueError, match="unknown impl"):
        dsa_ops.index_topk(q, w, k, 4, impl="cudnn")
    with pytest.raises(ValueError, match="runs on gpu"):
        dsa_ops.index_topk(q, w, k, 4, impl="triton")  # on the CPU, without interpret
    with pytest.raises(ValueError, match="takes no config"):
        dsa_ops.index_topk(q, w, k, 4, impl="xla", config={"block_k": 16})
    with pytest.raises(ValueError, match="q_offset"):
        dsa_ops.index_topk(q, w, k, 4, q_offset=jnp.zeros((3,), jnp.int32))
    ql, qp, kv, rows = sparse_problem(9)
    with pytest.raises(ValueError, match="kv must be"):
        dsa_ops.sparse_mla(ql, qp, kv[:, :-1], rows, 0.1)
    assert dsa_ops.index_topk_backend(q, k, 4) == "xla"  # what a CPU runs
    assert dsa_ops.sparse_mla_backend(ql, kv) == "xla"


# ---- lowering (no GPU or TPU needed) ------------------------------------------------------

def largest_tensor(stablehlo: str) -> int:
    """Elements of the largest tensor type in a StableHLO module's text."""
    sizes = [int(np.prod([int(x) for x in m.group(1).split("x") if x]))
             for m in re.finditer(r"tensor<((?:\d+x)+)[a-z0-9]+>", stablehlo)]
    return max(sizes)


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_index_topk_at_128k_allocates_no_s_by_s_buffer(impl):
    # V3.2 index shapes at S = T = 128K, traced and lowered only (nothing is allocated): the
    # largest tensor is an input (q: S x 64 x 128 = S^2 / 16), never an [S, S] score or key
    # matrix (the triton path in interpret form: its chunk loop and kernel bodies as HLO)
    s = 131072
    sds = jax.ShapeDtypeStruct
    avals = (sds((1, s, 64, 128), jnp.bfloat16), sds((1, s, 64), jnp.float32),
             sds((1, s, 128), jnp.bfloat16))
    fn = functools.partial(dsa_ops.index_topk, topk=2048, impl=impl,
                           interpret=impl == "triton")
    text = jax.jit(fn).trace(*avals).lower().as_text()
    assert largest_tensor(text) <= s * s // 16

V32_INDEX = dict(b=1, r=64, hi=64, d=128, t=1000)


def _index_avals(dtype, b, r, hi, d, t):
    i32, f32 = jnp.int32, jnp.float32
    sds = jax.ShapeDtypeStruct
    return (sds((b, r, hi, d), dtype), sds((b, r, hi), f32), sds((b, t, d), dtype),
            sds((b, r), i32), sds((b, r), i32), sds((b, t), i32), sds((b, t), f32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_triton_kernels_lower_for_cuda(dtype):
    text = jax.jit(index_keys_triton).trace(*_index_avals(dtype, **V32_INDEX)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "dsa_index_scores_triton" in text
    if dtype == jnp.bfloat16:
        sds = jax.ShapeDtypeStruct
        for cols, n_seg in ((None, 16), (sds((8, 8192), jnp.int32), 1)):
            seg_topk = functools.partial(segment_topk_triton, k=2048, n_seg=n_seg)
            assert "dsa_segment_topk_triton" in jax.jit(seg_topk).trace(
                sds((8, 8192), jnp.int32), cols).lower(lowering_platforms=("cuda",)).as_text()
        smla = functools.partial(sparse_mla_triton, sm_scale=0.1, num_splits=2)
        assert "sparse_mla_triton" in jax.jit(smla).trace(
            sds((1, 4, 128, 512), dtype), sds((1, 4, 128, 64), dtype), sds((4096, 576), dtype),
            sds((1, 4, 2048), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()


ODD_K_CASES = [("odd_k_tournament", 1, 40, 9000, None, 1000, {}),  # 8K segments at k = 1000
               ("odd_k_short_fp8", 1, 5, 77, None, 2048, dict(fp8=True, segments=True))]


@pytest.mark.parametrize("case", check_dsa_gpu.INDEX_CASES + ODD_K_CASES, ids=lambda c: c[0])
def test_triton_index_topk_lowers_for_cuda_at_the_gpu_check_shapes(case, monkeypatch):
    # the whole triton index_topk (chunk loop, score kernel, segment top-k tournament) lowered
    # for CUDA as on a GPU: the Triton lowering refuses any in-kernel array whose size is not a
    # power of two (interpret mode does not), e.g. k = min(topk, T) = 257 for rows shorter
    # than k; at the GPU check's shapes and at ks that are not powers of two
    monkeypatch.setattr(backends, "platform", lambda: "gpu")
    _, b, s, t, _, topk, opts = case
    sds = jax.ShapeDtypeStruct
    i32 = jnp.int32
    seg = (sds((b, s), i32), sds((b, t), i32)) if opts.get("segments") else None

    def fn(q, w, k, off, seg):
        return dsa_ops.index_topk(q, w, k, topk, q_offset=off, segment_ids=seg,
                                  fp8=opts.get("fp8", False), impl="triton")

    text = jax.jit(fn).trace(sds((b, s, 64, 128), jnp.bfloat16), sds((b, s, 64), jnp.float32),
                             sds((b, t, 128), jnp.bfloat16), sds((b,), i32), seg).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "dsa_index_scores_triton" in text and "dsa_segment_topk_triton" in text


def test_triton_score_kernel_refuses_a_block_q_not_a_power_of_two():
    q, w, k, off = index_problem(10)
    with pytest.raises(ValueError, match="block_q must be a power of two"):
        dsa_ops.index_topk(q, w, k, 4, impl="triton", interpret=True, config={"block_q": 3})


def test_tpu_kernels_lower_for_tpu(monkeypatch):
    # a pretend TPU v5e through a private registry, as tests/test_pooled_scores_tpu.py does:
    # checks the block-shape rules and that every op has a Mosaic lowering rule
    from jax._src.pallas.mosaic import tpu_info
    if not all(hasattr(tpu_info, a) for a in ("registry", "get_tpu_info_for_chip", "ChipVersion")):
        pytest.skip("jax's private TPU info API changed")
    monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind,
                        lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1))
    sds = jax.ShapeDtypeStruct
    cases = [
        (index_keys_tpu, _index_avals(jnp.bfloat16, 1, 256, 64, 128, 1000)),
        (functools.partial(kth_key_tpu, k=2048), (sds((64, 16384), jnp.int32),)),
        (functools.partial(sparse_mla_tpu, sm_scale=0.1),
         (sds((1, 8, 128, 512), jnp.bfloat16), sds((1, 8, 128, 64), jnp.bfloat16),
          sds((4096, 576), jnp.bfloat16), sds((1, 8, 2048), jnp.int32))),
    ]
    try:
        for fn, avals in cases:
            text = jax.jit(fn).trace(*avals).lower(lowering_platforms=("tpu",)).as_text()
            assert "tpu_custom_call" in text
    finally:
        tpu_info.get_tpu_info.cache_clear()  # no pretend TPU for later interpret-mode tests
