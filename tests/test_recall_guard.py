"""The recall guard (jaxprefill.sparse.recall_guard): probe recall equals a direct float64
computation, heads below the target become dense, whole prompts and chunk windows, configs."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from jaxprefill import sparse
from jaxprefill.sparse import SparseConfig, prefill
from jaxprefill.sparse.base import make_geometry, make_row_geometry
from jaxprefill.sparse.recall_guard import guard_heads, probe_recall, probe_rows
from pallas_kernels import block_sparse_attention

B, S, HQ, HKV, D, BLK = 2, 300, 4, 2, 16, 32  # S not a multiple of the block; GQA 2


def qk(seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    q = scale * rng.standard_normal((B, S, HQ, D)).astype(np.float32)
    k = scale * rng.standard_normal((B, S, HKV, D)).astype(np.float32)
    return q, k


def recall_direct(mask, q, k, lengths, pos, rows):
    """float64 recall of mask [B, Hm, nq, n] for query positions pos [B, P, Q] on rows [B, P]."""
    b_, p_, q_ = pos.shape
    g = HQ // HKV
    out = np.zeros((b_, HQ, p_))
    for b in range(b_):
        for h in range(HQ):
            hm = h if mask.shape[1] == HQ else (h // g if mask.shape[1] == HKV else 0)
            for p in range(p_):
                vals = []
                for t in pos[b, p]:
                    s = (k[b, :, h // g].astype(np.float64) @ q[b, t, h].astype(np.float64)) / np.sqrt(D)
                    vis = (np.arange(S) <= t) & (np.arange(S) < lengths[b])
                    e = np.where(vis, np.exp(s - s[vis].max()), 0.0)
                    e /= e.sum()
                    kept = np.repeat(mask[b, hm, rows[b, p]], BLK)[:S]
                    vals.append(e[kept].sum())
                out[b, h, p] = np.mean(vals)
    return out


@pytest.mark.parametrize("heads", [HQ, HKV, 1])
def test_probe_recall_matches_direct(heads):
    q, k = qk()
    lengths = np.array([S, 201], np.int32)
    geo = make_geometry(jnp.asarray(q), jnp.asarray(k), BLK, jnp.asarray(lengths))
    rng = np.random.default_rng(1)
    mask = (rng.random((B, heads, geo.n, geo.n)) < 0.4) & np.asarray(geo.causal())
    got = np.asarray(probe_recall(jnp.asarray(mask), jnp.asarray(q), jnp.asarray(k), geo,
                                  probes=3, queries=4))
    rows = np.asarray(probe_rows(geo, 3))
    assert (rows[:, 0] == np.array([9, 6])).all()  # the last valid row first
    step = BLK // 4
    pos = np.minimum(rows[:, :, None] * BLK + np.arange(4) * step + step - 1,
                     lengths[:, None, None] - 1)
    want = recall_direct(mask, q, k, lengths, pos, rows)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert (got >= 0).all() and (got <= 1 + 1e-5).all()


def test_guard_makes_failing_heads_dense_and_keeps_the_others():
    q, k = qk(2)
    geo = make_geometry(jnp.asarray(q), jnp.asarray(k), BLK, None)
    causal = geo.causal()
    diag = jnp.broadcast_to(geo.diagonal() | (jnp.arange(geo.n) == 0), (B, HQ, geo.n, geo.n))
    mask = jnp.where(jnp.arange(HQ)[None, :, None, None] == 1, causal, diag & causal)
    out = guard_heads(mask, causal, jnp.asarray(q), jnp.asarray(k), geo, target=0.9)
    full = np.broadcast_to(np.asarray(causal), out.shape)
    out = np.asarray(out)
    # head 1 was already dense (recall 1); sink + diagonal misses most of the mass on random q/k
    assert (out == full).all()
    lax = guard_heads(mask, causal, jnp.asarray(q), jnp.asarray(k), geo, target=1e-6)
    assert (np.asarray(lax) == np.asarray(mask)).all()  # nothing below a tiny target


def test_policy_guard_target_one_gives_dense_attention():
    """recall_target 1.0: every head that drops any mass runs dense, so the block-sparse output
    is the dense causal output."""
    q, k = qk(3)
    v = np.random.default_rng(4).standard_normal((B, S, HKV, D)).astype(np.float32)
    q, k, v = map(jnp.asarray, (q, k, v))
    lengths = jnp.asarray([S, 250], jnp.int32)
    plain = sparse.get("streaming", block_size=BLK, sink=BLK, local=2 * BLK)
    guarded = sparse.get("streaming", block_size=BLK, sink=BLK, local=2 * BLK, recall_target=1.0)
    dense = sparse.get("dense", block_size=BLK)

    def out(policy):
        layout = policy.build(q, k, lengths=lengths)
        return np.asarray(block_sparse_attention(q, k, v, layout, causal=True, impl="xla",
                                                 segment_ids=None)), layout

    want, full = out(dense)
    got, layout = out(guarded)
    _, thin = out(plain)
    assert int(np.asarray(thin.kv_cnt).sum()) < int(np.asarray(full.kv_cnt).sum())
    valid = np.arange(S)[None, :] < np.asarray(lengths)[:, None]
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-5)


def test_chunk_window_probes_its_own_rows():
    q, k = qk(5)
    q, k = jnp.asarray(q), jnp.asarray(k)
    row0 = jnp.asarray([3, 5], jnp.int32)
    lengths = jnp.asarray([6 * BLK, 6 * BLK + 7], jnp.int32)  # 3 and 2 valid rows in the window
    geo = make_row_geometry(q[:, :3 * BLK], k, BLK, row0, lengths)
    rows = np.asarray(probe_rows(geo, 3))
    np.testing.assert_array_equal(rows, [[2, 1, 1], [1, 1, 1]])  # never row 0 when others exist
    policy = sparse.get("xattention", block_size=BLK, threshold=0.5, stride=8, recall_target=0.95)
    offset = jnp.asarray([3 * BLK, 5 * BLK], jnp.int32)
    layout = prefill.chunk_layout(policy, q[:, :3 * BLK], k, offset,
                                  jnp.asarray([3 * BLK, BLK + 7], jnp.int32), 0)
    assert layout.kv_idx.shape[:3] == (B, HQ, 3)


def test_config_and_refusals():
    cfg = SparseConfig.from_dict({"policy": "flexprefill", "recall_target": 0.9,
                                  "recall_probes": 3})
    policy = cfg.rules[0].policy
    assert (policy.recall_target, policy.recall_probes) == (0.9, 3)
    for params, message in (({"recall_target": 1.5}, "recall_target must be in"),
                            ({"recall_target": 0.9, "recall_probes": 0}, "recall_probes"),
                            ({"recall_target": 0.9, "max_nnz": 8}, "max_nnz unset")):
        with pytest.raises(ValueError, match=message):
            sparse.get("xattention", **params)
    with pytest.raises(ValueError, match="pbs: no recall guard"):
        sparse.get("pbs", recall_target=0.9)
