"""Row-restricted layouts for chunked prefill: `Policy.build_rows` through
`jaxprefill.sparse.prefill.chunk_layout` equals the whole-prefix path (the policy's layout of the prompt
truncated at the chunk's end, prefix queries zero, then the chunk's rows), for every policy.

Sizes are small (512 keys, block 64): XLA compile time dominates, so each policy case compiles
the reference and the row path once (one jit) and runs it for aligned and unaligned offsets.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprefill import sparse
from jaxprefill.sparse import prefill
from jaxprefill.sparse.registry import available
from pallas_kernels import block_sparse_attention

B, SK, SQ, D, BLOCK = 2, 512, 192, 16, 64
Q_LENGTHS = (187, 101)  # valid queries of each row's chunk (odd: padded last block)
ALIGNED = (192, 64)  # q_offset per row, on block boundaries (the engine's case)
UNALIGNED = (200, 37)  # chunks starting inside a block: union of two rows per chunk block
EARLY = (64, 0)  # chunks ending by key 256 = SK / 2: estimated over the first 256 keys only

# Static configurations: (heads, Hq, Hkv, max_nnz, min_length). C1: per query head, GQA 3, no
# cap. C2: per KV head (group union), GQA 4, a cap of 3 blocks, row 1 (165 tokens) below
# min_length (dense). On random q/k at these sizes minference's >= 50 slash diagonals cover every
# block diagonal: without a cap its columns all fall in listed blocks and are dropped.
C1 = ("q", 6, 2, None, 0)
C2 = ("kv", 4, 1, 3, 300)
C3 = ("q", 6, 2, 3, 0)  # per query head with a cap: minference's columns survive (see below)

MIXED = "mixed-head-config"  # minference with a per-head vs / bs / a config (written per test)

# (policy, params, config). Every registered policy but pbs must appear (see the test below).
# n_last 0 (no dense query tail) where the method's own layout is under test: at these sizes the
# default 128-query tail would make most of a chunk dense.
CASES = [
    ("dense", {}, C2),
    ("streaming", {"sink": 64, "local": 128}, C1),
    ("trianglemix", {"start_layer": 0, "n_init": 8, "n_local": 128, "n_last": 64}, C2),
    ("blasst", {}, C1),
    ("xattention", {"threshold": 0.6, "stride": 8, "n_last": 0}, C1),
    ("xattention", {"threshold": 0.6, "stride": 8, "n_last": 40}, C2),  # each chunk's tail
    # flexprefill: vertical-slash heads (tau 0), then query-aware heads (tau 1)
    ("flexprefill", {"gamma": 0.9, "tau": 0.0, "min_budget": 64, "n_last": 0}, C1),
    ("flexprefill", {"gamma": 0.7, "tau": 1.0, "min_budget": 64, "n_last": 0}, C2),
    ("minference", {"vertical": 20, "slash": 30, "force_vertical": 4, "force_slash": 16,
                    "n_last": 0}, C3),
    ("minference", {"head_config": MIXED, "force_vertical": 4, "force_slash": 16,
                    "n_last": 0}, C2),
    ("proxyattn", {"gamma": 0.8, "stride": 16, "n_last": 0}, C2),
    # key columns on block policies: per query head with a cap, per KV head (group union)
    ("xattention", {"threshold": 0.6, "stride": 8, "n_last": 0, "key_columns": 12}, C3),
    ("proxyattn", {"gamma": 0.8, "stride": 16, "n_last": 0, "key_columns": 6}, C2),
    ("oracle_topk", {"gamma": 0.8}, C1),
]


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
    """These tests compare masks, not speed: XLA's cheaper compile keeps them fast on CPU."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def reference_layout(policy, q, k, q_offset, q_lengths, min_length):
    """Today's chunk path, kept here verbatim in spirit: the whole truncated prompt's layout
    (chunk queries at their positions, prefix queries zero), then the chunk's rows."""
    b, sq, hq, d = q.shape
    ends = q_offset + q_lengths
    q_full = jax.vmap(lambda z, x, o: jax.lax.dynamic_update_slice_in_dim(z, x, o, axis=0))(
        jnp.zeros((b, k.shape[1], hq, d), q.dtype), q, q_offset)
    full = policy.build(q_full, k, layer=0, lengths=ends, min_length=min_length)
    return prefill.take_rows(full, q_offset, sq)


