"""Times the building blocks of the estimator policies at one length (where does estimation go?).

    python -m scripts.benchmarks.profile_estimators_gpu --seq 131072 [--out DIR]

Llama-3-8B attention shapes (Hq=32, Hkv=8, D=128, bf16, batch 1), structured synthetic q/k.
Each line: median ms of a jitted block (5 calls after one warm-up call,
``scripts.common.timing.time_ms``) and, for comparison, cuDNN causal attention at the same
length (the estimation bar is 5% of it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxprefill import sparse
from jaxprefill.eval.synthetic_qk import structured_qk
from jaxprefill.sparse import estimators as est
from jaxprefill.sparse.base import make_geometry
from scripts.common.timing import time_ms

REPS = 5  # time_ms samples of one call each, after one warm-up call


def last_q_probs_softmax(q, k, geo, n_last: int):
    """The previous form of `estimators.last_q_probs` (jax.nn.softmax plus two selects), kept
    here to time it against the fused one (18.7 vs 10.6 ms standalone at 128K on an H100)."""
    ql, pos = est.last_queries(q, geo, n_last)
    s = est.grouped_logits(ql, k) * geo.scale
    ok = (jnp.arange(geo.S)[None, None, :] <= pos[:, :, None]) & (pos[:, :, None] >= 0)
    p = jax.nn.softmax(jnp.where(ok[:, None], s, -jnp.inf), axis=-1)
    return jnp.where(ok[:, None], p, 0.0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=131072)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    s, hq, hkv, d = args.seq, 32, 8, 128
    q, k = jax.jit(structured_qk, static_argnums=(1, 2, 3, 4, 5))(jax.random.key(0), 1, s, hq,
                                                                   hkv, d)
    v = jax.random.normal(jax.random.key(1), (1, s, hkv, d), jnp.bfloat16)
    gpu = jax.default_backend() == "gpu"
    geo = make_geometry(q, k, 128, None)
    rows = {}
    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn" if gpu else None))
    rows["cudnn_causal"] = time_ms(dense, q, k, v, reps=REPS).ms
    probs = jax.jit(lambda q, k: est.last_q_probs(q, k, geo, 128))
    rows["last_q_probs"] = time_ms(probs, q, k, reps=REPS).ms
    p = probs(q, k)
    logits = jax.jit(lambda q, k: est.grouped_logits(est.last_queries(q, geo, 128)[0], k))(q, k)
    # (each function is jitted once, outside the timed lambda: a jit inside it recompiles)
    blocks = {
        "vert_sum": (jax.jit(lambda p: p.sum(axis=2)), (p,)),
        "slash_skew": (jax.jit(lambda p: est.slash_sums(p, geo, 128)), (p,)),
        "slash_gather": (jax.jit(lambda p: est.slash_sums_gather(p, geo, 128)), (p,)),
        "slash_skew_bf16": (jax.jit(lambda p: est.slash_sums(p, geo, 128)),
                            (p.astype(jnp.bfloat16),)),
        "probs_then_vert": (jax.jit(lambda q, k: est.last_q_probs(q, k, geo, 128).sum(axis=2)),
                            (q, k)),
        "old_probs": (jax.jit(lambda q, k: last_q_probs_softmax(q, k, geo, 128)), (q, k)),
        "old_probs_then_vert": (jax.jit(lambda q, k: last_q_probs_softmax(
            q, k, geo, 128).sum(axis=2)), (q, k)),
        "probs_vert_slash": (jax.jit(lambda q, k: (lambda p: (p.sum(axis=2), est.slash_sums(
            p, geo, 128)))(est.last_q_probs(q, k, geo, 128))), (q, k)),
        "old_probs_vert_slash": (jax.jit(lambda q, k: (lambda p: (p.sum(axis=2), est.slash_sums(
            p, geo, 128)))(last_q_probs_softmax(q, k, geo, 128))), (q, k)),
        "logits_only": (jax.jit(lambda q, k: est.grouped_logits(
            est.last_queries(q, geo, 128)[0], k)), (q, k)),
        "pool_blocks_k": (jax.jit(lambda k: est.pool_blocks(k, geo)), (k,)),
        "softmax_only": (jax.jit(lambda s: jax.nn.softmax(s, axis=-1)), (logits,)),
        "max_sum_only": (jax.jit(lambda s: (s.max(-1), jnp.exp(s - s.max(-1, keepdims=True))
                                            .sum(-1))), (logits,)),
    }
    for name, kw in [("flexprefill", {}), ("proxyattn", {}), ("minference", {}),
                     ("xattention", dict(stride=16))]:
        pol = sparse.get(name, **kw)
        g = make_geometry(q, k, pol.block_size, None, pol.estimation)
        blocks[f"{name}_select"] = (jax.jit(lambda q, k, pol=pol, g=g: pol.select(q, k, g, 20)),
                                    (q, k))
        blocks[f"{name}_build"] = (jax.jit(lambda q, k, pol=pol: pol.build(q, k, layer=20)),
                                   (q, k))
    pbs = sparse.get("pbs")
    blocks["pbs_permutation"] = (jax.jit(lambda q, k: pbs.permutation(q, k, geo)), (q, k))
    blocks["pbs_build"] = (jax.jit(lambda q, k: pbs.build(q, k, layer=20)), (q, k))
    for name, (fn, fargs) in blocks.items():
        rows[name] = time_ms(fn, *fargs, reps=REPS).ms
    for name, ms in rows.items():
        print(f"{name:24s} {ms:9.3f} ms  {ms / rows['cudnn_causal']:7.2%} of cuDNN", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "profile_estimators.json").write_text(json.dumps(
            dict(device=jax.devices()[0].device_kind, seq=s, ms=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
