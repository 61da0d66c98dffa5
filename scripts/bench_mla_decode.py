"""Speed of `mla_decode` at batch 64 x 32K context (H=16 and 128), as GB/s of latent-cache read
against a device copy measured in the same run.

    python3 scripts/bench_mla_decode.py [--out DIR] [--batch 64] [--context 32768]
        [--heads 16,64,128] [--only SUBSTRING] [--no-anchors] [--impls triton mosaic]

Bytes counted: the cache pages read (B * context * 576 * 2 bytes bf16; queries/outputs are
< 1% and left out). Copy bandwidth: a jnp copy of an array of the cache's size, counting bytes
read + written. Matmul anchor: an 8192^3 bf16 product (the tensor-core rate XLA reaches), since
H=128 is compute-bound (2 * H * (512 + 64 + 512) FLOPs per 1152 cache bytes). Times: median over
repeats of a loop of calls, synchronized at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.gpu.mla_decode_mosaic import mla_decode_mosaic  # noqa: E402
from pallas_kernels.gpu.mla_decode_triton import mla_decode_triton  # noqa: E402

PAGE, DC, DR = 64, 512, 64
TAU = float(192 ** -0.5 * (0.1 * np.log(40.0) + 1) ** 2)


def timeit(fn, *args, inner=10, reps=7) -> float:
    """Median seconds per call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            r = fn(*args)
        jax.block_until_ready(r)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


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
    # named-barrier hand-overs 10% slower at H=128; at H=64 1 split 13% slower, 4 splits 2%)
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
          # the default before the ninth session (the eighth measured 75-81% of copy against
          # 83.3-83.8% for split_cols=192 without automatic barriers, now the default)
          ("mosaic old default", dict(split_cols=256, no_auto_barriers=False)),
          ("mosaic multicast", dict(multicast=True)),  # clusters of 2 CTAs
          ("mosaic seesaw", dict(schedule="seesaw")),
          ("mosaic pps2", dict(pages_per_step=2)),
          ("mosaic pps2 multicast", dict(pages_per_step=2, multicast=True)),
          # for TPLA shards (--dc 256, where the default is seesaw with 4 stages): the split
          # schedule without automatic barriers, as chosen for Dc = 512 (ninth session)
          ("mosaic split nab", dict(schedule="split", no_auto_barriers=True)),
          ("mosaic split cols64 nab", dict(schedule="split", split_cols=64,
                                           no_auto_barriers=True)),
          ("mosaic pps2 nab", dict(pages_per_step=2, no_auto_barriers=True)),
          ("mosaic seesaw nab", dict(schedule="seesaw", no_auto_barriers=True)),
          # the --dc 256 default before the ninth session (seesaw, one page per step)
          ("mosaic pps1", dict(pages_per_step=1)),
          ("mosaic pps2 nab cols192", dict(pages_per_step=2, no_auto_barriers=True,
                                           split_cols=192))],
}
KERNELS = {"triton": (mla_decode_triton, VARIANTS), "mosaic": (mla_decode_mosaic, MOSAIC_VARIANTS)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--heads", default="16,64,128")
    ap.add_argument("--only", nargs="*", default=None,
                    help="run only variants whose name has one of these texts")
    ap.add_argument("--no-anchors", action="store_true", help="skip the copy / matmul anchors")
    ap.add_argument("--impls", nargs="+", default=["triton"], choices=sorted(KERNELS))
    ap.add_argument("--rounds", type=int, default=1,
                    help="time the variant list this many times, interleaved (A/B noise)")
    ap.add_argument("--dc", type=int, default=DC, help="latent width (TPLA g=2 shard: 256)")
    args = ap.parse_args()
    b, ctx, dc = args.batch, args.context, args.dc
    p = ctx // PAGE
    print("devices:", jax.devices(), "jax", jax.__version__, flush=True)
    key = jax.random.key(0)
    cache = jax.random.normal(key, (b * p, PAGE, dc + DR), jnp.bfloat16)
    table = jnp.asarray(np.random.default_rng(0).permutation(b * p).reshape(b, p).astype(np.int32))
    lengths = jnp.full((b,), ctx, jnp.int32)
    cache_bytes = cache.size * cache.dtype.itemsize
    rows, copy_gbs = [], float("nan")
    if not args.no_anchors:
        copy = jax.jit(lambda x: x * jnp.bfloat16(1) + jnp.bfloat16(0))  # read + write, no aliasing
        t_copy = timeit(copy, cache)
        copy_gbs = 2 * cache_bytes / t_copy / 1e9
        print(f"copy: {cache_bytes / 2**30:.2f} GiB in {t_copy * 1e3:.3f} ms -> {copy_gbs:.0f} GB/s "
              f"(read+write)", flush=True)
        rows.append(dict(name="device_copy", ms=t_copy * 1e3, gbs=copy_gbs, ratio=1.0))
        ka, kb = jax.random.split(jax.random.key(1))
        x = jax.random.normal(ka, (8192, 8192), jnp.bfloat16)
        y = jax.random.normal(kb, (8192, 8192), jnp.bfloat16)
        t_mm = timeit(jax.jit(jnp.matmul), x, y)
        mm_tflops = 2 * 8192 ** 3 / t_mm / 1e12
        print(f"matmul 8192^3 bf16: {t_mm * 1e3:.3f} ms -> {mm_tflops:.0f} TFLOP/s", flush=True)
        rows.append(dict(name="matmul_8192_bf16", ms=t_mm * 1e3, tflops=mm_tflops))
        del x, y
    for h in (int(x) for x in args.heads.split(",")):
        kq = jax.random.split(jax.random.key(h), 2)
        q_lat = jax.random.normal(kq[0], (b, h, dc), jnp.bfloat16)
        q_pe = jax.random.normal(kq[1], (b, h, DR), jnp.bfloat16)
        todo = [(kern, v) for impl in args.impls for kern, table in [KERNELS[impl]]
                for v in table.get(h, [("default", {})])] * args.rounds
        for kern, (name, kw) in todo:
            if args.only and not any(text in name for text in args.only):
                continue
            fn = jax.jit(lambda a, c, d, e, f, kw=kw, kern=kern: kern(a, c, d, e, f, sm_scale=TAU, **kw))
            try:
                t = timeit(fn, q_lat, q_pe, cache, table, lengths)
            except Exception as e:  # noqa: BLE001 - a variant that fails to compile is reported
                print(f"H={h:3d} {name:34s} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
                rows.append(dict(name=name, H=h, failed=f"{type(e).__name__}: {str(e)[:300]}"))
                continue
            gbs = cache_bytes / t / 1e9
            flops = 2 * b * h * ctx * (dc + DR + dc)
            rows.append(dict(name=name, H=h, kwargs=kw, ms=t * 1e3, gbs=gbs, ratio=gbs / copy_gbs,
                             tflops=flops / t / 1e12))
            print(f"H={h:3d} {name:34s} {t * 1e3:8.3f} ms {gbs:7.0f} GB/s  {gbs / copy_gbs:5.1%} of copy"
                  f"  {flops / t / 1e12:6.1f} TFLOP/s", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_mla_decode.json").write_text(json.dumps(
        dict(device=str(jax.devices()[0]), jax=jax.__version__, batch=b, context=ctx, dc=dc,
             rows=rows),
        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
