"""One-pass pooled softmax scores (Pallas TPU, Mosaic) in TPU interpret mode on the CPU, against
the chunked-XLA reference :func:`jaxprefill.sparse.estimators.block_softmax_scores`.

Interpret mode fills uninitialized memory (outputs, VMEM) with NaN, so the cells of key tiles a
query tile never visits stay NaN in the kernel's partials: a NaN-free result checks the
epilogue's masking. Inputs are fresh random draws; the seed is in every assert message.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.tpu.pooled_scores_tpu import pooled_block_scores_tpu
from pooled_scores_cases import pooled_inputs, pooled_reference

_RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # relative L2 error


def _interp(**kw):
    return pltpu.InterpretParams(uninitialized_memory="nan", **kw)


def _seed() -> int:
    return int(np.random.default_rng().integers(2**31))


def _kernel(qx, kx, valid_rows, row_start, interpret=None, **kw):
    """The kernel, waited for before anything else is dispatched: a TPU-interpret kernel runs
    Python callbacks that need the GIL, and eager JAX ops dispatched behind it can fill the CPU
    client's in-flight queue and wait on it holding the GIL (seen as a hang under xdist)."""
    return jax.block_until_ready(pooled_block_scores_tpu(qx, kx, valid_rows, row_start,
                                                         interpret=interpret or _interp(), **kw))


def _close(out, ref, dtype, seed):
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape and out.dtype == np.float32, f"seed={seed}"
    assert not np.isnan(out).any(), f"NaN in the output, seed={seed}"
    err = np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)
    assert err < _RTOL[dtype], f"relative L2 error {err:.3g}, seed={seed}"


# (pool, r, Hq, Hkv, Dx, block_m, block_n, dtype)
_CASES = [
    ("sum", 16, 4, 1, 256, 32, 32, jnp.float32),  # GQA 4, Dx 256
    ("max", 16, 3, 1, 64, 32, 64, jnp.float32),  # GQA 3 (SmolLM2's ratio)
    ("sum", 8, 4, 2, 64, 64, 8, jnp.float32),  # r = block_n: one cell per key tile
    ("max", 8, 3, 1, 256, 32, 32, jnp.bfloat16),
    ("sum", 16, 3, 1, 64, 16, 64, jnp.bfloat16),
]


@pytest.mark.parametrize("pool,r,hq,hkv,dx,bm,bn,dtype", _CASES)
def test_matches_block_softmax_scores(pool, r, hq, hkv, dx, bm, bn, dtype):
    # 80 rows: padded to the tiles; valid lengths odd and different per batch row.
    seed = _seed()
    qx, kx = pooled_inputs(seed, 2, 80, 80, hq, hkv, dx, dtype)
    vr = jnp.array([77, 29], jnp.int32)
    scale = dx ** -0.5
    out = _kernel(qx, kx, vr, jnp.zeros(2, jnp.int32), r=r, scale=scale, pool=pool,
                  block_m=bm, block_n=bn)
    _close(out, pooled_reference(qx, kx, r, vr, scale, pool), dtype, seed)


