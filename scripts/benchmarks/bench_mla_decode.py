"""Speed of `mla_decode` at batch 64 x 32K context (H=16 and 128), as GB/s of latent-cache read
against a device copy measured in the same run.

    python -m scripts.benchmarks.bench_mla_decode [--out DIR] [--batch 64] [--context 32768]
        [--heads 16,64,128] [--only SUBSTRING] [--no-anchors] [--impls triton mosaic] [--quick]

``--impls``: ``triton`` (the Pallas Triton kernel) and ``mosaic`` (or ``mosaic_gpu``: the Pallas
Mosaic GPU kernel, Hopper), each with its variants (``VARIANTS``, ``MOSAIC_VARIANTS``).
Bytes counted: the cache pages read (B * context * 576 * 2 bytes bf16; queries/outputs are
< 1% and left out). Copy bandwidth: a jnp copy of an array of the cache's size, counting bytes
read + written. Matmul anchor: an 8192^3 bf16 product (the tensor-core rate XLA reaches), since
H=128 is compute-bound (2 * H * (512 + 64 + 512) FLOPs per 1152 cache bytes). Times: median ms
per call over 7 samples of 10 queued calls (``TIMING``).

``--quick``: only the headline rows, the copy anchor and the Mosaic GPU kernel's defaults at 16
and 128 heads (batch and context as given, 64 x 32K by default); writes
bench_mla_decode_quick.json.

Either library version: every variant runs through ``pallas_kernels.mla_decode(..., impl=NAME,
num_splits=...)``, which the previous library API had too (it named the backends
``pallas_mosaic`` and ``pallas_gpu``: the name is taken from ``pallas_kernels.mla_ops.IMPLS``).
A variant's other knobs go in ``config`` (an ``MLADecodeMosaicConfig``, or a dict for Triton);
the previous API took them as keywords. To time a checkout of the previous library, put its
root first on the import path, e.g. from a folder outside both: ``PYTHONPATH=OLD_CHECKOUT:
THIS_REPO python -m scripts.benchmarks.bench_mla_decode --quick --out DIR``; the output records
which ``pallas_kernels`` ran (the previous commit's ``scripts/`` folder is no package, so
``scripts`` still comes from this repository).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels import mla_decode, mla_ops
from pallas_kernels.gpu import mla_decode_mosaic
from scripts.common.impl_names import library_name, uses_current_names
from scripts.common.timing import time_ms

PAGE, DC, DR = 64, 512, 64
TAU = float(192 ** -0.5 * (0.1 * np.log(40.0) + 1) ** 2)
TIMING = dict(warmup=1, reps=7, calls=10)  # time_ms options: samples of 10 queued calls


VARIANTS = {  # H -> [(name, kernel kwargs)]; "default" is what mla_decode runs.
    # Not listed: block_h=128 does not compile on the H100 (Triton asks for 256-288 KB of shared
    # memory, 227 KB available, at any block_n / num_stages / num_warps tried; 2026-11-23), and
    # block_n=128 (two pages per softmax step) ran 15x slower at H=128 (35 ms).
    16: [("default", {}),
         ("bh16 stages3", dict(block_h=16, num_stages=3)),
         ("bh16 bn32 stages4", dict(block_h=16, block_n=32, num_stages=4)),
         ("bh16 splits1", dict(block_h=16, num_splits=1))],
    64: [("default", {})],
    128: [("default", {}),
          ("bh64 splits3 (old default split)", dict(block_h=64, num_splits=3)),
          ("bh64 stages3", dict(block_h=64, num_stages=3)),
          ("bh64 w16", dict(block_h=64, num_warps=16)),
          ("bh64 w16 stages3", dict(block_h=64, num_warps=16, num_stages=3)),
          ("bh64 bn32 stages3", dict(block_h=64, block_n=32, num_stages=3)),
          ("bh32 (old default)", dict(block_h=32))],
}

MOSAIC_VARIANTS = {  # the Mosaic GPU kernel (pallas_kernels/gpu/mla_decode_mosaic.py)
    # (2026-11-23 H100: no_auto_barriers and 2 splits were 3-9% slower at H=128, equal at H=16;
    # named-barrier hand-overs 10% slower at H=128; at H=64 1 split 13% slower, 4 splits 2%;
    # clusters of 2 CTAs with multicast page loads were slower and are gone from the kernel)
    # pps2 = two pages per pipeline step (fits shared memory for TPLA shards, --dc 256 only)
    16: [("mosaic default", {}), ("mosaic seesaw", dict(schedule="seesaw")),
         ("mosaic pps2 nab", dict(pages_per_step=2, no_auto_barriers=True)),
         ("mosaic old default", dict(split_cols=256, no_auto_barriers=False)),
         ("mosaic pps2", dict(pages_per_step=2))],
    32: [("mosaic default", {}), ("mosaic seesaw", dict(schedule="seesaw")),
         ("mosaic pps2 nab", dict(pages_per_step=2, no_auto_barriers=True)),
         ("mosaic pps2", dict(pages_per_step=2)),
         ("mosaic pps2 seesaw", dict(pages_per_step=2, schedule="seesaw"))],
    64: [("mosaic default", {}), ("mosaic seesaw", dict(schedule="seesaw")),
         ("mosaic pps2 nab", dict(pages_per_step=2, no_auto_barriers=True)),
         ("mosaic old default", dict(split_cols=256, no_auto_barriers=False)),
         ("mosaic pps2", dict(pages_per_step=2)),
         ("mosaic pps2 seesaw", dict(pages_per_step=2, schedule="seesaw"))],
    128: [("mosaic default", {}),
          # consumer 0 (QK^T + softmax) accumulates 128 of the 512 PV columns, consumer 1 384
          # (2026-11-23 H100: 81.0% vs 80.3% of copy; 192: 78.2%; 128 with 2 splits: 76.3%)
          ("mosaic cols128", dict(split_cols=128, no_auto_barriers=False)),
          ("mosaic cols192 auto barriers", dict(split_cols=192, no_auto_barriers=False)),
          ("mosaic cols64", dict(split_cols=64, no_auto_barriers=False)),
          # the default before 2026-11-24 (it measured 75-81% of copy against 83.3-83.8% for
          # split_cols=192 without automatic barriers, now the default)
          ("mosaic old default", dict(split_cols=256, no_auto_barriers=False)),
          ("mosaic seesaw", dict(schedule="seesaw")),
          ("mosaic pps2", dict(pages_per_step=2)),
          # for TPLA shards (--dc 256): the split schedule without automatic barriers, as
          # chosen for Dc = 512 (docs/methods/mla.md)
          ("mosaic split nab", dict(schedule="split", no_auto_barriers=True)),
          ("mosaic split cols64 nab", dict(schedule="split", split_cols=64,
                                           no_auto_barriers=True)),
          ("mosaic pps2 nab", dict(pages_per_step=2, no_auto_barriers=True)),
          ("mosaic seesaw nab", dict(schedule="seesaw", no_auto_barriers=True)),
          # the --dc 256 default before 2026-11-24 (seesaw, one page per step)
          ("mosaic pps1", dict(pages_per_step=1)),
          ("mosaic pps2 nab cols192", dict(pages_per_step=2, no_auto_barriers=True,
                                           split_cols=192))],
}
KERNELS = {"triton": VARIANTS, "mosaic": MOSAIC_VARIANTS}
QUICK_HEADS = (16, 128)

# The names the imported library gives the two GPU kernels (module docstring).
CURRENT_API = uses_current_names(mla_ops.IMPLS)
IMPL_NAMES = {"triton": library_name("triton", mla_ops.IMPLS),
              "mosaic": library_name("mosaic_gpu", mla_ops.IMPLS)}


def kernel(impl: str, knobs: dict):
    """``mla_decode`` with the kernel of --impls label ``impl`` and a variant's ``knobs``:
    ``num_splits`` as its own argument, the rest as ``config`` (the previous API: keywords)."""
    knobs = dict(knobs)
    num_splits = knobs.pop("num_splits", None)
    if not knobs:
        extra = {}
    elif not CURRENT_API:
        extra = knobs
    elif impl == "mosaic":
        extra = dict(config=mla_decode_mosaic.MLADecodeMosaicConfig(**knobs))
    else:
        extra = dict(config=knobs)
    name = IMPL_NAMES[impl]
    return jax.jit(lambda ql, qp, cache, table, lengths: mla_decode(
        ql, qp, cache, table, lengths, TAU, impl=name, num_splits=num_splits, **extra))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--heads", default="16,64,128")
    ap.add_argument("--only", nargs="*", default=None,
                    help="run only variants whose name has one of these texts")
    ap.add_argument("--no-anchors", action="store_true", help="skip the copy / matmul anchors")
    ap.add_argument("--impls", nargs="+", default=["triton"], choices=sorted(KERNELS),
                    type=lambda s: "mosaic" if s == "mosaic_gpu" else s,
                    help="triton and/or mosaic (or mosaic_gpu)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time the variant list this many times, interleaved (A/B noise)")
    ap.add_argument("--dc", type=int, default=DC, help="latent width (TPLA g=2 shard: 256)")
    ap.add_argument("--quick", action="store_true",
                    help="headline rows only: the copy anchor and the mosaic defaults at 16 and "
                         "128 heads; writes bench_mla_decode_quick.json")
    args = ap.parse_args()
    b, ctx, dc = args.batch, args.context, args.dc
    if args.quick:
        args.impls, args.only, args.rounds = ["mosaic"], None, 1
        args.heads = ",".join(map(str, QUICK_HEADS))
    p = ctx // PAGE
    library = os.path.dirname(os.path.abspath(pallas_kernels.__file__))
    print("devices:", jax.devices(), "jax", jax.__version__, flush=True)
    print(f"pallas_kernels {library} ({'current' if CURRENT_API else 'previous'} API: "
          f"{IMPL_NAMES})", flush=True)
    key = jax.random.key(0)
    cache = jax.random.normal(key, (b * p, PAGE, dc + DR), jnp.bfloat16)
    table = jnp.asarray(np.random.default_rng(0).permutation(b * p).reshape(b, p).astype(np.int32))
    lengths = jnp.full((b,), ctx, jnp.int32)
    cache_bytes = cache.size * cache.dtype.itemsize
    rows, copy_gbs = [], float("nan")
    if not args.no_anchors:
        copy = jax.jit(lambda x: x * jnp.bfloat16(1) + jnp.bfloat16(0))  # read + write, no aliasing
        t_copy = time_ms(copy, cache, **TIMING).ms
        copy_gbs = 2 * cache_bytes / t_copy / 1e6
        print(f"copy: {cache_bytes / 2**30:.2f} GiB in {t_copy:.3f} ms -> {copy_gbs:.0f} GB/s "
              f"(read+write)", flush=True)
        rows.append(dict(name="device_copy", ms=t_copy, gbs=copy_gbs, ratio=1.0))
    if not (args.no_anchors or args.quick):
        ka, kb = jax.random.split(jax.random.key(1))
        x = jax.random.normal(ka, (8192, 8192), jnp.bfloat16)
        y = jax.random.normal(kb, (8192, 8192), jnp.bfloat16)
        t_mm = time_ms(jax.jit(jnp.matmul), x, y, **TIMING).ms
        mm_tflops = 2 * 8192 ** 3 / t_mm / 1e9
        print(f"matmul 8192^3 bf16: {t_mm:.3f} ms -> {mm_tflops:.0f} TFLOP/s", flush=True)
        rows.append(dict(name="matmul_8192_bf16", ms=t_mm, tflops=mm_tflops))
        del x, y
    for h in (int(x) for x in args.heads.split(",")):
        kq = jax.random.split(jax.random.key(h), 2)
        q_lat = jax.random.normal(kq[0], (b, h, dc), jnp.bfloat16)
        q_pe = jax.random.normal(kq[1], (b, h, DR), jnp.bfloat16)
        variants = [(impl, v) for impl in args.impls
                    for v in KERNELS[impl].get(h, [("default", {})])]
        if args.quick:  # the first variant of each list is the kernel's default
            variants = variants[:1]
        for impl, (name, kw) in variants * args.rounds:
            if args.only and not any(text in name for text in args.only):
                continue
            fn = kernel(impl, kw)
            try:
                t = time_ms(fn, q_lat, q_pe, cache, table, lengths, **TIMING).ms
            except Exception as e:  # noqa: BLE001 - a variant that fails to compile is reported
                print(f"H={h:3d} {name:34s} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
                rows.append(dict(name=name, H=h, failed=f"{type(e).__name__}: {str(e)[:300]}"))
                continue
            gbs = cache_bytes / t / 1e6
            flops = 2 * b * h * ctx * (dc + DR + dc)
            rows.append(dict(name=name, impl=impl, impl_name=IMPL_NAMES[impl], H=h, kwargs=kw,
                             ms=t, gbs=gbs, ratio=gbs / copy_gbs, tflops=flops / t / 1e9))
            print(f"H={h:3d} {name:34s} {t:8.3f} ms {gbs:7.0f} GB/s  {gbs / copy_gbs:5.1%} of copy"
                  f"  {flops / t / 1e9:6.1f} TFLOP/s", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = "bench_mla_decode_quick.json" if args.quick else "bench_mla_decode.json"
    (Path(args.out) / out).write_text(json.dumps(
        dict(device=str(jax.devices()[0]), jax=jax.__version__, library=library,
             api="current" if CURRENT_API else "previous", batch=b, context=ctx, dc=dc,
             rows=rows),
        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
