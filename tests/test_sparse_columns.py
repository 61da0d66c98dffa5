"""Key columns (``key_columns``): the keys the row's last queries attend most join every query
block's layout as single columns, beside any block policy's own blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprefill import sparse
from jaxprefill.eval.runner import layer_stats
from jaxprefill.sparse.base import make_geometry
from jaxprefill.sparse.columns import LAST_QUERIES, top_columns
from pallas_kernels import block_sparse_attention

B, S, HQ, HKV, D, BLOCK = 2, 300, 4, 2, 16, 32
LENGTHS = (300, 217)
SHARP = (5, 40, 133, 150, 201)  # keys every query attends strongly (a few heads' "columns")


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, S, HQ, D)).astype(np.float32)
    k = rng.standard_normal((B, S, HKV, D)).astype(np.float32)
    v = rng.standard_normal((B, S, HKV, D)).astype(np.float32)
    direction = rng.standard_normal(D).astype(np.float32)
    q += 1.5 * direction  # every query leans towards one direction ...
    k[:, list(SHARP)] += 3.0 * direction  # ... which a few keys carry strongly
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def last_query_mass(q, k, b, length):
    """float64 [Hq, S]: attention mass of row b's last LAST_QUERIES valid queries per key."""
    qn, kn = np.asarray(q[b], np.float64), np.repeat(np.asarray(k[b], np.float64), HQ // HKV, 1)
    rows = np.arange(max(0, length - LAST_QUERIES), length)
    logits = np.einsum("rhd,shd->hrs", qn[rows], kn) / np.sqrt(D)
    logits = np.where(np.arange(S)[None, None] <= rows[None, :, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).sum(1)


@pytest.mark.parametrize("how", [sparse.Estimation(),
                                 sparse.Estimation("triton", interpret=True)],
                         ids=["auto", "triton"])
def test_top_columns_are_the_keys_the_last_queries_attend_most(how):
    """Both paths of the choice: XLA's two-level top-k ("auto") and, named, the Triton
    kernels (last-query sums, then the DSA top-k) in interpret mode."""
    q, k, _ = inputs()
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    geo = make_geometry(q, k, BLOCK, lengths, how)
    cols = np.asarray(jax.jit(lambda q, k: top_columns(q, k, geo, 12))(q, k))
    assert cols.shape == (B, HQ, 12)
    for b, length in enumerate(LENGTHS):
        mass = last_query_mass(q, k, b, length)
        for h in range(HQ):
            got = cols[b, h]
            assert (np.diff(got) > 0).all() and got.max() < length  # ascending, valid keys
            want = np.argsort(-mass[h, :length])[:12]
            assert set(got.tolist()) == set(want.tolist()), (b, h)


@pytest.mark.parametrize("heads", ["q", "kv"])
def test_layout_is_the_policy_blocks_plus_columns_and_attention_follows_it(heads):
    """Same blocks as without columns; each query block's columns are the row's top keys
    outside its listed blocks and not after its last query; the kernel (XLA, float32) equals
    softmax attention over exactly blocks | columns (causal), and differs from the blocks
    alone."""
    q, k, v = inputs(1)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    params = dict(block_size=BLOCK, threshold=0.3, stride=8, n_last=0, heads=heads)
    plain = sparse.get("xattention", key_columns=0, **params)
    cols = sparse.get("xattention", key_columns=10, **params)
    lay0, lay = plain.build(q, k, lengths=lengths), cols.build(q, k, lengths=lengths)
    blocks = np.asarray(lay.to_block_mask())
    np.testing.assert_array_equal(blocks, np.asarray(lay0.to_block_mask()))
    colmask = np.asarray(lay.column_mask(S))  # [B, H, nq, S]
    assert colmask.any()
    geo = make_geometry(q, k, BLOCK, lengths, sparse.Estimation())
    top = np.asarray(top_columns(q, k, geo, 10))  # [B, Hq, 10]
    g = HQ // blocks.shape[1]
    n = blocks.shape[-1]
    for b, length in enumerate(LENGTHS):
        for h in range(blocks.shape[1]):
            keys = set(top[b, h * g:(h + 1) * g].ravel().tolist()) - {-1}
            for i in range(-(-length // BLOCK)):
                last_q = min((i + 1) * BLOCK, S) - 1
                want = {j for j in keys if not blocks[b, h, i, j // BLOCK] and j <= last_q}
                assert set(np.flatnonzero(colmask[b, h, i]).tolist()) == want, (b, h, i)
            assert not colmask[b, h, -(-length // BLOCK):].any()  # padding blocks: none
    out = np.asarray(block_sparse_attention(q, k, v, lay, impl="xla"))
    tok = np.repeat(blocks, BLOCK, axis=2)[:, :, :S]  # [B, H, S, n]
    tok = np.repeat(tok, BLOCK, axis=3)[..., :S] | np.repeat(colmask, BLOCK, axis=2)[:, :, :S]
    tok = np.repeat(tok, g, axis=1) & np.tril(np.ones((S, S), bool))
    qn, kn = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), HQ // HKV, 2)
    vn = np.repeat(np.asarray(v, np.float64), HQ // HKV, 2)
    logits = np.where(tok, np.einsum("bqhd,bkhd->bhqk", qn, kn) / np.sqrt(D), -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), vn)
    for b, length in enumerate(LENGTHS):
        np.testing.assert_allclose(out[b, :length], want[b, :length], atol=2e-5, rtol=2e-5)
    blocks_only = np.asarray(block_sparse_attention(q, k, v, lay0, impl="xla"))
    assert np.abs(blocks_only[0] - out[0]).max() > 1e-3


def test_eval_statistics_count_the_columns_as_tokens():
    """The columns raise the measured recall (token level, not rounded up to blocks) at a
    density that grows by at most the columns' share."""
    q, k, v = inputs(2)
    lengths = np.asarray(LENGTHS, np.int32)
    sampled = np.stack([np.arange(L - 96, L, 3) for L in LENGTHS])
    params = dict(block_size=BLOCK, threshold=0.3, stride=8, n_last=0)
    d0, r0, _, _ = layer_stats(sparse.get("xattention", key_columns=0, **params), 0, q, k, v, lengths, sampled)
    d1, r1, _, _ = layer_stats(sparse.get("xattention", key_columns=8, **params), 0, q, k, v,
                               lengths, sampled)
    assert r1.mean() > r0.mean() + 0.02, (r0.mean(), r1.mean())
    assert (d1 >= d0 - 1e-9).all() and (d1 - d0).max() <= 8 / BLOCK + 1e-9


def test_xattention_takes_64_columns_by_default_and_its_paper_config_none():
    assert sparse.get("xattention").key_columns == 64
    assert sparse.get("xattention", key_columns=0).has_columns is False
    for name in ("flexprefill", "proxyattn", "streaming"):
        assert sparse.get(name).key_columns == 0, name
    for path in ("configs/sparse/xattention.yaml", "configs/sparse/xattention_smollm2.yaml"):
        assert sparse.SparseConfig.from_yaml(path).rules[0].policy.key_columns == 0, path


def test_key_columns_is_checked():
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="key_columns must be an integer"):
            sparse.get("xattention", key_columns=bad)
    for name in ("pbs", "minference"):  # their own layout steps: refused, not ignored
        with pytest.raises(ValueError, match="key_columns is not a parameter"):
            sparse.get(name, key_columns=8)
    assert sparse.get("proxyattn", key_columns=8).has_columns
    assert not sparse.get("proxyattn").has_columns
    assert "key_columns" in sparse.param_names("xattention")
    assert "key_columns" not in sparse.param_names("minference")


def test_missed_attention_report_finds_the_sharp_keys():
    """scripts/accuracy/missed_attention.py's per-layer statistics on the sharp-key inputs:
    the block policy misses mass, most of it on the last queries' top keys, and a policy with
    those keys as columns is not what the block mask shows (the report reads blocks only)."""
    from scripts.accuracy.missed_attention import exact_probs, layer_report

    q, k, _ = inputs(3)
    q0, k0 = np.asarray(q[0]), np.asarray(k[0])
    rows = np.arange(150, 300, 5)
    p = exact_probs(q0, k0, rows)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-9)
    assert p[:, 0, 151:].max() == 0  # causal: row 150 sees keys 0..150 only
    pol = sparse.get("xattention", block_size=BLOCK, threshold=0.3, stride=8, n_last=0,
                     key_columns=0)
    mask = np.asarray(pol.block_mask(q, k))[0]
    rep = layer_report(q0, k0, {"x": mask}, rows, BLOCK, columns=len(SHARP))
    x = rep["policies"]["x"]
    assert 0 < x["recall"] < 0.95 and x["min_head_recall"] <= x["recall"]
    assert x["miss_on_columns"] > 0.3  # the sharp keys hold much of what the blocks miss
    assert rep["keys_50"] <= rep["keys_90"] and 0 < rep["oracle_90"] <= 1
    full = layer_report(q0, k0, {"all": np.ones_like(mask)}, rows, BLOCK, columns=4)
    assert full["policies"]["all"]["recall"] == pytest.approx(1.0)
