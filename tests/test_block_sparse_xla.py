"""Reference and XLA block-sparse attention against a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import BlockSparseLayout, SegmentIds, block_sparse_attention
from pallas_kernels.testing import assert_close, numpy_reference, random_problem, run_problem

attend = jax.jit(block_sparse_attention, static_argnames=("causal", "return_lse", "impl"))


@st.composite
def problems(draw, max_len=130):
    causal = draw(st.booleans())
    sq = draw(st.one_of(st.just(77), st.integers(1, max_len)))
    sk = draw(st.one_of(st.just(sq), st.integers(1, max_len)))
    dqk, dv = draw(st.sampled_from([(32, 32), (192, 128), (16, 48)]))
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        B=draw(st.sampled_from([1, 2])), Sq=sq, Sk=sk,
        Hkv=draw(st.sampled_from([1, 2])), G=draw(st.sampled_from([1, 4, 8])),
        Dqk=dqk, Dv=dv,
        block_q=draw(st.sampled_from([16, 32])), block_k=draw(st.sampled_from([16, 32])),
        per_kv_head=draw(st.booleans()),
        density=draw(st.sampled_from([0.3, 0.7, 1.0])),
        causal=causal,
        q_offset=draw(st.sampled_from([0, "chunk", "random"])),
        segments=draw(st.booleans()),
        bf16=draw(st.booleans()),
    )


def _make(cfg):
    cfg = dict(cfg)
    G, bf16 = cfg.pop("G"), cfg.pop("bf16")
    cfg["Hq"] = cfg["Hkv"] * G
    return random_problem(dtype=jnp.bfloat16 if bf16 else np.float32, **cfg), bf16


@pytest.mark.parametrize("impl", ["reference", "xla"])
@settings(max_examples=10, deadline=None)
@given(cfg=problems())
def test_matches_float64_numpy(impl, cfg):
    p, bf16 = _make(cfg)
    out, lse = jax.jit(lambda: run_problem(p, impl))()
    assert out.dtype == p.q.dtype and lse.dtype == jnp.float32
    assert_close(out, lse, *p.reference(), low_precision=bf16)


@pytest.mark.parametrize("per_kv_head", [True, False])
def test_xla_long_odd_length(per_kv_head):
    p = random_problem(7, B=1, Sq=1000, Sk=1000, Hq=8, Hkv=2, Dqk=64, Dv=32, block_q=128,
                       block_k=64, per_kv_head=per_kv_head, density=0.6, segments=True)
    out, lse = jax.jit(lambda: run_problem(p, "xla"))()
    assert_close(out, lse, *p.reference(), low_precision=False)


def test_dense_causal_equals_jax_nn():
    rng = np.random.default_rng(1)
    B, S, Hq, Hkv, D = 2, 77, 8, 2, 32
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in [(B, S, Hq, D), (B, S, Hkv, D), (B, S, Hkv, D)])
    lay = BlockSparseLayout.dense_causal(B, Hkv, S, S, 16, 32)
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    for impl in ("reference", "xla"):
        got = attend(q, k, v, lay, impl=impl)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_single_segment_array_and_scalar_offset_and_empty_layout():
    p = random_problem(3, B=2, Sq=50, Sk=50, Hq=4, Hkv=2, segments=True, q_offset=5)
    seg = p.seg_kv  # the same ids for q and kv
    q, k, v = map(jnp.asarray, (p.q, p.k, p.v))
    lay = BlockSparseLayout.from_block_mask(p.block_mask, 16, 16)
    ref_out, ref_lse = numpy_reference(p.q, p.k, p.v, p.block_mask, 16, 16, causal=True,
                                       q_offset=5, seg_q=seg, seg_kv=seg)
    for impl in ("reference", "xla"):
        out, lse = attend(q, k, v, lay, q_offset=5, segment_ids=jnp.asarray(seg),
                          return_lse=True, impl=impl)
        assert_close(out, lse, ref_out, ref_lse, low_precision=False)
    # A layout that lists nothing: zeros and -inf, never NaN.
    empty = BlockSparseLayout.from_block_mask(np.zeros_like(p.block_mask), 16, 16)
    out, lse = attend(q, k, v, empty, return_lse=True, impl="xla")
    assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))


def test_input_validation_and_auto_impl():
    p = random_problem(0, Sq=32, Sk=32, Hq=4, Hkv=2)
    q, k, v = map(jnp.asarray, (p.q, p.k, p.v))
    lay = BlockSparseLayout.from_block_mask(p.block_mask, 16, 16)
    with pytest.raises(ValueError, match="layout grid"):
        block_sparse_attention(q[:, :20], k, v, BlockSparseLayout.dense(1, 2, 64, 32, 16, 16))
    with pytest.raises(ValueError, match="heads"):
        block_sparse_attention(q, k, v, BlockSparseLayout.dense(1, 3, 32, 32, 16, 16))
    with pytest.raises(ValueError, match="impl"):
        block_sparse_attention(q, k, v, lay, impl="cuda")
    with pytest.raises(ValueError, match="SegmentIds"):
        block_sparse_attention(q[:, :16], k, v, BlockSparseLayout.dense(1, 2, 16, 32, 16, 16),
                               segment_ids=jnp.zeros((1, 32), jnp.int32))
    if jax.default_backend() == "cpu":
        auto = block_sparse_attention(q, k, v, lay, impl="auto")
        xla = block_sparse_attention(q, k, v, lay, impl="xla")
        np.testing.assert_array_equal(np.asarray(auto), np.asarray(xla))


def test_device_built_layout_inside_jit():
    p = random_problem(5, B=2, Sq=64, Sk=64, Hq=4, Hkv=1, density=0.5)
    ref_out, ref_lse = p.reference()

    @jax.jit
    def f(q, k, v, mask):
        lay = BlockSparseLayout.from_block_mask(mask, 16, 16, max_nnz=4)
        return block_sparse_attention(q, k, v, lay, q_offset=jnp.asarray(p.q_offset),
                                      return_lse=True, impl="xla")

    out, lse = f(*map(jnp.asarray, (p.q, p.k, p.v, p.block_mask)))
    assert_close(out, lse, ref_out, ref_lse, low_precision=False)


@pytest.mark.parametrize("impl", ["reference", "xla", "triton", "mosaic_tpu"])
def test_batch_broadcast_layout_with_extra_padding(impl):
    # One layout (batch 1) shared by B=2, built on device with max_nnz > nk (padded entries),
    # per-batch q_offset; run through every impl (the Pallas ones in interpret mode).
    p = random_problem(8, B=2, Sq=40, Sk=56, Hq=4, Hkv=2, block_q=16, block_k=16,
                       q_offset="random", density=0.6)
    mask1 = p.block_mask[:1]
    p.block_mask = np.broadcast_to(mask1, p.block_mask.shape)
    lay = BlockSparseLayout.from_block_mask(jnp.asarray(mask1), 16, 16, max_nnz=6)
    assert lay.batch == 1 and lay.max_nnz == 6 > lay.num_kv_blocks
    kw = {}
    if impl == "mosaic_tpu":
        from jax.experimental.pallas import tpu as pltpu
        kw["interpret"] = pltpu.InterpretParams()
    elif impl == "triton":
        kw["interpret"] = True
    out, lse = block_sparse_attention(
        *map(jnp.asarray, (p.q, p.k, p.v)), lay, q_offset=jnp.asarray(p.q_offset),
        return_lse=True, impl=impl, **kw)
    assert_close(out, lse, *p.reference(), low_precision=False)


@pytest.mark.parametrize("impl", ["xla", "triton", "mosaic_tpu"])
def test_causal_boundary_offsets(impl):
    # All blocks listed, so only the in-kernel causal mask (and the kernels' mask-free prefix
    # test) separate j <= i + q_offset from j = i + q_offset + 1, at offsets around a block edge.
    p = random_problem(12, B=4, Sq=32, Sk=80, Hq=2, Hkv=1, block_q=16, block_k=16, density=1.0,
                       empty_row_frac=0.0)
    p.q_offset = np.array([14, 15, 16, 17], np.int32)
    kw = {}
    if impl == "mosaic_tpu":
        from jax.experimental.pallas import tpu as pltpu
        kw["interpret"] = pltpu.InterpretParams()
    elif impl == "triton":
        kw["interpret"] = True
    out, lse = run_problem(p, impl, **kw)
    assert_close(out, lse, *p.reference(), low_precision=False)
