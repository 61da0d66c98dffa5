"""Benchmark of the block-sparse Pallas GPU kernel against cuDNN dense causal attention.

    python3 scripts/bench_attention.py [--seqs 16384 65536 131072] [--out DIR] [--tune]

Shapes: B=1, Hq=32, Hkv=8, D=128, bf16 (a Llama-3-8B layer). Layouts: per-KV-head lists with
128x128 blocks at {100, 50, 20, 10, 5}% of each row's causal blocks (random; the sink block and
the diagonal block always in). Per row: median ms, TFLOP/s over the computed (listed) blocks,
cuDNN dense causal time / ours (same run), and ours / (density x our full-density time).
Writes bench_attention.json and bench_attention.txt to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import BlockSparseLayout  # noqa: E402
from pallas_kernels.gpu.block_sparse_triton import block_sparse_attention_triton  # noqa: E402
from pallas_kernels.layout import block_flops, causal_block_mask, random_block_mask  # noqa: E402

B, HQ, HKV, D, BLK = 1, 32, 8, 128, 128


def bench(f, *args, n=7):
    jax.block_until_ready(f(*args))
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), [float(x) for x in ts]


def make_qkv(S, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, S, HQ, D), jnp.bfloat16),
            jax.random.normal(ks[1], (B, S, HKV, D), jnp.bfloat16),
            jax.random.normal(ks[2], (B, S, HKV, D), jnp.bfloat16))


INTERPRET = False  # --interpret: CPU smoke test of this script (tiny S), not a benchmark


def ours(cfg):
    def f(q, k, v, lay):
        return block_sparse_attention_triton(q, k, v, lay, interpret=INTERPRET, **cfg)[0]
    return jax.jit(f)


def tune(S, q, k, v, log):
    lay = BlockSparseLayout.dense_causal(B, HKV, S, S, BLK, BLK)
    best = None
    for cfg in [dict(block_m=128, num_warps=8, num_stages=2),
                dict(block_m=128, num_warps=8, num_stages=3),
                dict(block_m=128, num_warps=8, num_stages=4),
                dict(block_m=128, num_warps=4, num_stages=3),
                dict(block_m=64, num_warps=4, num_stages=2),
                dict(block_m=128, num_warps=8, num_stages=2, pack_gqa=True)]:
        try:
            t, _ = bench(ours(cfg), q, k, v, lay, n=5)
        except Exception as e:  # a config may not compile (shared memory, registers)
            log(f"tune {cfg}: failed {type(e).__name__}: {str(e)[:200]}")
            continue
        log(f"tune S={S} {cfg}: {t * 1e3:.2f} ms")
        if best is None or t < best[0]:
            best = (t, cfg)
    return best[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="+", default=[16384, 65536, 131072])
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1, 0.05])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tune", action="store_true", help="pick launch parameters at the first S")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--interpret", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global INTERPRET
    INTERPRET = args.interpret
    dense_impl = "xla" if args.interpret else "cudnn"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    log(f"jax {jax.__version__} device {jax.devices()[0].device_kind} "
        f"date {time.strftime('%Y-%m-%d %H:%M:%S')}")
    cfg = dict(block_m=128, num_warps=8, num_stages=2)
    rows = []
    rng = np.random.default_rng(0)
    for si, S in enumerate(args.seqs):
        q, k, v = make_qkv(S, seed=si)
        if args.tune and si == 0:
            cfg = tune(S, q, k, v, log)
            log(f"chosen config: {cfg}")
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=dense_impl))
        t_cudnn, _ = bench(cudnn, q, k, v, n=args.reps)
        causal_flops = 4.0 * B * HQ * S * S * D / 2
        log(f"S={S} cudnn dense causal: {t_cudnn * 1e3:.2f} ms, "
            f"{causal_flops / t_cudnn / 1e12:.1f} TFLOP/s (causal FLOPs)")
        n_causal = causal_block_mask(S, S, BLK, BLK).sum() * B * HKV
        t_full = None
        layouts = [(d, True) for d in args.densities] + [(0.1, False)]
        for density, per_kv in layouts:
            try:
                H = HKV if per_kv else HQ
                mask = random_block_mask(rng, B, H, S, S, BLK, BLK, density)
                lay = BlockSparseLayout.from_block_mask(mask, BLK, BLK)
                listed = float(mask.sum()) * HKV / H
                actual = listed / n_causal
                t, ts = bench(ours(cfg), q, k, v, lay, n=args.reps)
            except Exception:
                log(traceback.format_exc(limit=4))
                continue
            if density == 1.0 and per_kv:
                t_full = t
            flops = block_flops(lay, HQ, D, D)
            row = dict(S=S, density=density, actual_density=actual,
                       layout="kv_head" if per_kv else "q_head", ms=t * 1e3,
                       tflops=flops / t / 1e12, cudnn_ms=t_cudnn * 1e3,
                       cudnn_over_ours=t_cudnn / t,
                       ours_over_ideal=(t / (actual * t_full)) if t_full else None,
                       times=ts, config=cfg)
            rows.append(row)
            ideal = f"{row['ours_over_ideal']:.2f}" if t_full else "-"
            log(f"S={S:6d} {row['layout']:7s} density={density:4.2f} (actual {actual:.3f}) "
                f"{t * 1e3:9.2f} ms {row['tflops']:6.1f} TFLOP/s  cudnn/ours={t_cudnn / t:5.2f}"
                f"  ours/ideal={ideal}")
        del q, k, v
    log("")
    log("| S | layout | density | ms | TFLOP/s (listed blocks) | cuDNN dense causal ms | "
        "cuDNN time / ours | ours / (density x full) |")
    log("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ideal = f"{r['ours_over_ideal']:.2f}" if r["ours_over_ideal"] else "-"
        dens = f"{r['density'] * 100:.0f}% ({r['actual_density'] * 100:.1f}%)"
        log(f"| {r['S']} | {r['layout']} | {dens} | {r['ms']:.2f} | {r['tflops']:.1f} | {r['cudnn_ms']:.2f} | "
            f"{r['cudnn_over_ours']:.2f} | {ideal} |")
    (out_dir / "bench_attention.txt").write_text("\n".join(lines) + "\n")
    with open(out_dir / "bench_attention.json", "w") as f:
        json.dump(dict(jax=jax.__version__, device=jax.devices()[0].device_kind, rows=rows,
                       shape=dict(B=B, Hq=HQ, Hkv=HKV, D=D, block=BLK)), f, indent=1)


if __name__ == "__main__":
    main()
