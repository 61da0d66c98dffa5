"""Pallas TPU last-query vertical/slash sums in TPU interpret mode (CPU), against the float32
reference :func:`pallas_kernels.estimation.last_query_sums_reference`.

Fresh random inputs each run (the seed is in every assert message). Interpret mode fills
uninitialized memory with NaN, so an output element the kernel never writes shows up as NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as mosaic_interpret
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.estimation import last_query_sums_reference
from pallas_kernels.tpu.last_query_stats_tpu import last_query_sums_tpu


def _interp(**kw):
    return pltpu.InterpretParams(uninitialized_memory="nan", **kw)


def _inputs(b, s, hq, hkv, r, d, dtype):
    seed = int(np.random.default_rng().integers(2**31))
    kq, kk = jax.random.split(jax.random.key(seed))
    q = jax.random.normal(kq, (b, hq, r, d), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, s, hkv, d), jnp.float32).astype(dtype)
    return q, k, seed


def _check(vert, slash, q, k, lens, *, scale, seed, bf16=False):
    msg = f"seed={seed} lengths={np.asarray(lens).tolist()}"
    v_ref, s_ref = (np.asarray(x) for x in last_query_sums_reference(q, k, lens, scale=scale))
    vert, slash = np.asarray(vert), np.asarray(slash)
    assert vert.shape == slash.shape == v_ref.shape and vert.dtype == np.float32, msg
    assert not np.isnan(vert).any() and not np.isnan(slash).any(), msg
    for i, length in enumerate(np.asarray(lens)):  # keys / offsets past the row: exactly 0
        assert not vert[i, :, length:].any() and not slash[i, :, length:].any(), msg
    if bf16:
        for out, ref in ((vert, v_ref), (slash, s_ref)):
            rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
            assert rel < 2e-2, f"{msg} relative L2 {rel}"
    else:
        np.testing.assert_allclose(vert, v_ref, rtol=1e-5, atol=1e-6, err_msg=msg)
        np.testing.assert_allclose(slash, s_ref, rtol=1e-5, atol=1e-6, err_msg=msg)
    # every query that sees a key contributes a probability row summing to 1
    n_rows, hq = q.shape[2], q.shape[1]
    seen = np.minimum(np.asarray(lens), n_rows) * hq
    tol = 2e-2 if bf16 else 1e-5
    np.testing.assert_allclose(vert.sum(axis=(1, 2)), seen, rtol=tol, err_msg=msg)
    np.testing.assert_allclose(slash.sum(axis=(1, 2)), seen, rtol=tol, err_msg=msg)


def _run(*args, **kw):
    """The kernel, waited for before anything else is dispatched: a TPU-interpret kernel runs
    Python callbacks that need the GIL, and eager JAX ops dispatched behind it can fill the CPU
    client's in-flight queue and wait on it holding the GIL (seen as a hang under xdist)."""
    return jax.block_until_ready(last_query_sums_tpu(*args, **kw))


@pytest.mark.parametrize("b,s,hq,hkv,r,d,lengths,block_k", [
    (2, 77, 6, 2, 16, 64, (77, 9), 32),      # GQA 3, odd S (padded), a row shorter than R
    (2, 131, 4, 1, 64, 80, (131, 1), 64),    # GQA 4, R 64, D 80 (padded), a length-1 row
    (1, 45, 2, 2, 16, 64, ("rand",), 16),    # GQA 1, a random length
])
def test_matches_reference_f32(b, s, hq, hkv, r, d, lengths, block_k):
    q, k, seed = _inputs(b, s, hq, hkv, r, d, jnp.float32)
    rng = np.random.default_rng(seed)
    lens = jnp.asarray([rng.integers(1, s + 1) if x == "rand" else x for x in lengths], jnp.int32)
    vert, slash = _run(q, k, lens, scale=0.4, block_k=block_k,
                                      interpret=_interp())
    _check(vert, slash, q, k, lens, scale=0.4, seed=seed)


def test_bf16_and_vertical_only():
    q, k, seed = _inputs(2, 96, 8, 2, 64, 80, jnp.bfloat16)  # GQA 4, R 64, D 80
    lens = jnp.asarray([96, 37], jnp.int32)
    vert, slash = _run(q, k, lens, scale=0.125, block_k=64, interpret=_interp())
    _check(vert, slash, q, k, lens, scale=0.125, seed=seed, bf16=True)
    vert_only, none = _run(q, k, lens, scale=0.125, block_k=64, slash=False,
                                          interpret=_interp())
    assert none is None
    np.testing.assert_array_equal(np.asarray(vert_only), np.asarray(vert), err_msg=f"seed={seed}")


def test_default_block_clamped_and_no_races():
    """block_k=512 clamps to 256 for S = 200; two simulated cores find no race."""
    q, k, seed = _inputs(2, 200, 3, 1, 16, 64, jnp.float32)  # GQA 3
    lens = jnp.asarray([200, 130], jnp.int32)
    vert, slash = _run(q, k, lens, scale=0.3,
                                      interpret=_interp(detect_races=True, num_cores_or_threads=2))
    assert mosaic_interpret.races is not None and not mosaic_interpret.races.races_found
    _check(vert, slash, q, k, lens, scale=0.3, seed=seed)


@pytest.mark.parametrize("q_shape,k_shape,lens_shape,match", [
    ((1, 4, 16, 32), (1, 64, 3, 32), (1,), "Hq % Hkv"),
    ((1, 4, 16, 32), (1, 64, 2, 48), (1,), "shape mismatch"),
    ((2, 4, 16, 32), (1, 64, 2, 32), (2,), "shape mismatch"),
    ((4, 16, 32), (1, 64, 2, 32), (1,), "expected q_last"),
    ((1, 4, 16, 32), (1, 64, 2, 32), (2,), "lengths shape"),
])
def test_bad_inputs_raise(q_shape, k_shape, lens_shape, match):
    with pytest.raises(ValueError, match=match):
        last_query_sums_tpu(jnp.zeros(q_shape), jnp.zeros(k_shape),
                            jnp.ones(lens_shape, jnp.int32), scale=1.0, interpret=_interp())