def make_policy(name, params, config, tmp_path):
    heads, hq, _, max_nnz, _ = config
    params = dict(params)
    if params.get("head_config") == MIXED:
        pats = [["vs", 20, 30], ["bs", 2, 0], ["a", 64, 128]]
        path = tmp_path / "heads.json"
        path.write_text(json.dumps({"layers": {"0": [pats[h % 3] for h in range(hq)]}}))
        params["head_config"] = str(path)
    # estimation over bucketed key extents (an EARLY chunk takes a smaller extent than the view)
    return sparse.get(name, block_size=BLOCK, heads=heads, max_nnz=max_nnz,
                      estimation={"extent": "bucket"}, **params)


def inputs(hq, hkv, seed=0):
    rng = np.random.default_rng(seed)
    # scaled: peaked attention, so the estimators really drop blocks
    q = jnp.asarray(2.0 * rng.standard_normal((B, SQ, hq, D)), jnp.float32)
    k = jnp.asarray(2.0 * rng.standard_normal((B, SK, hkv, D)), jnp.float32)
    return q, k


def test_every_policy_is_covered():
    covered = {name for name, _, _ in CASES}
    missing = set(available()) - covered - {"pbs"}
    assert not missing, f"add row-path cases for {sorted(missing)}"
    for name in covered:
        assert sparse.registry.policy_class(name).rows_exact, name
    # pbs reorders keys: it takes whole prompts only (chunks stay dense), no row path
    assert not sparse.registry.policy_class("pbs").rows_exact
    assert sparse.registry.policy_class("pbs").kinds == ("prompt",)


@pytest.mark.parametrize("name,params,config", CASES,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)])
def test_row_layout_equals_whole_prefix_rows(name, params, config, tmp_path):
    policy = make_policy(name, params, config, tmp_path)
    _, hq, hkv, max_nnz, min_length = config
    q, k = inputs(hq, hkv)
    lengths = jnp.asarray(Q_LENGTHS, jnp.int32)

    @jax.jit
    def both(q, k, offset):
        return (reference_layout(policy, q, k, offset, lengths, min_length),
                prefill.chunk_layout(policy, q, k, offset, lengths, min_length, 0))

    for offsets in (ALIGNED, UNALIGNED, EARLY):
        want, got = both(q, k, jnp.asarray(offsets, jnp.int32))
        assert got.num_kv_blocks == want.num_kv_blocks == SK // BLOCK
        assert got.num_q_blocks == want.num_q_blocks == -(-SQ // BLOCK)
        np.testing.assert_array_equal(np.asarray(got.to_block_mask()),
                                      np.asarray(want.to_block_mask()), err_msg=str(offsets))
        assert (got.col_idx is None) == (want.col_idx is None)
        if want.col_idx is not None:
            np.testing.assert_array_equal(np.asarray(got.column_mask(SK)),
                                          np.asarray(want.column_mask(SK)), err_msg=str(offsets))
        if max_nnz is not None:
            assert int(np.max(np.asarray(got.kv_cnt))) <= 2 * max_nnz  # union of 2 capped rows
    if name not in ("dense", "blasst"):  # not vacuous: the chunk's rows drop blocks
        _, got = both(q, k, jnp.asarray(ALIGNED, jnp.int32))
        listed = np.asarray(got.to_block_mask())
        fewer = listed.sum() < np.broadcast_to(causal_blocks(ALIGNED), listed.shape).sum()
        assert fewer
        if name == "minference" or params.get("key_columns"):  # and some columns survive
            assert int(np.asarray(got.col_cnt).sum()) > 0


def causal_blocks(offsets) -> np.ndarray:
    """bool [B, 1, nq, n]: causal valid blocks of aligned chunk rows (padding rows: diagonal)."""
    ends = np.asarray(offsets) + np.asarray(Q_LENGTHS)
    row = np.asarray(offsets)[:, None, None, None] // BLOCK + np.arange(-(-SQ // BLOCK))[:, None]
    col = np.arange(SK // BLOCK)
    valid = row < (ends[:, None, None, None] + BLOCK - 1) // BLOCK
    return np.where(valid, col <= row, col == row)


def test_chunk_attention_equals_whole_prefix_path():
    """End to end: the chunk's sparse attention (xla block gather, columns included) is the
    same with the row layout as with the whole-prefix layout."""
    params = {"vertical": 20, "slash": 30, "force_vertical": 4, "force_slash": 16, "n_last": 0}
    policy = make_policy("minference", params, C3, None)
    q, k = inputs(6, 2, seed=1)
    v = jnp.asarray(np.random.default_rng(2).standard_normal((B, SK, 2, D)), jnp.float32)
    lengths, offset = jnp.asarray(Q_LENGTHS, jnp.int32), jnp.asarray(ALIGNED, jnp.int32)

    @jax.jit
    def attend(q, k, v, offset):
        outs = []
        for layout in (prefill.whole_prefix_layout(policy, q, k, offset, lengths, 0, 0),
                       prefill.chunk_layout(policy, q, k, offset, lengths, 0, 0)):
            outs.append(block_sparse_attention(q, k, v, layout, causal=True, sm_scale=D ** -0.5,
                                               impl="xla", q_offset=offset))
        return outs + [layout.col_cnt.sum()]

    want, got, n_cols = attend(q, k, v, offset)
    assert int(n_cols) > 0  # the kernel's column path is exercised
    valid = np.arange(SQ)[None, :] < np.asarray(Q_LENGTHS)[:, None]  # padding queries: any
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid],
                               atol=1e-6, rtol=1e-6)



