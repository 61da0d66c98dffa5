"""PBS (permuted block-sparse) policy: causality by construction, output vs a float64 reference.

Structured q/k (sinks, local window, vertical lines), block 64, segment 128, S = 640 (10 blocks),
two rows of lengths 640 and 421 (right padding, partial last block), GQA groups of 3 and 4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprefill import sparse
from jaxprefill.eval.synthetic_qk import structured_qk
from jaxprefill.sparse.base import make_geometry

BLOCK, SEG, S, D = 64, 128, 640, 32
LENGTHS = (640, 421)


def pbs_policy(**kw):
    """PBS at the test's sizes, with the paper's layout (no dense query tail) unless asked."""
    return sparse.get("pbs", **{"block_size": BLOCK, "segment": SEG, "n_last": 0, **kw})


@pytest.fixture(scope="module", params=[(6, 2), (8, 2)], ids=["gqa3", "gqa4"])
def qkv(request):
    hq, hkv = request.param
    gen = jax.jit(structured_qk, static_argnums=(1, 2, 3, 4, 5),
                  static_argnames=("local", "n_vertical", "dtype"))
    q, k = gen(jax.random.key(3), 2, S, hq, hkv, D, local=64, n_vertical=6, dtype=jnp.float32)
    v = jax.random.normal(jax.random.key(4), (2, S, hkv, D), jnp.float32)
    return q, k, v


def ref_attention(q, k, v, keep):
    """float64 softmax attention restricted to keep [B, Hq, S, S] (original positions)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    logit = np.einsum("bqhd,bkhd->bhqk", q, kr) / np.sqrt(q.shape[-1])
    logit = np.where(keep, logit, -np.inf)
    p = np.exp(logit - logit.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, vr)


