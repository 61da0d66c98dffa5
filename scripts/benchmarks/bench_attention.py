"""Benchmark of the block-sparse Pallas GPU kernels against cuDNN and tokamax dense attention.

    python -m scripts.benchmarks.bench_attention [--seqs 16384 65536 131072] [--out DIR]
        [--tune] [--impls mosaic triton] [--mla] [--quick]

Shapes: B=1, Hq=32, Hkv=8, D=128, bf16 (a Llama-3-8B layer). Layouts: per-KV-head lists with
128x128 blocks at {100, 50, 20, 10, 5}% of each row's causal blocks (random; the sink block and
the diagonal block always in). Per row: median ms, TFLOP/s over the computed (listed) blocks,
cuDNN dense causal time / ours and tokamax mosaic time / ours (same run), and
ours / (density x our full-density time). ``--impls``: ``mosaic`` (or ``mosaic_gpu``: the
Pallas Mosaic GPU kernel, sm90), ``mosaic_p`` (the same on a persistent grid) and ``triton``
(Pallas Triton lowering; timed at full density and 10% only). tokamax is optional: its wheels
are prepared on a machine with network access and carried to the GPU machine (``.whl`` and
``.stub`` on ``PYTHONPATH``); without it its columns read "-". ``--mla`` adds the MLA prefill
shape (Dqk=192, Dv=128, Hq=Hkv) at 16 heads x 32K and 128 heads x 8K, full causal.
Writes bench_attention.json and bench_attention.txt to --out.

``--quick``: only the headline rows, the Mosaic GPU kernel and cuDNN at full density (per-KV-head
layout) at 16K and 32K; writes bench_attention_quick.json (no tokamax, no .txt).

Either library version: the kernels run through ``pallas_kernels.block_sparse_attention(q, k, v,
layout, impl=NAME)`` with their default knobs, which the previous library API had too (it named
the backends ``pallas_mosaic`` and ``pallas_gpu``; the name is taken from
``pallas_kernels.IMPLS``). Only ``mosaic_p``, ``--variants`` and ``--tune`` pass knobs (a
``BlockSparseMosaicConfig`` now, kernel keywords before; ``--tune``: the Triton kernel itself).
To time a checkout of the previous library, put its root first on the import path, e.g. from a
folder outside both: ``PYTHONPATH=OLD_CHECKOUT:THIS_REPO python -m
scripts.benchmarks.bench_attention --quick --out DIR``; the output records which
``pallas_kernels`` ran (the previous commit's ``scripts/`` folder is no package, so
``scripts`` still comes from this repository).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels import BlockSparseLayout, block_sparse_attention
from pallas_kernels.gpu import block_sparse_mosaic
from pallas_kernels.gpu.block_sparse_triton import block_sparse_attention_triton
from pallas_kernels.layout import block_flops, causal_block_mask, random_block_mask
from scripts.common.impl_names import library_name, uses_current_names
from scripts.common.timing import time_ms

B, HQ, HKV, D, BLK = 1, 32, 8, 128, 128


# time_ms options: samples of queued calls lasting >= ~30 ms each (single sub-millisecond calls
# timed from the host varied by 3x here: dispatch noise); --reps samples.
TIMING = dict(warmup=1, sample_ms=30, max_calls=50)


def make_qkv(S, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, S, HQ, D), jnp.bfloat16),
            jax.random.normal(ks[1], (B, S, HKV, D), jnp.bfloat16),
            jax.random.normal(ks[2], (B, S, HKV, D), jnp.bfloat16))


INTERPRET = False  # --interpret: CPU smoke test of this script (tiny S), not a benchmark


# The names the imported library gives the two GPU kernels (module docstring).
CURRENT_API = uses_current_names(pallas_kernels.IMPLS)
MOSAIC = library_name("mosaic_gpu", pallas_kernels.IMPLS)
TRITON = library_name("triton", pallas_kernels.IMPLS)


def ours(cfg=None):
    """The Triton kernel: its defaults through the public entry point (at these shapes: block_m
    128, 8 warps, 2 stages; 1 stage at MLA's Dqk=192), or launch parameters ``cfg`` (--tune)
    on the kernel itself."""
    if cfg is None:
        return jax.jit(lambda q, k, v, lay: block_sparse_attention(
            q, k, v, lay, impl=TRITON, interpret=INTERPRET))
    return jax.jit(lambda q, k, v, lay: block_sparse_attention_triton(
        q, k, v, lay, interpret=INTERPRET, **cfg)[0])


def ours_mosaic(**knobs):
    """The Mosaic GPU kernel through the public entry point: its defaults, or ``knobs`` (fields
    of ``BlockSparseMosaicConfig``; the previous library took them as kernel keywords)."""
    if not knobs:
        return jax.jit(lambda q, k, v, lay: block_sparse_attention(q, k, v, lay, impl=MOSAIC))
    if CURRENT_API:
        config = block_sparse_mosaic.BlockSparseMosaicConfig(**knobs)
        return jax.jit(lambda q, k, v, lay: block_sparse_attention(
            q, k, v, lay, impl=MOSAIC, config=config))
    return jax.jit(lambda q, k, v, lay: block_sparse_mosaic.block_sparse_attention_mosaic(
        q, k, v, lay, **knobs)[0])


def kernel_fn(impl: str, cfg=None):
    """The jitted kernel of an --impls label."""
    if impl == "mosaic":
        return ours_mosaic()
    if impl == "mosaic_p":
        return ours_mosaic(persistent=True)
    return ours(cfg)


# Launch variants of the Mosaic kernel (--variants). Experiments measured slower and removed
# from the kernel: mbarriers instead of named barriers (with four producer warps and a full
# wait on the output stores), tokamax's tile order, FA3's intra-warpgroup overlap (22% slower),
# and issuing P V of step t and Q K^T of step t + 1 back to back with one wait (3-6% slower).
VARIANTS = [dict(), dict(persistent=True), dict(persistent=True, order="heads")]
IMPL_LABELS = ("mosaic", "mosaic_p", "triton")


def tokamax_fn():
    """tokamax's Mosaic GPU flash attention (dense causal), or None if not importable."""
    try:
        import tokamax
    except ImportError as e:
        print("tokamax not importable:", e, flush=True)
        return None
    return jax.jit(lambda q, k, v: tokamax.dot_product_attention(
        q, k, v, is_causal=True, implementation="mosaic"))


def bench_mla(log, rows, impls, tok, variants=False):
    """MLA prefill shape (Dqk=192, Dv=128, Hq=Hkv), full causal: ours vs tokamax mosaic."""
    for H, S in [(16, 32768), (128, 8192)]:
        ks = jax.random.split(jax.random.key(S + H), 3)
        q = jax.random.normal(ks[0], (1, S, H, 192), jnp.bfloat16)
        k = jax.random.normal(ks[1], (1, S, H, 192), jnp.bfloat16)
        v = jax.random.normal(ks[2], (1, S, H, 128), jnp.bfloat16)
        flops = 2.0 * H * S * S * (192 + 128) / 2
        t_tok = time_ms(tok, q, k, v, **TIMING).ms if tok is not None else None
        lay = BlockSparseLayout.dense_causal(1, H, S, S, BLK, BLK)
        if variants:
            for var in VARIANTS:
                try:
                    t = time_ms(ours_mosaic(**var), q, k, v, lay, **TIMING).ms
                    log(f"variant MLA H={H} S={S} mosaic {var}: {t:.3f} ms "
                        f"{flops / t / 1e9:.1f} TFLOP/s")
                except Exception as e:
                    log(f"variant MLA mosaic {var}: failed {type(e).__name__}: {str(e)[:300]}")
        for impl in impls:
            f = kernel_fn(impl)
            try:
                timing = time_ms(f, q, k, v, lay, **TIMING)
            except Exception:
                log(traceback.format_exc(limit=4))
                continue
            t = timing.ms
            tok_r = f"{t_tok / t:.2f}" if t_tok else "-"
            tok_ms = f"{t_tok:.2f}" if t_tok else "-"
            log(f"MLA H={H} S={S} {impl}: {t:.2f} ms {flops / t / 1e9:.1f} TFLOP/s; "
                f"tokamax mosaic {tok_ms} ms; tokamax/ours={tok_r}")
            rows.append(dict(kind="mla", impl=impl, H=H, S=S, ms=t,
                             tflops=flops / t / 1e9, times_ms=list(timing.samples_ms),
                             tokamax_ms=t_tok,
                             tokamax_over_ours=t_tok / t if t_tok else None))
        del q, k, v


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
            t = time_ms(ours(cfg), q, k, v, lay, reps=5, **TIMING).ms
        except Exception as e:  # a config may not compile (shared memory, registers)
            log(f"tune {cfg}: failed {type(e).__name__}: {str(e)[:200]}")
            continue
        log(f"tune S={S} {cfg}: {t:.2f} ms")
        if best is None or t < best[0]:
            best = (t, cfg)
    return best[1]


QUICK_SEQS = (16384, 32768)
QUICK_KEYS = ("impl", "impl_name", "S", "density", "layout", "ms", "tflops", "times_ms",
              "cudnn_ms", "cudnn_over_ours")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="+", default=[16384, 65536, 131072])
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1, 0.05])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tune", action="store_true", help="pick launch parameters at the first S")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--interpret", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impls", nargs="+", default=["mosaic", "triton"], choices=IMPL_LABELS,
                    type=lambda s: "mosaic" if s == "mosaic_gpu" else s,
                    help="mosaic (or mosaic_gpu): the Mosaic GPU kernel; mosaic_p: the same "
                         "with a persistent grid; triton: the Triton kernel")
    ap.add_argument("--dense-below", type=int, default=0,
                    help="only full density for sequences shorter than this")
    ap.add_argument("--mla", action="store_true", help="also the MLA prefill shapes")
    ap.add_argument("--variants", action="store_true",
                    help="also time mosaic launch variants (persistent, order) at full density")
    ap.add_argument("--quick", action="store_true",
                    help="headline rows only: mosaic and cuDNN, full density, 16K and 32K; "
                         "writes bench_attention_quick.json")
    args = ap.parse_args()
    if args.quick:
        args.seqs, args.densities, args.impls = list(QUICK_SEQS), [1.0], ["mosaic"]
        args.tune = args.mla = args.variants = False
        args.dense_below = 0
    global INTERPRET
    INTERPRET = args.interpret
    dense_impl = "xla" if args.interpret else "cudnn"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    library = os.path.dirname(os.path.abspath(pallas_kernels.__file__))
    log(f"jax {jax.__version__} device {jax.devices()[0].device_kind} "
        f"date {time.strftime('%Y-%m-%d %H:%M:%S')}")
    log(f"pallas_kernels {library} ({'current' if CURRENT_API else 'previous'} API: mosaic = "
        f"{MOSAIC!r}, triton = {TRITON!r})")
    cfg = None  # the Triton kernel's defaults, unless --tune picks launch parameters
    rows = []
    rng = np.random.default_rng(0)
    impls = [i for i in args.impls if not (args.interpret and i.startswith("mosaic"))]
    tok = None if (args.interpret or args.quick) else tokamax_fn()
    for si, S in enumerate(args.seqs):
        q, k, v = make_qkv(S, seed=si)
        if args.tune and si == 0 and "triton" in impls:
            cfg = tune(S, q, k, v, log)
            log(f"chosen config: {cfg}")
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=dense_impl))
        t_cudnn = time_ms(cudnn, q, k, v, reps=args.reps, **TIMING).ms
        causal_flops = 4.0 * B * HQ * S * S * D / 2
        log(f"S={S} cudnn dense causal: {t_cudnn:.2f} ms, "
            f"{causal_flops / t_cudnn / 1e9:.1f} TFLOP/s (causal FLOPs)")
        t_tok = None
        if tok is not None:
            try:
                t_tok = time_ms(tok, q, k, v, reps=args.reps, **TIMING).ms
                log(f"S={S} tokamax mosaic dense causal: {t_tok:.2f} ms, "
                    f"{causal_flops / t_tok / 1e9:.1f} TFLOP/s (causal FLOPs)")
            except Exception:
                log(traceback.format_exc(limit=4))
        n_causal = causal_block_mask(S, S, BLK, BLK).sum() * B * HKV
        if args.variants and "mosaic" in impls:
            lay = BlockSparseLayout.dense_causal(B, HKV, S, S, BLK, BLK)
            for var in VARIANTS:
                try:
                    t = time_ms(ours_mosaic(**var), q, k, v, lay, reps=args.reps, **TIMING).ms
                    log(f"variant S={S} mosaic {var}: {t:.3f} ms "
                        f"{causal_flops / t / 1e9:.1f} TFLOP/s")
                except Exception as e:
                    log(f"variant S={S} mosaic {var}: failed {type(e).__name__}: {str(e)[:300]}")
        layouts = [(d, True) for d in args.densities] + ([] if args.quick else [(0.1, False)])
        if S < args.dense_below:
            layouts = [(1.0, True)]
        masks = [(d, per_kv, random_block_mask(rng, B, HKV if per_kv else HQ, S, S, BLK, BLK, d))
                 for d, per_kv in layouts]
        for impl in impls:
            t_full = None
            fn = kernel_fn(impl, cfg)
            for density, per_kv, mask in masks:
                if impl == "triton" and density not in (1.0, 0.1):
                    continue  # the fallback kernel: full density and one sparse point
                if S < args.dense_below and density != 1.0:
                    continue
                try:
                    H = HKV if per_kv else HQ
                    lay = BlockSparseLayout.from_block_mask(mask, BLK, BLK)
                    listed = float(mask.sum()) * HKV / H
                    actual = listed / n_causal
                    timing = time_ms(fn, q, k, v, lay, reps=args.reps, **TIMING)
                except Exception:
                    log(traceback.format_exc(limit=4))
                    continue
                t = timing.ms
                if density == 1.0 and per_kv:
                    t_full = t
                flops = block_flops(lay, HQ, D, D)
                row = dict(impl=impl, impl_name=TRITON if impl == "triton" else MOSAIC, S=S,
                           density=density, actual_density=actual,
                           layout="kv_head" if per_kv else "q_head", ms=t,
                           tflops=flops / t / 1e9, cudnn_ms=t_cudnn,
                           cudnn_over_ours=t_cudnn / t,
                           tokamax_ms=t_tok,
                           tokamax_over_ours=t_tok / t if t_tok else None,
                           ours_over_ideal=(t / (actual * t_full)) if t_full else None,
                           times_ms=list(timing.samples_ms),
                           config=(cfg or "kernel defaults") if impl == "triton" else {})
                rows.append(row)
                ideal = f"{row['ours_over_ideal']:.2f}" if t_full else "-"
                tokr = f"{t_tok / t:5.2f}" if t_tok else "-"
                log(f"S={S:6d} {impl:6s} {row['layout']:7s} density={density:4.2f} "
                    f"(actual {actual:.3f}) {t:9.2f} ms {row['tflops']:6.1f} TFLOP/s  "
                    f"cudnn/ours={t_cudnn / t:5.2f}  tokamax/ours={tokr}  ours/ideal={ideal}")
        del q, k, v
    header = dict(jax=jax.__version__, device=jax.devices()[0].device_kind, library=library,
                  api="current" if CURRENT_API else "previous",
                  shape=dict(B=B, Hq=HQ, Hkv=HKV, D=D, block=BLK))
    if args.quick:
        quick = [{key: r[key] for key in QUICK_KEYS} for r in rows]
        with open(out_dir / "bench_attention_quick.json", "w") as f:
            json.dump(dict(header, rows=quick), f, indent=1)
        return
    mla_rows = []
    if args.mla and not args.interpret:
        bench_mla(log, mla_rows, impls, tok, variants=args.variants)
    log("")
    log("| impl | S | layout | density | ms | TFLOP/s (listed blocks) | cuDNN dense causal ms | "
        "cuDNN time / ours | tokamax mosaic ms | tokamax time / ours | ours / (density x full) |")
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ideal = f"{r['ours_over_ideal']:.2f}" if r["ours_over_ideal"] else "-"
        dens = f"{r['density'] * 100:.0f}% ({r['actual_density'] * 100:.1f}%)"
        tok_ms = f"{r['tokamax_ms']:.2f}" if r["tokamax_ms"] else "-"
        tok_r = f"{r['tokamax_over_ours']:.2f}" if r["tokamax_over_ours"] else "-"
        log(f"| {r['impl']} | {r['S']} | {r['layout']} | {dens} | {r['ms']:.2f} | "
            f"{r['tflops']:.1f} | {r['cudnn_ms']:.2f} | {r['cudnn_over_ours']:.2f} | {tok_ms} | "
            f"{tok_r} | {ideal} |")
    for r in mla_rows:
        tok_r = f"{r['tokamax_over_ours']:.2f}" if r["tokamax_over_ours"] else "-"
        log(f"| MLA {r['impl']} H={r['H']} | {r['S']} | - | 100% | {r['ms']:.2f} | "
            f"{r['tflops']:.1f} | - | - | "
            f"{format(r['tokamax_ms'], '.2f') if r['tokamax_ms'] else '-'} | {tok_r} | - |")
    (out_dir / "bench_attention.txt").write_text("\n".join(lines) + "\n")
    with open(out_dir / "bench_attention.json", "w") as f:
        json.dump(dict(header, rows=rows, mla_rows=mla_rows), f, indent=1)


if __name__ == "__main__":
    main()
