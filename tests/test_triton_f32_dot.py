"""The ``f32_dot`` choice shared by the Triton kernels (_triton_common.f32_dot_precision).

On a GPU float32 dots default to three TF32 products (timed against the exact ``ieee`` in
scripts/benchmarks/bench_f32_attention.py and scripts/benchmarks/bench_f32_estimation.py); in interpret mode every
choice multiplies exactly, so the kernels must still match their float32 references here, and
an unknown choice is refused by name by every kernel that takes one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pallas_kernels.estimation import last_query_sums_reference
from pallas_kernels.gpu._triton_common import F32_DOTS, f32_dot_precision
from pallas_kernels.gpu.last_query_stats_triton import last_query_sums_triton
from pallas_kernels.gpu.mla_decode_triton import mla_decode_triton
from pallas_kernels.gpu.pooled_scores_triton import pooled_block_scores_triton
from pallas_kernels.mla_reference import mla_decode_reference


def test_precision_per_dtype_and_mode():
    assert f32_dot_precision("tf32x3", jnp.bfloat16, False) is None  # 16-bit: the default dot
    assert f32_dot_precision("tf32x3", jnp.float32, False) == F32_DOTS["tf32x3"]
    assert f32_dot_precision("tf32", jnp.float32, False) == lax.DotAlgorithmPreset.TF32_TF32_F32
    for dot in F32_DOTS:  # interpret mode: exact (CPUs have no TF32)
        assert f32_dot_precision(dot, jnp.float32, True) == lax.Precision.HIGHEST
    with pytest.raises(ValueError, match="f32_dot must be one of"):
        f32_dot_precision("fp64", jnp.bfloat16, False)  # refused even where it would not apply


def _lqs_inputs():
    kq, kk = jax.random.split(jax.random.key(3))
    q = jax.random.normal(kq, (1, 4, 16, 32), jnp.float32)
    k = jax.random.normal(kk, (1, 77, 2, 32), jnp.float32)
    return q, k, jnp.asarray([77], jnp.int32)


@pytest.mark.parametrize("dot", ["tf32x3", "ieee"])
def test_last_query_sums_f32_dot_interpret(dot):
    q, k, lens = _lqs_inputs()
    vert, slash = last_query_sums_triton(q, k, lens, scale=0.3, block_k=32, interpret=True,
                                         f32_dot=dot)
    v_ref, s_ref = last_query_sums_reference(q, k, lens, scale=0.3)
    np.testing.assert_allclose(vert, v_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(slash, s_ref, rtol=1e-5, atol=1e-6)


def test_kernels_refuse_unknown_f32_dot():
    q, k, lens = _lqs_inputs()
    with pytest.raises(ValueError, match="f32_dot must be one of"):
        last_query_sums_triton(q, k, lens, scale=0.3, block_k=32, interpret=True, f32_dot="x")
    qx = jax.random.normal(jax.random.key(4), (1, 64, 4, 32), jnp.float32)
    kx = jax.random.normal(jax.random.key(5), (1, 64, 2, 32), jnp.float32)
    zero = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="f32_dot must be one of"):
        pooled_block_scores_triton(qx, kx, zero + 64, zero, r=16, scale=0.2, interpret=True,
                                   f32_dot="x")


@pytest.mark.parametrize("dot", ["tf32x3", "tf32"])
def test_mla_decode_triton_f32_dot_interpret(dot):
    ks = jax.random.split(jax.random.key(6), 3)
    ql = jax.random.normal(ks[0], (2, 4, 64), jnp.float32)
    qp = jax.random.normal(ks[1], (2, 4, 16), jnp.float32)
    cache = jax.random.normal(ks[2], (6, 16, 80), jnp.float32)
    table = jnp.asarray([[4, 0, 2], [1, 5, 3]], jnp.int32)
    lens = jnp.asarray([40, 17], jnp.int32)
    out, lse = mla_decode_triton(ql, qp, cache, table, lens, sm_scale=0.1, interpret=True,
                                 f32_dot=dot)
    ref_out, ref_lse = mla_decode_reference(ql, qp, cache, table, lens, 0.1)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
