"""Estimation kernels. Last-query vertical/slash sums: the Pallas GPU kernel (interpret mode) against the float32
reference and the XLA estimators, and the policies that use it with and without the kernel.

Fresh random inputs (never zeros), odd lengths, rows shorter than R (queries that see nothing),
GQA 1/3/4, a head dim that is not a power of two, f32 and bf16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprefill import sparse
from jaxprefill.eval.synthetic_qk import structured_qk
from jaxprefill.sparse import estimators as est
from jaxprefill.sparse.base import make_geometry
from jaxprefill.sparse.estimation import Estimation
from pallas_kernels.estimation import last_query_sums
from pallas_kernels.gpu.last_query_stats_triton import last_query_sums_triton


def _inputs(seed, b, s, hq, hkv, r, d, dtype):
    kq, kk = jax.random.split(jax.random.key(seed))
    q = jax.random.normal(kq, (b, hq, r, d), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, s, hkv, d), jnp.float32).astype(dtype)
    return q, k


@pytest.mark.parametrize("b,s,hq,hkv,r,d,lengths,block_k", [
    (2, 200, 6, 2, 16, 32, (200, 9), 32),      # GQA 3, odd S, a row shorter than R
    (1, 131, 4, 1, 32, 24, (131,), 64),         # GQA 4, head dim padded to 32, S padded
    (3, 96, 2, 2, 16, 16, (96, 17, 1), 16),     # MHA, a length-1 row
])
def test_kernel_matches_reference_f32(b, s, hq, hkv, r, d, lengths, block_k):
    q, k = _inputs(s + r, b, s, hq, hkv, r, d, jnp.float32)
    lens = jnp.asarray(lengths, jnp.int32)
    vert, slash = last_query_sums(q, k, lens, scale=0.4, impl="triton", interpret=True,
                                  block_k=block_k)
    v_ref, s_ref = last_query_sums(q, k, lens, scale=0.4, impl="reference")
    assert not np.isnan(np.asarray(vert)).any() and not np.isnan(np.asarray(slash)).any()
    np.testing.assert_allclose(vert, v_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(slash, s_ref, rtol=1e-5, atol=1e-6)
    # each query that sees a key contributes a probability row summing to 1
    rows_seen = np.minimum(np.asarray(lengths), r) * hq
    np.testing.assert_allclose(np.asarray(vert).sum(axis=(1, 2)), rows_seen, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(slash).sum(axis=(1, 2)), rows_seen, rtol=1e-5)


def test_kernel_bf16_and_bf16_skew_buffer():
    q, k = _inputs(7, 2, 160, 8, 2, 32, 64, jnp.bfloat16)
    lens = jnp.asarray([160, 77], jnp.int32)
    v_ref, s_ref = last_query_sums(q, k, lens, scale=0.125, impl="reference")
    for slash_dtype in (jnp.float32, jnp.bfloat16):
        vert, slash = last_query_sums_triton(q, k, lens, scale=0.125, block_k=32,
                                             slash_dtype=slash_dtype, interpret=True)
        np.testing.assert_allclose(vert, v_ref, rtol=2e-2, atol=2e-3)
        np.testing.assert_allclose(slash, s_ref, rtol=2e-2, atol=2e-3)
    vert_only, none = last_query_sums_triton(q, k, lens, scale=0.125, block_k=32, slash=False,
                                             interpret=True)
    assert none is None
    np.testing.assert_allclose(vert_only, vert, rtol=1e-6)


def test_estimator_dispatch_matches_the_xla_path():
    """est.last_q_sums through the kernel equals the XLA last_q_probs + reductions."""
    q, k = structured_qk(jax.random.key(3), 2, 384, 6, 2, 32, local=64, n_vertical=4,
                         dtype=jnp.float32)
    lens = jnp.asarray([384, 250], jnp.int32)
    v_x, s_x = est.last_q_sums(q, k, make_geometry(q, k, 64, lens, Estimation("xla")), 64)
    kernel = Estimation("triton", interpret=True)
    v_k, s_k = est.last_q_sums(q, k, make_geometry(q, k, 64, lens, kernel), 64)
    np.testing.assert_allclose(v_k, v_x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s_k, s_x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,params", [
    ("flexprefill", dict(gamma=0.9, min_budget=64)),
    ("minference", dict(vertical=40, slash=60, force_slash=20, last_q=32)),
    ("proxyattn", dict(gamma=0.9, stride=8, min_blocks=1)),
    ("pbs", dict(tau=0.9, segment=128)),
    ("xattention", dict(threshold=0.9, stride=8)),  # the pooled-scores kernel
])
def test_policies_give_the_same_layout_with_the_kernel(name, params):
    q, k = structured_qk(jax.random.key(4), 2, 640, 8, 2, 32, local=64, n_vertical=6,
                         dtype=jnp.float32)
    lens = jnp.asarray([640, 421], jnp.int32)
    masks = {}
    for impl in ("xla", "triton"):
        policy = sparse.get(name, block_size=64, estimation={"impl": impl, "interpret": True},
                            **params)
        masks[impl] = np.asarray(jax.jit(
            lambda a, b, l: policy.build(a, b, layer=3, lengths=l).to_block_mask())(q, k, lens))
    np.testing.assert_array_equal(masks["triton"], masks["xla"])


def test_bad_shapes_are_named():
    q, k = _inputs(1, 1, 64, 4, 3, 16, 16, jnp.float32)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        last_query_sums_triton(q, k, jnp.asarray([64]), scale=1.0, interpret=True)
    q, k = _inputs(1, 1, 64, 4, 2, 24, 16, jnp.float32)
    with pytest.raises(ValueError, match="powers of two"):
        last_query_sums_triton(q, k, jnp.asarray([64]), scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="unknown impl .cuda."):
        last_query_sums(q, k, jnp.asarray([64]), scale=1.0, impl="cuda")


def test_streaming_dense_heads(tmp_path):
    """streaming + head_config: listed KV heads get the dense causal layout, others stream."""
    import json
    cfg = tmp_path / "heads.json"
    cfg.write_text(json.dumps({"dense_heads": {"3": [1]}}))
    q = jax.random.normal(jax.random.key(9), (1, 512, 4, 16))
    k = jax.random.normal(jax.random.key(10), (1, 512, 2, 16))
    policy = sparse.get("streaming", block_size=64, sink=64, local=64,
                        head_config=str(cfg), heads="kv")
    m3 = np.asarray(policy.build(q, k, layer=3).to_block_mask())[0]  # [Hkv, n, n]
    m0 = np.asarray(policy.build(q, k, layer=0).to_block_mask())[0]
    causal = np.tril(np.ones((8, 8), bool))
    np.testing.assert_array_equal(m3[1], causal)
    np.testing.assert_array_equal(m3[0], m0[0])
    assert m0[1].sum() < causal.sum()  # layer 0 is not listed: every head streams
    cfg.write_text(json.dumps({"dense_heads": {"3": [5]}}))
    bad = sparse.get("streaming", block_size=64, head_config=str(cfg))
    from jaxprefill.sparse.streaming import load_dense_heads
    load_dense_heads.cache_clear()
    with pytest.raises(ValueError, match="KV head 5"):
        bad.build(q, k, layer=3)


def test_block_softmax_scores_rectangular_cells():
    """proxyattn key_stride: r query rows x rk key rows per block equals a direct computation."""
    q = jax.random.normal(jax.random.key(11), (1, 256, 2, 16))
    k = jax.random.normal(jax.random.key(12), (1, 256, 2, 16))
    geo = make_geometry(q, k, 64, jnp.asarray([200], jnp.int32))
    qs, ks = est.padded(q, geo)[:, ::8], est.padded(k, geo)[:, ::2]  # r = 8, rk = 32
    vr, vc = jnp.asarray([25]), jnp.asarray([100])
    out = np.asarray(est.block_softmax_scores(qs, ks, geo, 8, vr, 0.25, "max", rk=32,
                                              valid_cols=vc))
    s = np.einsum("qhd,khd->hqk", np.asarray(qs[0], np.float64), np.asarray(ks[0], np.float64))
    i, j = np.arange(32)[:, None], np.arange(128)[None, :]
    ok = (j * 2 <= i * 8) & (j < 100) & (i < 25)
    s = np.where(ok, 0.25 * s, -np.inf)
    with np.errstate(invalid="ignore"):  # rows past valid_rows: all -inf, zeroed below
        p = np.exp(s - s.max(-1, keepdims=True))
    p = np.where(ok, p / p.sum(-1, keepdims=True), 0.0)
    ref = p.reshape(2, 4, 8, 4, 32).max(axis=(2, 4))
    np.testing.assert_allclose(out[0], ref, rtol=1e-5, atol=1e-6)
