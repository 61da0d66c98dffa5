"""The attention dispatch: every backend agrees with the float32 reference on packed rows,
chunked queries (q_offset), GQA, windows and fully masked rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprefill.attention import AttentionSpec, attend, build_mask
from pallas_kernels.layout import structured_layout


def rand(key, shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def packed_segments(rng, batch, length):
    segs = np.zeros((batch, length), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), size=3, replace=False))
        for i, (a, c) in enumerate(zip([0, *cuts], [*cuts, length]), start=1):
            segs[b, a:c] = i
    return jnp.asarray(segs)


@pytest.mark.parametrize("impl", ["xla", "block_sparse", "auto"])
def test_packed_rows_match_reference(impl):
    b, s, hq, hkv, d = 2, 200, 8, 2, 16
    q, k, v = rand(0, (b, s, hq, d)), rand(1, (b, s, hkv, d)), rand(2, (b, s, hkv, d))
    segs = packed_segments(np.random.default_rng(0), b, s)
    ref = attend(q, k, v, segment_ids=(segs, segs), spec=AttentionSpec("reference"))
    out = attend(q, k, v, segment_ids=(segs, segs), spec=AttentionSpec(impl))
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("impl", ["xla", "block_sparse"])
def test_chunk_with_q_offset_matches_reference(impl):
    b, sq, sk, hq, hkv, d = 2, 70, 300, 4, 4, 32
    q, k, v = rand(3, (b, sq, hq, d)), rand(4, (b, sk, hkv, d)), rand(5, (b, sk, hkv, d))
    off = jnp.asarray([230, 100], jnp.int32)  # row 1: keys past 169 are in its future
    ref = attend(q, k, v, q_offset=off, spec=AttentionSpec("reference"))
    out = attend(q, k, v, q_offset=off, spec=AttentionSpec(impl))
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def test_window_and_dv_ne_dqk():
    b, s, h, d, dv = 1, 90, 2, 24, 16
    q, k, v = rand(6, (b, s, h, d)), rand(7, (b, s, h, d)), rand(8, (b, s, h, dv))
    ref = attend(q, k, v, window=17, spec=AttentionSpec("reference"))
    out = attend(q, k, v, window=17, spec=AttentionSpec("xla"))
    assert out.shape == (b, s, h, dv)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def test_fully_masked_rows_are_zero_in_reference():
    q, k, v = rand(9, (1, 4, 1, 8)), rand(10, (1, 6, 1, 8)), rand(11, (1, 6, 1, 8))
    segs = (jnp.asarray([[1, 1, 9, 9]]), jnp.asarray([[1, 1, 2, 2, 2, 2]]))
    out = attend(q, k, v, causal=False, segment_ids=segs, spec=AttentionSpec("reference"))
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_array_equal(np.asarray(out[0, 2:]), 0.0)


def test_structured_layout_skips_exactly_the_masked_blocks():
    rng = np.random.default_rng(1)
    segs = packed_segments(rng, 1, 256)
    layout = structured_layout(256, 256, 1, block_q=32, block_k=32, causal=True, q_offset=None,
                               segment_ids=(segs, segs))
    listed = np.asarray(layout.to_block_mask())[0, 0]
    token_mask = np.asarray(build_mask(256, 256, 1, True, None, (segs, segs), None))[0]
    needed = token_mask.reshape(8, 32, 8, 32).any(axis=(1, 3))
    np.testing.assert_array_equal(listed, needed)  # contiguous segments: exact, not just a cover
    assert listed.sum() < np.tril(np.ones((8, 8))).sum()


def test_unknown_impl():
    with pytest.raises(ValueError, match="unknown attention impl"):
        AttentionSpec("flash9000")