def full_keep(policy, q, k, lengths, min_length=0):
    rows = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (q.shape[0], S))
    keep = jax.jit(lambda a, b, l: policy.key_mask(a, b, rows, lengths=l, min_length=min_length))(
        q, k, lengths)
    keep = np.asarray(keep)
    if keep.shape[1] != q.shape[2]:  # heads="kv": one mask per group
        keep = np.repeat(keep, q.shape[2] // keep.shape[1], axis=1)
    return keep


def prompt_call(q, lengths) -> sparse.Prefill:
    """A whole-prompt call of layer 0 on the XLA kernel (what `attend` classifies)."""
    return sparse.Prefill("prompt", 0, q.shape[-1] ** -0.5, kernel="xla", lengths=lengths)


@pytest.mark.parametrize("heads", ["q", "kv"])
def test_pbs_output_equals_reference_on_mapped_mask(qkv, heads):
    q, k, v = qkv
    policy = pbs_policy(tau=0.6, heads=heads)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    out = jax.jit(lambda a, b, c, l: policy.attend(a, b, c, prompt_call(a, l)))(
        q, k, v, lengths)
    out = np.asarray(out)
    keep = full_keep(policy, q, k, lengths)
    ref = ref_attention(q, k, v, keep)
    for b, length in enumerate(LENGTHS):
        np.testing.assert_allclose(out[b, :length], ref[b, :length], atol=3e-5, rtol=3e-5)
        kb = keep[b, :, :length, :length]
        i, j = np.arange(length)[:, None], np.arange(length)[None, :]
        assert not (kb & (j > i)).any(), "a key after its query is attended"
        assert kb[:, :, 0].all(), "original token 0 (sink) not attended"
        same_seg = (i // SEG == j // SEG) & (j <= i)
        assert kb[:, same_seg].all(), "diagonal segment not dense"
        assert kb.sum() < kb.shape[0] * np.tril(np.ones((length, length))).sum(), "PBS kept all"


def test_pbs_permutes_within_complete_segments_only(qkv):
    q, k, _ = qkv
    policy = pbs_policy()
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    geo = make_geometry(q, k, BLOCK, lengths)
    perm = np.asarray(jax.jit(lambda a, b: policy.permutation(a, b, geo))(q, k))
    for b, length in enumerate(LENGTHS):
        for h in range(perm.shape[1]):
            p = perm[b, h]
            assert sorted(p.tolist()) == list(range(p.size))  # a permutation
            np.testing.assert_array_equal(p // SEG, np.arange(p.size) // SEG)  # within segments
            tail = (length // SEG) * SEG
            np.testing.assert_array_equal(p[tail:], np.arange(tail, p.size))  # tail in place
    assert (perm[0] != np.arange(perm.shape[-1])).any(), "nothing was permuted"


def test_pbs_tau_one_is_dense_and_rows_match_alone(qkv):
    q, k, v = qkv
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    dense = pbs_policy(tau=1.0)
    keep = full_keep(dense, q, k, lengths)
    for b, length in enumerate(LENGTHS):
        np.testing.assert_array_equal(keep[b, :, :length, :length],
                                      np.broadcast_to(np.tril(np.ones((length, length), bool)),
                                                      keep[b, :, :length, :length].shape))
    short = full_keep(pbs_policy(tau=0.5), q, k, lengths, min_length=500)  # row 1 (421) dense
    n1 = LENGTHS[1]
    assert short[1, :, :n1, :n1].sum() == short.shape[1] * n1 * (n1 + 1) // 2
    policy = pbs_policy(tau=0.6)
    mask_of = jax.jit(lambda a, b, l: policy.build(a, b, lengths=l).to_block_mask())
    both = mask_of(q, k, lengths)
    alone = mask_of(q[1:, :n1], k[1:, :n1], None)
    nb = -(-n1 // BLOCK)
    n = S // BLOCK
    got = np.concatenate([np.asarray(both)[1, :, :nb, :nb], np.asarray(both)[1, :, :nb, n:n + nb]],
                         axis=-1)
    np.testing.assert_array_equal(got, np.asarray(alone)[0])


def test_pbs_through_attend_dispatch(qkv):
    from jaxprefill.attention import AttentionSpec, attend

    q, k, v = qkv
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    cfg = {"policy": "pbs", "params": {"tau": 0.6, "segment": SEG}, "block_size": BLOCK,
           "min_length": 0, "kernel": "xla"}
    spec = AttentionSpec("xla", sparse=cfg)
    out = jax.jit(lambda a, b, c, l: attend(a, b, c, causal=True, spec=spec, layer=0,
                                            lengths=l))(q, k, v, lengths)
    policy = sparse.SparseConfig.parse(cfg).policy_for(0)
    direct = jax.jit(lambda a, b, c, l: policy.attend(a, b, c, prompt_call(a, l)))(
        q, k, v, lengths)
    np.testing.assert_allclose(np.asarray(out), np.asarray(direct), atol=1e-6)
    with pytest.raises(ValueError, match="multiple of block_size"):
        sparse.get("pbs", block_size=64, segment=96)


@pytest.mark.parametrize("heads", ["q", "kv"])
def test_pbs_last_block_exact_covers_tau_of_each_heads_mass(qkv, heads):
    """last_block_exact changes only each row's last query block, to a superset whose keys hold
    at least tau of every query head's exact attention mass over that block's queries."""
    q, k, _ = qkv
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    tau = 0.6
    base = full_keep(pbs_policy(tau=tau, heads=heads), q, k, lengths)
    plus = full_keep(pbs_policy(tau=tau, heads=heads, last_block_exact=True), q, k, lengths)
    g = q.shape[2] // k.shape[2]
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    for b, length in enumerate(LENGTHS):
        start = (length - 1) // BLOCK * BLOCK  # first query of the last block
        np.testing.assert_array_equal(plus[b, :, :start], base[b, :, :start])
        assert (plus[b, :, start:length] >= base[b, :, start:length]).all()
        for h in range(q.shape[2]):
            logits = qn[b, start:length, h] @ kn[b, :length, h // g].T / np.sqrt(D)
            pos = np.arange(start, length)[:, None]
            logits = np.where(np.arange(length)[None] <= pos, logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            covered = (p * plus[b, h, start:length, :length]).sum() / p.sum()
            assert covered >= tau - 1e-6, (b, h, covered)
    assert (plus != base).any(), "last_block_exact added nothing on these inputs"


def test_pbs_dense_tail_attends_every_earlier_key_and_matches_the_reference(qkv):
    """n_last: the query blocks holding each row's last n_last queries read every earlier key
    (permuted or not); the other rows keep n_last=0's selection; the output equals the float64
    reference on the mapped mask."""
    q, k, v = qkv
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    plain = full_keep(pbs_policy(tau=0.6), q, k, lengths)
    policy = pbs_policy(tau=0.6, n_last=100)
    tail = full_keep(policy, q, k, lengths)
    out = np.asarray(jax.jit(lambda a, b, c, l: policy.attend(a, b, c, prompt_call(a, l)))(
        q, k, v, lengths))
    ref = ref_attention(q, k, v, tail)
    for b, length in enumerate(LENGTHS):
        first = (length - 100) // BLOCK * BLOCK  # first query of the tail's first block
        i, j = np.arange(length)[:, None], np.arange(length)[None, :]
        assert tail[b, :, first:length, :length].all(axis=0)[(j <= i)[first:]].all()
        np.testing.assert_array_equal(tail[b, :, :first], plain[b, :, :first])
        assert (tail[b, :, first:length] != plain[b, :, first:length]).any()
        np.testing.assert_allclose(out[b, :length], ref[b, :length], atol=3e-5, rtol=3e-5)
