"""Layers that share one sparse layout (``Policy.share_layers``): which layer builds it, what the
others run, and what the model, the eval statistics and the ring do with it."""

import jax
import numpy as np
import pytest
from flax import nnx

import jaxprefill as jp
from jaxprefill.attention import AttentionSpec, LayoutShare
from jaxprefill.attention import sparse as sparse_entry
from jaxprefill.eval.runner import layer_head_stats
from jaxprefill.sparse import SparseConfig
from jaxprefill.sparse import base as sparse_base
from jaxprefill.sparse.prefill import Prefill, layout_for
from pallas_kernels import block_sparse_attention

S, HQ, HKV, D = 256, 4, 2, 16


def xattention(share: int) -> dict:
    return {"min_length": 32, "policy": "xattention",
            "params": {"block_size": 16, "stride": 4, "threshold": 0.6, "n_last": 0,
                       "share_layers": share}}


def qkv(seed: int):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = 2.0 * jax.random.normal(ks[0], (1, S, HQ, D))
    k = 2.0 * jax.random.normal(ks[1], (1, S, HKV, D))
    return q, k, jax.random.normal(ks[2], (1, S, HKV, D))


def test_layout_source_groups_layers_of_one_rule():
    one = SparseConfig.from_dict(xattention(2))
    assert [one.layout_source(i) for i in range(5)] == [0, 0, 2, 2, 4]
    assert [SparseConfig.from_dict(xattention(1)).layout_source(i) for i in range(3)] == [0, 1, 2]
    # a dense first layer: layer 1 starts its own group; a second rule never reuses the first's
    mixed = SparseConfig.from_dict({"layers": [
        {"range": [0, 1], "policy": "dense"},
        {"range": [1, 3], "policy": "xattention", "params": {"share_layers": 4}},
        {"range": [3, None], "policy": "xattention", "params": {"share_layers": 4}}]})
    assert [mixed.layout_source(i) for i in range(9)] == [0, 1, 1, 3, 4, 4, 4, 4, 8]


def test_share_layers_is_checked():
    with pytest.raises(ValueError, match="share_layers must be an integer >= 1"):
        SparseConfig.from_dict({"policy": "xattention", "params": {"share_layers": 0}})
    with pytest.raises(ValueError, match="pbs: share_layers must be 1"):
        SparseConfig.from_dict({"policy": "pbs", "params": {"share_layers": 2}})


def test_second_layer_runs_the_first_layers_layout():
    cfg = SparseConfig.from_dict(xattention(2))
    policy = cfg.policy_for(0)
    (q0, k0, v0), (q1, k1, v1) = qkv(0), qkv(1)
    calls = [Prefill("prompt", i, D ** -0.5, lengths=np.array([S], np.int32)) for i in (0, 1)]
    own = [layout_for(policy, q, k, c) for (q, k), c in zip([(q0, k0), (q1, k1)], calls)]
    masks = [np.asarray(lay.to_block_mask()) for lay in own]
    assert 0.05 < masks[0].mean() < 0.6 and (masks[0] != masks[1]).any()  # sparse, and differ

    def run(q, k, v, layout):
        return np.asarray(block_sparse_attention(q, k, v, layout, causal=True, sm_scale=D ** -0.5))

    share = LayoutShare()
    out0 = np.asarray(sparse_entry.sparse_attend(q0, k0, v0, cfg, calls[0], share))
    out1 = np.asarray(sparse_entry.sparse_attend(q1, k1, v1, cfg, calls[1], share))
    np.testing.assert_allclose(out0, run(q0, k0, v0, own[0]), atol=1e-5)
    np.testing.assert_allclose(out1, run(q1, k1, v1, own[0]), atol=1e-5)
    assert np.abs(out1 - run(q1, k1, v1, own[1])).max() > 1e-3
    alone = np.asarray(sparse_entry.sparse_attend(q1, k1, v1, cfg, calls[1], None))
    np.testing.assert_allclose(alone, run(q1, k1, v1, own[1]), atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
def test_shared_layout_over_ragged_rows_and_a_padding_row(dtype):
    """Rows of 256, 199 (odd) and 1 token (an engine's unused row): the second layer runs the
    first's layout row by row, and no row, the one-token row included, gives a NaN."""
    cfg = SparseConfig.from_dict(xattention(2))
    policy = cfg.policy_for(0)
    lengths = np.array([S, 199, 1], np.int32)

    def batch(seed):
        ks = jax.random.split(jax.random.key(seed), 3)
        shapes = ((3, S, HQ, D), (3, S, HKV, D), (3, S, HKV, D))
        return [(2.0 * jax.random.normal(kk, sh)).astype(dtype) for kk, sh in zip(ks, shapes)]

    (q0, k0, v0), (q1, k1, v1) = batch(10), batch(11)
    calls = [Prefill("prompt", i, D ** -0.5, lengths=lengths) for i in (0, 1)]
    first = layout_for(policy, q0, k0, calls[0])
    share = LayoutShare()
    sparse_entry.sparse_attend(q0, k0, v0, cfg, calls[0], share)
    out1 = np.asarray(sparse_entry.sparse_attend(q1, k1, v1, cfg, calls[1], share), np.float32)
    want = np.asarray(block_sparse_attention(q1, k1, v1, first, causal=True, sm_scale=D ** -0.5),
                      np.float32)
    assert np.isfinite(out1).all()
    tol = 1e-5 if dtype == np.float32 else 2e-2
    for r, n in enumerate(lengths):  # valid queries of each row
        np.testing.assert_allclose(out1[r, :n], want[r, :n], atol=tol)
    alone = np.asarray(sparse_entry.sparse_attend(q1, k1, v1, cfg, calls[1], None), np.float32)
    assert np.abs(alone[:2] - out1[:2]).max() > 10 * tol  # its own layout would differ


def tiny_llama(sparse) -> jp.Llama:
    cfg = jp.ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                         num_layers=4, num_heads=HQ, num_kv_heads=HKV, head_dim=8,
                         max_position_embeddings=512, eos_token_ids=(0,))
    m = jp.Llama(cfg, rngs=nnx.Rngs(0), attention=AttentionSpec(impl="xla", sparse=sparse))
    for _, p in nnx.to_flat_state(nnx.state(m, nnx.Param)):
        if p[...].ndim >= 2:
            p[...] = p[...] * 6.0  # peaked attention: layouts are sparse and differ by layer
    return m


