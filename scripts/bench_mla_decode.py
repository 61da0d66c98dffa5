"""Speed of `mla_decode` at batch 64 x 32K context (H=16 and 128), as GB/s of latent-cache read
against a device copy measured in the same run.

    python3 scripts/bench_mla_decode.py [--out DIR] [--batch 64] [--context 32768]

Bytes counted: the cache pages read (B * context * 576 * 2 bytes bf16; queries/outputs are
< 1% and left out). Copy bandwidth: a jnp copy of an array of the cache's size, counting bytes
read + written. Times: median over repeats of a loop of calls, synchronized at the end.
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

from pallas_kernels.gpu.mla_decode_triton import mla_decode_triton  # noqa: E402
from pallas_kernels.mla_reference import mla_decode_reference  # noqa: E402

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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=32768)
    args = ap.parse_args()
    b, ctx = args.batch, args.context
    p = ctx // PAGE
    print("devices:", jax.devices(), "jax", jax.__version__, flush=True)
    key = jax.random.key(0)
    cache = jax.random.normal(key, (b * p, PAGE, DC + DR), jnp.bfloat16)
    table = jnp.asarray(np.random.default_rng(0).permutation(b * p).reshape(b, p).astype(np.int32))
    lengths = jnp.full((b,), ctx, jnp.int32)
    cache_bytes = cache.size * cache.dtype.itemsize

    copy = jax.jit(lambda x: x * jnp.bfloat16(1) + jnp.bfloat16(0))  # read + write, no aliasing
    t_copy = timeit(copy, cache)
    copy_gbs = 2 * cache_bytes / t_copy / 1e9
    print(f"copy: {cache_bytes / 2**30:.2f} GiB in {t_copy * 1e3:.3f} ms -> {copy_gbs:.0f} GB/s "
          f"(read+write)", flush=True)
    rows = [dict(name="device_copy", ms=t_copy * 1e3, gbs=copy_gbs, ratio=1.0)]
    for h in (16, 128):
        kq = jax.random.split(jax.random.key(h), 2)
        q_lat = jax.random.normal(kq[0], (b, h, DC), jnp.bfloat16)
        q_pe = jax.random.normal(kq[1], (b, h, DR), jnp.bfloat16)
        variants = [("pallas_triton bh16", dict(block_h=16)), ("pallas_triton bh32", dict(block_h=32))]
        if h == 128:
            variants += [("pallas_triton bh64", dict(block_h=64)),
                         ("pallas_triton bh64 w4", dict(block_h=64, num_warps=4))]
        variants += [("pallas_triton bh16 splits1", dict(block_h=16, num_splits=1)),
                     ("pallas_triton bh16 stages3", dict(block_h=16, num_stages=3))]
        for name, kw in variants:
            fn = jax.jit(lambda a, c, d, e, f, kw=kw: mla_decode_triton(a, c, d, e, f, sm_scale=TAU, **kw))
            try:
                t = timeit(fn, q_lat, q_pe, cache, table, lengths)
            except Exception as e:  # noqa: BLE001 - a variant that fails to compile is reported
                print(f"H={h:3d} {name:28s} FAILED: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            gbs = cache_bytes / t / 1e9
            flops = 2 * b * h * ctx * (DC + DR + DC)
            rows.append(dict(name=name, H=h, ms=t * 1e3, gbs=gbs, ratio=gbs / copy_gbs,
                             tflops=flops / t / 1e12))
            print(f"H={h:3d} {name:28s} {t * 1e3:8.3f} ms {gbs:7.0f} GB/s  {gbs / copy_gbs:5.1%} of copy"
                  f"  {flops / t / 1e12:6.1f} TFLOP/s", flush=True)
        if h == 16:  # plain XLA (gather + einsum) for comparison, once
            fn = jax.jit(lambda a, c, d, e, f: mla_decode_reference(a, c, d, e, f, TAU))
            try:
                t = timeit(fn, q_lat, q_pe, cache, table, lengths, inner=3, reps=3)
                gbs = cache_bytes / t / 1e9
                rows.append(dict(name="xla_reference", H=h, ms=t * 1e3, gbs=gbs, ratio=gbs / copy_gbs))
                print(f"H={h:3d} {'xla_reference (f32 gather)':28s} {t * 1e3:8.3f} ms {gbs:7.0f} GB/s  "
                      f"{gbs / copy_gbs:5.1%} of copy", flush=True)
            except Exception as e:  # noqa: BLE001
                print("xla_reference FAILED:", type(e).__name__, str(e)[:200], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_mla_decode.json").write_text(json.dumps(
        dict(device=str(jax.devices()[0]), jax=jax.__version__, batch=b, context=ctx, rows=rows),
        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