@pytest.mark.parametrize("name,params,config", CASES,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)])
def test_prompt_layout_over_bucketed_extent_equals_full(name, params, config, tmp_path):
    """A whole prompt in a wider row: the layout built over the first power-of-two extent that
    holds the longest row (widened back: diagonal-only rows past it) equals the policy's layout
    over the whole row, for extents below, at and above half the row."""
    policy = make_policy(name, params, config, tmp_path)
    _, hq, hkv, _, min_length = config
    rng = np.random.default_rng(3)
    s = 4 * SK  # 32 key blocks: rows below the extent have blocks to drop
    q = jnp.asarray(2.0 * rng.standard_normal((B, s, hq, D)), jnp.float32)
    k = jnp.asarray(2.0 * rng.standard_normal((B, s, hkv, D)), jnp.float32)
    full = dataclasses.replace(policy, estimation=sparse.Estimation(extent="full"))

    @jax.jit
    def both(lengths):
        return (full.build(q, k, layer=0, lengths=lengths, min_length=min_length),
                prefill.prompt_layout(policy, q, k, lengths, min_length, 0))

    for lengths in ((900, 401), (250, 33), (1700, 101)):  # extents 1024, 256, the whole row
        want, got = both(jnp.asarray(lengths, jnp.int32))
        assert got.num_q_blocks == want.num_q_blocks and got.num_kv_blocks == want.num_kv_blocks
        np.testing.assert_array_equal(np.asarray(got.to_block_mask()),
                                      np.asarray(want.to_block_mask()), err_msg=str(lengths))
        if want.col_idx is not None:
            np.testing.assert_array_equal(np.asarray(got.column_mask(s)),
                                          np.asarray(want.column_mask(s)), err_msg=str(lengths))


def test_key_extents():
    assert prefill.key_extents(64, 512, 64) == (64, 128, 256, 512)
    assert prefill.key_extents(192, 512, 64) == (256, 512)
    assert prefill.key_extents(16384, 131072, 128) == (16384, 32768, 65536, 131072)
    assert prefill.key_extents(300, 512, 64) == (512,)  # nothing at most half the keys
