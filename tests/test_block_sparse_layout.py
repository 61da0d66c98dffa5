"""BlockSparseLayout: host and device constructors, invariants, pytree behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import BlockSparseLayout
from pallas_kernels.layout import (block_mask_to_layout_arrays, causal_block_mask,
                                   random_block_mask, streaming_block_mask)


def _check_invariants(mask: np.ndarray, lay: BlockSparseLayout) -> None:
    idx, cnt = np.asarray(lay.kv_idx), np.asarray(lay.kv_cnt)
    np.testing.assert_array_equal(cnt, mask.sum(-1))
    for pos in np.ndindex(*mask.shape[:-1]):
        listed = np.flatnonzero(mask[pos])
        n = len(listed)
        np.testing.assert_array_equal(idx[pos][:n], listed)  # sorted, exact
        pad = listed[-1] if n else 0
        assert np.all(idx[pos][n:] == pad)  # padding repeats the last valid block


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), nq=st.integers(1, 7), nk=st.integers(1, 9),
       density=st.sampled_from([0.0, 0.2, 0.6, 1.0]))
def test_host_and_device_constructors_agree(seed, nq, nk, density):
    rng = np.random.default_rng(seed)
    mask = rng.random((2, 3, nq, nk)) < density
    lay = BlockSparseLayout.from_block_mask(mask, 16, 32)
    _check_invariants(mask, lay)
    assert lay.max_nnz == max(1, mask.sum(-1).max())
    np.testing.assert_array_equal(np.asarray(lay.to_block_mask()), mask)
    # Device path inside jit, with a larger static max_nnz.
    build = jax.jit(lambda m: BlockSparseLayout.from_block_mask(m, 16, 32, max_nnz=nk + 2))
    dev = build(jnp.asarray(mask))
    assert dev.max_nnz == nk + 2 and dev.block_q == 16 and dev.block_k == 32
    _check_invariants(mask, dev)
    np.testing.assert_array_equal(np.asarray(dev.to_block_mask()), mask)


def test_device_truncation_keeps_lowest_blocks():
    mask = np.zeros((1, 1, 1, 6), bool)
    mask[..., [1, 3, 4, 5]] = True
    idx, cnt = block_mask_to_layout_arrays(jnp.asarray(mask), 2)
    np.testing.assert_array_equal(np.asarray(idx), [[[[1, 3]]]])
    np.testing.assert_array_equal(np.asarray(cnt), [[[2]]])


def test_host_max_nnz_too_small_raises():
    mask = np.ones((1, 1, 2, 4), bool)
    with pytest.raises(ValueError, match="max_nnz"):
        BlockSparseLayout.from_block_mask(mask, 16, 16, max_nnz=3)
    with pytest.raises(ValueError, match="max_nnz"):
        jax.jit(lambda m: BlockSparseLayout.from_block_mask(m, 16, 16))(jnp.asarray(mask))


@pytest.mark.parametrize("seq_q,seq_k,bq,bk,off", [(77, 77, 16, 32, 0), (40, 100, 16, 16, 60),
                                                   (1000, 1000, 128, 64, 0), (30, 50, 32, 16, 7)])
def test_dense_causal_is_exactly_the_blocks_with_a_causal_pair(seq_q, seq_k, bq, bk, off):
    lay = BlockSparseLayout.dense_causal(2, 3, seq_q, seq_k, bq, bk, q_offset=off)
    i = np.arange(seq_q)[:, None] + off
    j = np.arange(seq_k)[None, :]
    tok = j <= i
    nq, nk = -(-seq_q // bq), -(-seq_k // bk)
    want = np.zeros((nq, nk), bool)
    np.logical_or.at(want, (np.arange(seq_q)[:, None] // bq, j // bk), tok)
    np.testing.assert_array_equal(causal_block_mask(seq_q, seq_k, bq, bk, off), want)
    np.testing.assert_array_equal(np.asarray(lay.to_block_mask())[1, 2], want)
    dense = BlockSparseLayout.dense(1, 1, seq_q, seq_k, bq, bk)
    assert np.asarray(dense.to_block_mask()).all()


def test_streaming_blocks():
    m = streaming_block_mask(sink_blocks=2, local_blocks=3, seq_q=160, seq_k=160,
                             block_q=16, block_k=16)
    for r in range(10):
        want = {c for c in range(10) if c <= r and (c < 2 or c > r - 3)}
        assert set(np.flatnonzero(m[r])) == want
    lay = BlockSparseLayout.streaming(1, 2, 2, 4, 100, 200, 32, 32, q_offset=100)
    assert lay.kv_idx.shape[:3] == (2, 4, 4) and lay.max_nnz == 3


def test_random_block_mask_density_sink_and_diagonal():
    rng = np.random.default_rng(0)
    m = random_block_mask(rng, 1, 2, 4096, 4096, 128, 128, density=0.2)
    causal = causal_block_mask(4096, 4096, 128, 128)
    assert not (m & ~causal).any()
    assert m[..., 0].all() and m[..., np.arange(32), np.arange(32)].all()
    frac = m.sum() / (2 * causal.sum())
    assert 0.2 <= frac < 0.3


def test_layout_is_a_pytree_with_static_block_sizes():
    lay = BlockSparseLayout.dense_causal(1, 2, 64, 64, 16, 32)
    leaves, treedef = jax.tree_util.tree_flatten(lay)
    assert len(leaves) == 2
    traced_sizes = []

    @jax.jit
    def f(layout):
        traced_sizes.append((layout.block_q, layout.block_k, layout.num_kv_blocks))
        return layout.kv_cnt.sum()

    assert int(f(lay)) == int(np.asarray(lay.kv_cnt).sum())
    assert traced_sizes == [(16, 32, 2)]
    b = lay.broadcast_batch(3)
    assert b.kv_idx.shape == (3, 2, 4, 2)
    with pytest.raises(ValueError):
        b.broadcast_batch(2)
