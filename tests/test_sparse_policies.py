"""Sparse prefill policies: shared invariants for every policy (docs/methods/README.md).

Structured q/k (sinks, local window, vertical lines; jaxprefill.eval.synthetic_qk), block 64,
S = 640 (10 blocks). Every policy, GQA groups of 3 (SmolLM2) and 4:
  * every valid row lists the sink block and its diagonal, and only causal blocks;
  * threshold / gamma 1.0 (or budgets covering everything) gives the dense causal layout;
  * a batch of two rows of different lengths gives each row the layout it gets alone;
  * attention over the layout (XLA kernel) equals the float64 reference on that mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprefill import sparse
from jaxprefill.eval.synthetic_qk import structured_qk
from pallas_kernels import block_sparse_attention
from pallas_kernels.testing import numpy_reference

BLOCK, S, D = 64, 640, 32
LENGTHS = (640, 421)  # the second row is right-padded, with a partial last block

# Small-input settings (paper defaults assume >= 4K tokens), and the settings that must be dense.
POLICIES = {
    "streaming": (dict(sink=64, local=128), None),
    "minference": (dict(vertical=40, slash=60, force_slash=20, last_q=32, n_last=0),
                   dict(vertical=S, slash=S)),
    "flexprefill": (dict(gamma=0.9, min_budget=64, n_last=0), dict(gamma=1.0)),
    "xattention": (dict(threshold=0.9, stride=8, n_last=0), dict(threshold=1.0)),
    "proxyattn": (dict(gamma=0.9, stride=8, min_blocks=1, n_last=0), dict(gamma=1.0)),
    "trianglemix": (dict(start_layer=2, n_init=8, n_local=128, n_last=64), None),
    "oracle_topk": (dict(gamma=0.9), dict(gamma=1.0)),
    "dense": ({}, {}),
    "blasst": (dict(lam=1e-3), {}),  # the dense causal layout; its skipping is in the kernels
}
# Registered policies whose invariants live elsewhere, with the reason.
COVERED_ELSEWHERE = {
    "pbs": "reorders keys (layout over [permuted K; K]): tests/test_sparse_pbs.py",
}


def test_every_registered_policy_is_tested():
    assert set(sparse.available()) == set(POLICIES) | set(COVERED_ELSEWHERE)


def make(name, params, **extra):
    return sparse.get(name, block_size=BLOCK, **{**params, **extra})


def build(policy, q, k, lengths=None, layer=3, min_length=0):
    """(layout, bool mask [B, H, n, n] as numpy), jitted (eager op-by-op compiles are slower)."""
    fn = jax.jit(lambda a, b, l: (lambda lay: (lay, lay.to_block_mask()))(
        policy.build(a, b, layer=layer, lengths=l, min_length=min_length)))
    layout, mask = fn(q, k, lengths)
    return layout, np.asarray(mask)


@pytest.fixture(scope="module", params=[(6, 2), (8, 2)], ids=["gqa3", "gqa4"])
def qkv(request):
    hq, hkv = request.param
    gen = jax.jit(structured_qk, static_argnums=(1, 2, 3, 4, 5),
                  static_argnames=("local", "n_vertical", "dtype"))
    q, k = gen(jax.random.key(1), 2, S, hq, hkv, D, local=64, n_vertical=6, dtype=jnp.float32)
    v = jax.random.normal(jax.random.key(2), (2, S, hkv, D), jnp.float32)
    return q, k, v


def causal_valid(n, length):
    nb = -(-length // BLOCK)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    return (j <= i) & (i < nb), nb


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_invariants(name, qkv):
    q, k, v = qkv
    params, dense_params = POLICIES[name]
    policy = make(name, params)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    layout, mask = build(policy, q, k, lengths)
    assert mask.shape[1] in (q.shape[2], k.shape[2])
    n = mask.shape[-1]
    for b, length in enumerate(LENGTHS):
        allowed, nb = causal_valid(n, length)
        m = mask[b, :, :nb, :nb]
        assert m[:, :, 0].all(), "sink block missing"
        assert m[:, np.arange(nb), np.arange(nb)].all(), "diagonal block missing"
        assert not (mask[b] & ~allowed[None])[:, :nb].any(), "non-causal block listed"

    # The padded row alone (unpadded, S = its length) gets the same layout on its valid blocks.
    length = LENGTHS[1]
    _, alone = build(policy, q[1:, :length], k[1:, :length])
    nb = -(-length // BLOCK)
    np.testing.assert_array_equal(alone[0], mask[1, :, :nb, :nb],
                                  err_msg="row 1 differs from its layout alone")

    # Attention over the layout equals the float64 reference on the same block mask.
    out = block_sparse_attention(q, k, v, layout, causal=True, impl="xla")
    cols = np.asarray(layout.column_mask(S)) if layout.has_columns else None  # minference
    ref, _ = numpy_reference(q, k, v, mask, BLOCK, BLOCK, causal=True, col_mask=cols)
    for b, length in enumerate(LENGTHS):
        np.testing.assert_allclose(np.asarray(out)[b, :length], ref[b, :length], atol=2e-5,
                                   rtol=2e-5)

    if name not in ("dense", "streaming", "trianglemix", "blasst"):
        # A data-dependent policy must actually be sparse on structured inputs.
        allowed, nb = causal_valid(n, LENGTHS[0])
        assert mask[0].sum() < mask.shape[1] * allowed.sum(), f"{name} selected every block"
    if dense_params is not None:
        _, fm = build(make(name, dense_params), q, k, lengths)
        for b, length in enumerate(LENGTHS):
            allowed, nb = causal_valid(n, length)
            np.testing.assert_array_equal(fm[b, :, :nb, :nb],
                                          np.broadcast_to(allowed[:nb, :nb], fm[b, :, :nb, :nb].shape))


def test_kv_heads_union_and_cap(qkv):
    q, k, _ = qkv
    g = q.shape[2] // k.shape[2]
    _, per_q = build(make("xattention", dict(threshold=0.8)), q, k)
    per_kv, kv_mask = build(make("xattention", dict(threshold=0.8), heads="kv"), q, k)
    assert per_kv.num_heads == k.shape[2]
    union = per_q.reshape(2, k.shape[2], g, *per_q.shape[2:]).any(axis=2)
    np.testing.assert_array_equal(kv_mask, union)

    capped, cm = build(make("xattention", dict(threshold=1.0), max_nnz=3), q, k)
    assert capped.max_nnz == 3 and cm.sum(-1).max() == 3
    n = cm.shape[-1]
    assert cm[:, :, np.arange(n), np.arange(n)].all() and cm[..., 0].all()  # forced kept
    assert cm[:, :, 5, 4].all()  # then the block nearest the diagonal


def test_min_length_rows_fall_back_to_dense(qkv):
    q, k, _ = qkv
    policy = make("streaming", dict(sink=64, local=64))
    _, m = build(policy, q, k, jnp.asarray(LENGTHS), min_length=500)
    allowed, nb = causal_valid(m.shape[-1], LENGTHS[1])
    assert m[1, :, :nb, :nb].sum() == m.shape[1] * allowed.sum()  # 421 < 500: dense
    assert m[0].sum() < m.shape[1] * causal_valid(m.shape[-1], S)[0].sum()  # 640: streaming


def test_proxyattn_last_block_exact_adds_the_heads_own_selection(qkv):
    """last_block_exact changes only each row's last valid query block, to a superset that
    holds the block with the most exact attention mass of every head's last-block queries."""
    q, k, _ = qkv
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    params = dict(gamma=0.5, stride=8, min_blocks=1)
    _, base = build(make("proxyattn", params), q, k, lengths)
    _, plus = build(make("proxyattn", dict(params, last_block_exact=True)), q, k, lengths)
    g = q.shape[2] // k.shape[2]
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    for b, length in enumerate(LENGTHS):
        last = (length - 1) // BLOCK
        rows = np.arange(base.shape[2]) != last
        np.testing.assert_array_equal(plus[b][:, rows], base[b][:, rows])
        assert (plus[b, :, last] >= base[b, :, last]).all()
        for h in range(q.shape[2]):
            qs = qn[b, last * BLOCK:length, h]  # the last block's valid queries
            logits = qs @ kn[b, :length, h // g].T / np.sqrt(D)
            pos = np.arange(last * BLOCK, length)[:, None]
            logits = np.where(np.arange(length)[None] <= pos, logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            blocks = np.add.reduceat(p.sum(0), np.arange(0, length, BLOCK))
            assert plus[b, h, last, int(blocks.argmax())], (b, h)


@pytest.mark.parametrize("name", ["minference", "flexprefill", "xattention", "proxyattn",
                                  "oracle_topk"])
def test_dense_tail_of_every_policy(name, qkv):
    """n_last (a field of every policy): the rows holding each row's last n_last queries list
    every causal block, the other rows are the method's own layout (n_last 0)."""
    q, k, _ = qkv
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    params = POLICIES[name][0]
    _, plain = build(make(name, params), q, k, lengths)  # the settings above: n_last 0
    _, tail = build(make(name, params, n_last=100), q, k, lengths)
    assert make(name, {}).n_last == (0 if name == "oracle_topk" else 128)  # default tails
    for b, length in enumerate(LENGTHS):
        allowed, nb = causal_valid(tail.shape[-1], length)
        first = (length - 100) // BLOCK  # 100 queries span 2 blocks (640) or 3 (421)
        np.testing.assert_array_equal(tail[b][:, :first], plain[b][:, :first])
        np.testing.assert_array_equal(tail[b][:, first:nb],
                                      np.broadcast_to(allowed[first:nb], tail[b][:, first:nb].shape))
        np.testing.assert_array_equal(tail[b][:, nb:], plain[b][:, nb:])  # padding rows
        assert (tail[b] != plain[b]).any()  # not vacuous: the method dropped tail blocks


def test_dense_tail_is_checked():
    with pytest.raises(ValueError, match="n_last must be an integer >= 0"):
        make("xattention", {}, n_last=-1)


def test_streaming_dense_tail_is_trianglemix_from_layer_0(qkv):
    """streaming's n_last makes the rows holding each row's last n_last queries dense causal and
    leaves the others; with every layer streaming it equals trianglemix(start_layer=0)."""
    q, k, _ = qkv
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    win = dict(sink=64, local=128)
    _, plain = build(make("streaming", win), q, k, lengths)
    _, tail = build(make("streaming", dict(win, n_last=100)), q, k, lengths)
    _, tri = build(make("trianglemix", dict(start_layer=0, n_init=64, n_local=128, n_last=100)),
                   q, k, lengths)
    np.testing.assert_array_equal(tail, tri)
    for b, length in enumerate(LENGTHS):
        allowed, nb = causal_valid(tail.shape[-1], length)
        first = (length - 100) // BLOCK
        np.testing.assert_array_equal(tail[b][:, :first], plain[b][:, :first])
        assert tail[b][:, first:nb].all(axis=0)[allowed[first:nb]].all()  # dense causal
        assert (tail[b] != plain[b]).any()
