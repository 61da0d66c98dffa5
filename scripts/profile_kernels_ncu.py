"""Runs one attention kernel under Nsight Compute (ncu): compile and warm up outside the
profiled range, then exactly one call inside it.

    ncu --profile-from-start off --clock-control none --set full -o $OUT/NAME \\
        python3 scripts/profile_kernels_ncu.py TARGET

``scripts/profile_kernels_ncu.sh`` runs every target and writes the text reports. Targets:
``mosaic16k`` / ``tokamax16k`` / ``cudnn16k``: causal attention at 16K, Hq=32, Hkv=8, D=128,
bf16 (issue 4's full-density shape); ``mla128`` / ``mla16``: ``mla_decode_mosaic`` at batch
64 x 32K context with 128 / 16 heads (issue 6). The profiled range is opened with the CUDA
driver's ``cuProfilerStart`` (ncu's ``--profile-from-start off`` honours it).
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _cuda_profiler(start: bool) -> None:
    """cuProfilerStart / cuProfilerStop on the primary context of device 0."""
    lib = ctypes.CDLL("libcuda.so.1")
    ctx = ctypes.c_void_p()
    lib.cuCtxGetCurrent(ctypes.byref(ctx))
    if not ctx.value:
        dev = ctypes.c_int()
        lib.cuDeviceGet(ctypes.byref(dev), 0)
        lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
        lib.cuCtxSetCurrent(ctx)
    rc = (lib.cuProfilerStart if start else lib.cuProfilerStop)()
    print(f"cuProfiler{'Start' if start else 'Stop'} -> {rc}", flush=True)


def attention_16k(which: str):
    from pallas_kernels.gpu.block_sparse_mosaic import block_sparse_attention_mosaic
    from pallas_kernels.layout import BlockSparseLayout
    S, HQ, HKV, D = 16384, 32, 8, 128
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (1, S, HQ, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, S, HKV, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, S, HKV, D), jnp.bfloat16)
    if which == "mosaic16k":
        lay = BlockSparseLayout.dense_causal(1, HKV, S, S, 128, 128)
        f = jax.jit(lambda a, b, c: block_sparse_attention_mosaic(a, b, c, lay)[0])
    elif which == "tokamax16k":
        import tokamax
        f = jax.jit(lambda a, b, c: tokamax.dot_product_attention(
            a, b, c, is_causal=True, implementation="mosaic"))
    else:
        f = jax.jit(lambda a, b, c: jax.nn.dot_product_attention(
            a, b, c, is_causal=True, implementation="cudnn"))
    return f, (q, k, v)


def mla_decode(heads: int):
    from pallas_kernels.gpu.mla_decode_mosaic import mla_decode_mosaic
    b, ctx, page, dc, dr = 64, 32768, 64, 512, 64
    p = ctx // page
    cache = jax.random.normal(jax.random.key(0), (b * p, page, dc + dr), jnp.bfloat16)
    table = jnp.asarray(np.random.default_rng(0).permutation(b * p).reshape(b, p).astype(np.int32))
    lengths = jnp.full((b,), ctx, jnp.int32)
    kq = jax.random.split(jax.random.key(heads), 2)
    q_lat = jax.random.normal(kq[0], (b, heads, dc), jnp.bfloat16)
    q_pe = jax.random.normal(kq[1], (b, heads, dr), jnp.bfloat16)
    f = jax.jit(lambda *a: mla_decode_mosaic(*a, sm_scale=0.07))
    return f, (q_lat, q_pe, cache, table, lengths)


def main() -> int:
    target = sys.argv[1]
    if target.endswith("16k"):
        f, args = attention_16k(target)
    elif target.startswith("mla"):
        f, args = mla_decode(int(target[3:]))
    else:
        raise SystemExit(f"unknown target {target!r}")
    for _ in range(3):  # compile, autotune and warm up outside the profiled range
        jax.block_until_ready(f(*args))
    _cuda_profiler(True)
    jax.block_until_ready(f(*args))
    _cuda_profiler(False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