@pytest.fixture
def layout_builds(monkeypatch) -> dict:
    """Counts the layouts built (at trace time), shared or not: {"n": count}."""
    count = {"n": 0}

    def counted(*args, **kwargs):
        count["n"] += 1
        return layout_for(*args, **kwargs)

    monkeypatch.setattr(sparse_entry, "layout_for", counted)
    monkeypatch.setattr(sparse_base, "layout_for", counted)
    return count


@pytest.mark.parametrize("share, builds", [(1, 4), (2, 2), (4, 1)])
def test_model_builds_one_layout_per_group(layout_builds, share, builds):
    model = tiny_llama(xattention(share))
    tokens = jax.random.randint(jax.random.key(3), (1, S), 1, 97)
    logits = model(tokens)
    assert layout_builds["n"] == builds and np.isfinite(np.asarray(logits)).all()


def test_deepseek_shares_too(layout_builds):
    """The MLA model passes its forward's LayoutShare to every layer as Llama does."""
    from jaxprefill.decoding import sparse_graphdef
    from tests.test_engine_mla import tiny_deepseek_v3

    model = tiny_deepseek_v3()  # 2 layers
    tokens = jax.random.randint(jax.random.key(5), (1, 128), 1, 97)
    for share, builds in ((1, 2), (2, 1)):
        layout_builds["n"] = 0
        spec = {"min_length": 32, "policy": "xattention",
                "params": {"block_size": 16, "stride": 4, "n_last": 0, "share_layers": share}}
        sparse = nnx.merge(sparse_graphdef(model, spec), nnx.state(model))
        assert np.isfinite(np.asarray(sparse.forward(tokens)[0])).all()
        assert layout_builds["n"] == builds


def test_eval_statistics_use_the_shared_layout():
    tokens = np.asarray(jax.random.randint(jax.random.key(4), (2, S), 1, 97), np.int32)
    lengths = np.array([S, S - 37])
    model = tiny_llama(None)
    configs = {"own": SparseConfig.from_dict(xattention(1)),
               "shared": SparseConfig.from_dict(xattention(2))}
    stats = layer_head_stats(model, tokens, lengths, configs, rows=16, min_pos=32, log=lambda _: 0)
    own, shared = stats["own"]["density"], stats["shared"]["density"]
    assert not np.allclose(own[1], own[0])  # the layers choose different blocks
    np.testing.assert_allclose(shared[1], own[0])  # layer 1 runs layer 0's layout
    np.testing.assert_allclose(shared[3], own[2])
    np.testing.assert_allclose(shared[[0, 2]], own[[0, 2]])
