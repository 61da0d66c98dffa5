"""One-pass pooled softmax scores (Pallas GPU, Triton lowering): interpret mode on the CPU
against the chunked-XLA reference :func:`jaxprefill.sparse.estimators.block_softmax_scores`.

Interpret mode fills the outputs with NaN before the kernel runs, so the cells of key tiles a
program never visits stay NaN in ``part``: a NaN-free result checks the epilogue's masking. On
the CPU the kernel is also lowered for ``cuda`` (Triton IR generation and the tensor-size rules
of the lowering; the Triton compile itself needs a GPU).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gpu.pooled_scores_triton import pooled_block_scores_triton
from pallas_kernels.tpu.pooled_scores_tpu import pooled_block_scores_tpu
from pooled_scores_cases import pooled_inputs, pooled_reference

_TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-6), jnp.bfloat16: dict(rtol=2e-2, atol=1e-3)}


def _kernel(qx, kx, valid_rows, row_start, **kw):
    return pooled_block_scores_triton(qx, kx, valid_rows, row_start, interpret=True, **kw)


def _close(out, ref, dtype):
    out, ref = np.asarray(out), np.asarray(ref)
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, ref, **_TOL[dtype])


# (pool, r, Hq, Hkv, Dx, block_m, block_n, block_d, dtype)
_CASES = [
    ("sum", 16, 4, 1, 256, 64, 64, 128, jnp.float32),  # Dx in two chunks, GQA 4
    ("max", 16, 3, 1, 256, 32, 32, 128, jnp.float32),  # GQA 3 (SmolLM2's ratio)
    ("sum", 8, 3, 1, 96, 32, 32, 32, jnp.float32),  # three chunks
    ("max", 8, 2, 2, 64, 64, 32, 128, jnp.float32),  # Dx in one chunk (q loaded once)
    ("sum", 8, 6, 2, 48, 32, 64, 128, jnp.float32),  # Dx padded 48 -> 64
    ("max", 16, 4, 2, 128, 64, 16, 64, jnp.float32),  # r = block_n: one cell per tile
    ("sum", 16, 3, 1, 256, 64, 32, 128, jnp.bfloat16),
    ("max", 8, 4, 1, 128, 32, 64, 64, jnp.bfloat16),
]


@pytest.mark.parametrize("pool,r,hq,hkv,dx,bm,bn,bd,dtype", _CASES)
def test_matches_block_softmax_scores(pool, r, hq, hkv, dx, bm, bn, bd, dtype):
    # 160 rows: padded to the tiles; valid lengths odd, one well inside the padding.
    qx, kx = pooled_inputs(hq * 100 + dx, 2, 160, 160, hq, hkv, dx, dtype)
    vr = jnp.array([157, 61], jnp.int32)
    scale = dx ** -0.5
    out = _kernel(qx, kx, vr, jnp.zeros(2, jnp.int32), r=r, scale=scale, pool=pool,
                  block_m=bm, block_n=bn, block_d=bd)
    assert out.shape == (2, hq, 160 // r, 160 // r) and out.dtype == jnp.float32
    _close(out, pooled_reference(qx, kx, r, vr, scale, pool), dtype)


@pytest.mark.parametrize("pool,r", [("sum", 16), ("max", 8)])
def test_row_window_equals_whole_prompt_rows(pool, r):
    B, M, Mq, Hq, Hkv, Dx = 2, 192, 64, 3, 1, 64
    qfull, kx = pooled_inputs(7, B, M, M, Hq, Hkv, Dx, jnp.float32)
    vr = jnp.array([181, 150], jnp.int32)  # row 1's window runs past its valid rows
    rs = jnp.array([32, 96], jnp.int32)
    qx = jnp.stack([qfull[b, int(rs[b]):int(rs[b]) + Mq] for b in range(B)])
    kw = dict(r=r, scale=0.2, pool=pool, block_m=32, block_n=32, block_d=64)
    out = _kernel(qx, kx, vr, rs, **kw)
    whole = pooled_reference(qfull, kx, r, vr, 0.2, pool)
    rows = jnp.stack([whole[b, :, int(rs[b]) // r:(int(rs[b]) + Mq) // r] for b in range(B)])
    _close(out, rows, jnp.float32)
    _close(out, pooled_reference(qx, kx, r, vr, 0.2, pool, row_start=rs), jnp.float32)


@pytest.mark.parametrize("pool", ["sum", "max"])
def test_invalid_rows_are_exactly_zero(pool):
    r, M = 8, 128
    qx, kx = pooled_inputs(11, 2, M, M, 2, 1, 32, jnp.float32)
    vr = jnp.array([37, 5], jnp.int32)
    out = np.asarray(_kernel(qx, kx, vr, jnp.zeros(2, jnp.int32), r=r, scale=0.3, pool=pool,
                             block_m=32, block_n=32, block_d=32))
    assert not np.isnan(out).any()
    for b, v in enumerate(np.asarray(vr)):
        first_dead = -(-v // r)  # query blocks whose rows are all >= valid_rows
        assert (out[b, :, first_dead:] == 0).all()
        assert (out[b, :, :, first_dead:] == 0).all()  # no valid column there either
    _close(out, pooled_reference(qx, kx, r, vr, 0.3, pool), jnp.float32)
    if pool == "sum":  # each valid row's softmax sums to 1
        np.testing.assert_allclose(out.sum(axis=(2, 3)), np.broadcast_to(
            np.asarray(vr, np.float32)[:, None], out.shape[:2]), rtol=1e-5)


def test_rows_past_the_keys_never_see_padded_keys():
    # A window whose rows run past the 96 keys (padded to 128 by block_n = 64) with valid_rows
    # beyond Mk: the zero keys of the padding must stay invisible (the reference has no such
    # columns), although causality alone would let rows 96.. see them.
    qx, kx = pooled_inputs(5, 2, 32, 96, 2, 1, 32, jnp.float32)
    vr = jnp.array([120, 100], jnp.int32)
    rs = jnp.array([80, 64], jnp.int32)
    out = _kernel(qx, kx, vr, rs, r=16, scale=0.3, pool="sum", block_m=32, block_n=64,
                  block_d=32)
    _close(out, pooled_reference(qx, kx, 16, vr, 0.3, "sum", row_start=rs), jnp.float32)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])  # both kernels share the checks
def test_argument_validation(backend):
    qx, kx = pooled_inputs(3, 1, 64, 64, 4, 2, 32, jnp.float32)
    vr, rs = jnp.array([64], jnp.int32), jnp.zeros(1, jnp.int32)
    kernel = _kernel if backend == "gpu" else functools.partial(pooled_block_scores_tpu,
                                                                 interpret=True)
    run = functools.partial(kernel, scale=1.0)
    with pytest.raises(ValueError, match="pool"):
        run(qx, kx, vr, rs, r=8, pool="mean")
    with pytest.raises(ValueError, match="r must be"):
        run(qx, kx, vr, rs, r=12)
    with pytest.raises(ValueError, match="r must be"):
        run(qx, kx, vr, rs, r=32, block_n=16)
    with pytest.raises(ValueError, match="block_m"):
        run(qx, kx, vr, rs, r=8, block_m=48)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        run(qx, kx[:, :, :1].repeat(3, axis=2), vr, rs, r=8)
    with pytest.raises(ValueError, match="batch or Dx"):
        run(qx, kx[..., :16], vr, rs, r=8)
    with pytest.raises(ValueError, match="multiples of r"):
        run(qx[:, :60], kx, vr, rs, r=8)
    with pytest.raises(ValueError, match="valid_rows"):
        run(qx, kx, jnp.array([64, 64], jnp.int32), rs, r=8)


@pytest.mark.parametrize("dx,r,pool,hq", [(1024, 16, "sum", 4), (128, 8, "max", 3)])
def test_lowers_for_cuda(dx, r, pool, hq):
    # XAttention (Dx = stride * 128, sum) and ProxyAttn (Dx = 128, max) shapes, default tiles.
    qx = jax.ShapeDtypeStruct((1, 512, hq, dx), jnp.bfloat16)
    kx = jax.ShapeDtypeStruct((1, 512, 1, dx), jnp.bfloat16)
    i32 = jax.ShapeDtypeStruct((1,), jnp.int32)
    f = functools.partial(pooled_block_scores_triton, r=r, scale=0.1, pool=pool)
    text = jax.jit(f).trace(qx, kx, i32, i32).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text
