"""BLASST skip predicate (``blasst_threshold`` = lambda) in the reference and every kernel impl,
and the ``blasst`` sparse policy through the attention dispatch.

The rule (pallas_kernels.reference docstring): per query row, tiles (listed blocks in list order,
then column chunks) whose max logit is below the row's running max by more than ln(lambda) are
dropped from its softmax. A float64 NumPy loop re-implements it row by row here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.reference import blasst_skip_stats
from pallas_kernels.testing import assert_close, random_problem, run_problem


def numpy_blasst(p, lam):
    """float64 row-by-row BLASST attention of a Problem. Returns (out, lse, skipped, live)."""
    lay = p.layout()
    idx, cnt = np.asarray(lay.kv_idx), np.asarray(lay.kv_cnt)
    cidx, ccnt = np.asarray(lay.col_idx), np.asarray(lay.col_cnt)
    q, k, v = (np.asarray(x, np.float64) for x in (p.q, p.k, p.v))
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    Gl, G = Hq // idx.shape[1], Hq // Hkv
    log_lam = -math.inf if lam == 0 else math.log(lam)
    out = np.zeros((B, Sq, Hq, v.shape[-1]))
    lse = np.full((B, Hq, Sq), -np.inf)
    skipped = live = 0
    for b, h, i in np.ndindex(B, Hq, Sq):
        row = (b, h // Gl, i // p.block_q)
        tiles = [np.arange(idx[row][t] * p.block_k, (idx[row][t] + 1) * p.block_k)
                 for t in range(cnt[row])]
        cols = cidx[row][: ccnt[row]]
        tiles += [cols[c: c + p.block_k] for c in range(0, len(cols), p.block_k)]
        s = k[b, :, h // G] @ q[b, i, h] / math.sqrt(D)
        running, keys = -np.inf, []
        for keys_t in tiles:
            vis = keys_t[keys_t < Sk]
            vis = vis[vis <= i + p.q_offset[b]]
            if p.seg_q is not None:
                vis = vis[p.seg_kv[b, vis] == p.seg_q[b, i]]
            if not len(vis):
                continue
            x = s[vis].max()
            live += 1
            if x < running + log_lam:
                skipped += 1
            else:
                keys.extend(vis.tolist())
            running = max(running, x)
        if keys:
            w = np.exp(s[keys] - s[keys].max())
            out[b, i, h] = w @ v[b, keys, h // G] / w.sum()
            lse[b, h, i] = s[keys].max() + np.log(w.sum())
    return out, lse, skipped, live


def problem(seed, **kw):
    base = dict(B=2, Sq=77, Sk=77, Hq=6, Hkv=2, Dqk=32, Dv=16, block_q=16, block_k=16,
                per_kv_head=False, density=0.6, empty_row_frac=0.1, columns=10,
                col_only_frac=0.2, segments=True, dtype=np.float32)
    base.update(kw)
    p = random_problem(seed, **base)
    p.q = p.q * 3  # peakier logits: plenty of tiles far below the running max
    return p


@pytest.mark.parametrize("lam", [0.02, 0.3, 1.0])
def test_reference_matches_numpy_rule(lam):
    seed = int(np.random.default_rng().integers(2**31))
    p = problem(seed)
    want_out, want_lse, skipped, live = numpy_blasst(p, lam)
    out, lse = run_problem(p, "reference", blasst_threshold=lam)
    assert_close(out, lse, want_out, want_lse, low_precision=False)
    stats = blasst_skip_stats(jnp.asarray(p.q), jnp.asarray(p.k), jnp.asarray(p.v), p.layout(),
                              lam, q_offset=jnp.asarray(p.q_offset),
                              segment_ids=(jnp.asarray(p.seg_q), jnp.asarray(p.seg_kv)))
    print(f"lambda={lam}: skipped {skipped}/{live} row tiles; stats {stats}")
    assert skipped > 0, "no tile skipped: a vacuous test"
    assert stats["row_tiles"] == pytest.approx(skipped / live, abs=1e-6)


KERNELS = {
    "xla": {},
    "triton": dict(interpret=True),
    "mosaic_tpu": dict(interpret=pltpu.InterpretParams(uninitialized_memory="nan")),
}


@pytest.mark.parametrize("impl", sorted(KERNELS))
def test_kernels_match_reference_and_zero_is_off(impl):
    seed = int(np.random.default_rng().integers(2**31))
    # GQA 4, per-KV-head lists, random per-row q_offset, odd lengths, block_k != block_q.
    p = problem(seed, Sq=40, Sk=100, Hq=8, Hkv=2, per_kv_head=True, block_k=32,
                q_offset="random", segments=False)
    lam = 0.1
    ref = run_problem(p, "reference", blasst_threshold=lam)
    dense = p.reference()
    assert np.abs(np.asarray(ref[0], np.float64) - dense[0]).max() > 1e-3, "nothing skipped"
    out, lse = run_problem(p, impl, blasst_threshold=lam, **KERNELS[impl])
    assert_close(out, lse, np.asarray(ref[0], np.float64), np.asarray(ref[1], np.float64),
                 low_precision=False)
    if impl == "xla":  # lambda = 0 (ln 0 = -inf) never skips; Triton: the bf16 test below
        out0, lse0 = run_problem(p, impl, blasst_threshold=0.0, **KERNELS[impl])
        assert_close(out0, lse0, *dense, low_precision=False)


def test_bf16_triton_interpret_zero_is_off_and_bad_threshold():
    from pallas_kernels.gpu.block_sparse_triton import block_sparse_attention_triton

    seed = int(np.random.default_rng().integers(2**31))
    p = problem(seed, dtype=jnp.bfloat16, Hq=8, Hkv=2, per_kv_head=True)
    seg = (jnp.asarray(p.seg_q), jnp.asarray(p.seg_kv))
    out, lse = block_sparse_attention_triton(
        jnp.asarray(p.q), jnp.asarray(p.k), jnp.asarray(p.v), p.layout(), segment_ids=seg,
        blasst_threshold=0.0, interpret=True, poison_output=True)
    assert_close(out, lse, *p.reference(), low_precision=True)
    with pytest.raises(ValueError, match="lambda"):
        run_problem(p, "xla", blasst_threshold=1.5)


def test_blasst_policy_through_dispatch():
    from jaxprefill import sparse
    from jaxprefill.attention.dispatch import AttentionSpec, attend, reference_attention
    from jaxprefill.attention.dispatch import build_mask
    from pallas_kernels import block_sparse_attention

    pol = sparse.get("blasst", block_size=16)
    assert pol.threshold(8192) == pytest.approx(0.8 / 8192)  # calibrated lambda = a / L
    assert sparse.get("blasst", lam=0.25).threshold(10) == 0.25
    with pytest.raises(ValueError, match="lam"):
        sparse.get("blasst", lam=2.0)
    rng = np.random.default_rng()
    B, S, Hq, Hkv, D = 2, 72, 6, 2, 16
    q = jnp.asarray(3 * rng.standard_normal((B, S, Hq, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, S, Hkv, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, S, Hkv, D)), jnp.float32)
    layout = pol.build(q, k)
    np.testing.assert_array_equal(  # dense causal, one list per KV head
        np.asarray(layout.to_block_mask())[0, 0], np.tril(np.ones((5, 5), bool)))
    for lam in (0.2, 0.0):
        cfg = sparse.SparseConfig.parse({"policy": "blasst", "params": {"lam": lam},
                                         "min_length": 0, "block_size": 16, "kernel": "xla"})
        got = attend(q, k, v, spec=AttentionSpec(sparse=cfg), layer=0)
        want = block_sparse_attention(q, k, v, layout, blasst_threshold=lam, impl="reference")
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    dense = reference_attention(q, k, v, build_mask(S, S, B, True, None, None, None), D ** -0.5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(dense), atol=2e-5, rtol=2e-5)