@pytest.mark.parametrize("pool,r", [("sum", 16), ("max", 8)])
def test_row_window_equals_whole_prompt_rows(pool, r):
    seed = _seed()
    B, M, Mq, Hq, Hkv, Dx = 2, 128, 48, 3, 1, 64
    qfull, kx = pooled_inputs(seed, B, M, M, Hq, Hkv, Dx, jnp.float32)
    vr = jnp.array([117, 101], jnp.int32)  # row 1's window runs past its valid rows
    rs = jnp.array([32, 64], jnp.int32)
    qx = jnp.stack([qfull[b, int(rs[b]):int(rs[b]) + Mq] for b in range(B)])
    out = _kernel(qx, kx, vr, rs, r=r, scale=0.2, pool=pool, block_m=16, block_n=32)
    whole = pooled_reference(qfull, kx, r, vr, 0.2, pool)
    rows = jnp.stack([whole[b, :, int(rs[b]) // r:(int(rs[b]) + Mq) // r] for b in range(B)])
    _close(out, rows, jnp.float32, seed)
    _close(out, pooled_reference(qx, kx, r, vr, 0.2, pool, row_start=rs), jnp.float32, seed)


@pytest.mark.parametrize("pool", ["sum", "max"])
def test_invalid_rows_are_exactly_zero(pool):
    seed, r = _seed(), 8
    qx, kx = pooled_inputs(seed, 2, 64, 64, 2, 1, 64, jnp.float32)
    vr = jnp.array([37, 5], jnp.int32)
    out = np.asarray(_kernel(qx, kx, vr, 0, r=r, scale=0.3, pool=pool, block_m=16,
                             block_n=16))
    assert not np.isnan(out).any(), f"seed={seed}"
    for b, v in enumerate(np.asarray(vr)):
        first_dead = -(-v // r)  # cells whose rows (or columns) are all >= valid_rows
        assert (out[b, :, first_dead:] == 0).all(), f"seed={seed}"
        assert (out[b, :, :, first_dead:] == 0).all(), f"seed={seed}"
    _close(out, pooled_reference(qx, kx, r, vr, 0.3, pool), jnp.float32, seed)
    if pool == "sum":  # each valid row's softmax sums to 1
        np.testing.assert_allclose(out.sum(axis=(2, 3)), np.broadcast_to(
            np.asarray(vr, np.float32)[:, None], out.shape[:2]), rtol=1e-5,
            err_msg=f"seed={seed}")


def test_rows_past_the_keys_never_see_padded_keys():
    # A window whose rows run past the 48 keys (padded to 64 by block_n = 32) with valid_rows
    # beyond Mk: the zero keys of the padding must stay invisible (the reference has no such
    # columns), although causality alone would let rows 48.. see them.
    seed = _seed()
    qx, kx = pooled_inputs(seed, 2, 32, 48, 2, 1, 64, jnp.float32)
    vr = jnp.array([70, 60], jnp.int32)
    rs = jnp.array([32, 16], jnp.int32)
    out = _kernel(qx, kx, vr, rs, r=16, scale=0.3, pool="sum", block_m=16, block_n=32)
    _close(out, pooled_reference(qx, kx, 16, vr, 0.3, "sum", row_start=rs), jnp.float32, seed)


def test_default_blocks_clamp_and_scalar_arguments():
    # Defaults (128 x 512) clamp to one tile of each; valid_rows and row_start as scalars.
    seed = _seed()
    qx, kx = pooled_inputs(seed, 1, 48, 48, 4, 2, 64, jnp.bfloat16)
    out = _kernel(qx, kx, 45, 0, r=16, scale=0.125, pool="max")
    vr = jnp.array([45], jnp.int32)
    _close(out, pooled_reference(qx, kx, 16, vr, 0.125, "max"), jnp.bfloat16, seed)


def test_no_races_two_cores():
    seed = _seed()
    qx, kx = pooled_inputs(seed, 2, 32, 32, 2, 1, 64, jnp.float32)
    vr = jnp.array([31, 19], jnp.int32)
    out = _kernel(qx, kx, vr, 0, r=8, scale=0.2, pool="sum", block_m=16, block_n=16,
                  interpret=_interp(detect_races=True, num_cores_or_threads=2))
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as mosaic_interpret
    assert mosaic_interpret.races is not None and not mosaic_interpret.races.races_found
    _close(out, pooled_reference(qx, kx, 8, vr, 0.2, "sum"), jnp.float32, seed)


@pytest.mark.parametrize("dx,r,pool,dtype", [(2048, 16, "sum", jnp.bfloat16),
                                             (128, 8, "max", jnp.float32)])
def test_lowers_to_mosaic_at_default_tiles(monkeypatch, dx, r, pool, dtype):
    # XAttention-like (Dx = stride * 128, sum) and ProxyAttn-like (Dx = 128, max) shapes at the
    # default 128 x 512 tiles, lowered for a pretend TPU v5e through a private registry: checks
    # the TPU block-shape rules (last two block dims divisible by (8, 128) or whole) and that
    # every op has a Mosaic lowering rule. Mosaic's own compile (layouts) needs a real TPU.
    from jax._src.pallas.mosaic import tpu_info
    if not all(hasattr(tpu_info, a) for a in ("registry", "get_tpu_info_for_chip", "ChipVersion")):
        pytest.skip("jax's private TPU info API changed")
    kind = jax.devices()[0].device_kind
    monkeypatch.setitem(tpu_info.registry, kind,
                        lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1))
    qx = jax.ShapeDtypeStruct((1, 1024, 4, dx), dtype)
    kx = jax.ShapeDtypeStruct((1, 1024, 1, dx), dtype)
    i32 = jax.ShapeDtypeStruct((1,), jnp.int32)
    f = functools.partial(pooled_block_scores_tpu, r=r, scale=0.1, pool=pool)
    try:
        text = jax.jit(f).trace(qx, kx, i32, i32).lower(lowering_platforms=("tpu",)).as_text()
    finally:
        tpu_info.get_tpu_info.cache_clear()  # no pretend TPU for later interpret-mode tests
    assert "tpu_custom_call" in text
