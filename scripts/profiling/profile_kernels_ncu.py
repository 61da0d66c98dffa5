"""Runs one attention kernel under Nsight Compute (ncu): compile and warm up outside the
profiled range, then exactly one call inside it.

    ncu --profile-from-start off --clock-control none --set full -o $OUT/NAME \\
        python3 -m scripts.profiling.profile_kernels_ncu TARGET     # from the repository root

``scripts/profiling/profile_kernels_ncu.sh`` runs every target and writes the text reports.
Targets: ``mosaic16k`` / ``tokamax16k`` / ``cudnn16k`` (and ``...64k``): causal attention at
16K (64K), Hq=32, Hkv=8, D=128, bf16 (the full-density benchmark shape of docs/performance.md),
``mosaic16k_<variant>`` with the ``BlockSparseMosaicConfig`` fields of ``MOSAIC_VARIANTS``;
``mla128`` / ``mla16``: ``mla_decode_mosaic`` at batch 64 x 32K context with 128 / 16 heads
(docs/methods/mla.md), ``mla128_<variant>`` with the ``MLADecodeMosaicConfig`` fields of
``MLA_VARIANTS``; ``tpla128[_<variant>]``: the same on a TPLA g=2 shard (Dc = 256). The
profiled range is opened with the CUDA driver's ``cuProfilerStart`` (ncu's
``--profile-from-start off`` honours it).
"""

from __future__ import annotations

import argparse
import ctypes
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gpu.block_sparse_mosaic import (BlockSparseMosaicConfig,
                                                    block_sparse_attention_mosaic)
from pallas_kernels.gpu.mla_decode_mosaic import MLADecodeMosaicConfig, mla_decode_mosaic
from pallas_kernels.layout import BlockSparseLayout


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


# BlockSparseMosaicConfig fields per target suffix (``mosaic16k_stages3``,
# ``mosaicmla16_stages3``). (The synchronisation before 2026-11-23's cycle-count changes,
# mbarriers, 4 producer warps and a full wait, is no longer a kernel option.)
MOSAIC_VARIANTS = {
    "": {},
    "stages3": dict(num_stages=3),
}


def attention(which: str):
    """``{mosaic,tokamax,cudnn}{16k,64k}[_variant]``: causal, Hq=32, Hkv=8, D=128, bf16;
    ``{mosaic,tokamax}mla{16,128}[_variant]``: the MLA prefill shapes (Dqk=192, Dv=128, Hq=Hkv;
    16 heads at 32K, 128 heads at 8K)."""
    name, _, variant = which.partition("_")
    if "mla" in name:
        HQ = HKV = int(name.split("mla")[1])
        S, D, DV = (32768 if HQ == 16 else 8192), 192, 128
    else:
        S, HQ, HKV, D, DV = 1024 * int(name[-3:-1]), 32, 8, 128, 128
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (1, S, HQ, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, S, HKV, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, S, HKV, DV), jnp.bfloat16)
    if name.startswith("mosaic"):
        lay = BlockSparseLayout.dense_causal(1, HKV, S, S, 128, 128)
        config = BlockSparseMosaicConfig(**MOSAIC_VARIANTS[variant])
        f = jax.jit(lambda a, b, c: block_sparse_attention_mosaic(a, b, c, lay,
                                                                  config=config)[0])
    elif name.startswith("tokamax"):
        import tokamax  # optional: only its own targets need it
        f = jax.jit(lambda a, b, c: tokamax.dot_product_attention(
            a, b, c, is_causal=True, implementation="mosaic"))
    else:
        f = jax.jit(lambda a, b, c: jax.nn.dot_product_attention(
            a, b, c, is_causal=True, implementation="cudnn"))
    return f, (q, k, v)


# MLADecodeMosaicConfig fields per target suffix (``mla128_cols128``...).
# Names say what differs from the default before 2026-11-24 (split_cols = Dc / 2, automatic
# barriers on); "" is the current default (split_cols=192, no automatic barriers).
# (Clusters of 2 CTAs with multicast page loads are no longer a kernel option.)
MLA_VARIANTS = {
    "": {},
    "old": dict(split_cols=256, no_auto_barriers=False),
    "cols128": dict(split_cols=128, no_auto_barriers=False),
    "cols192": dict(split_cols=192, no_auto_barriers=False),
    "cols64": dict(split_cols=64, no_auto_barriers=False),
    "cols192nab": dict(split_cols=192, no_auto_barriers=True),
    "nab": dict(split_cols=256, no_auto_barriers=True),
    "cols128nab": dict(split_cols=128, no_auto_barriers=True),
    # TPLA g=2 shards (``tpla128``: Dc = 256); default: 2 pages per step, no automatic barriers
    "pps1": dict(pages_per_step=1),  # the Dc = 256 default before 2026-11-24 (seesaw, 4 pages)
    "pps2cols192": dict(pages_per_step=2, no_auto_barriers=True, split_cols=192),
}


def mla_decode(heads: int, variant: str = "", dc: int = 512):
    """``mla_decode_mosaic`` at batch 64 x 32K context: (jitted fn, its arguments)."""
    b, ctx, page, dr = 64, 32768, 64, 64
    p = ctx // page
    cache = jax.random.normal(jax.random.key(0), (b * p, page, dc + dr), jnp.bfloat16)
    table = jnp.asarray(np.random.default_rng(0).permutation(b * p).reshape(b, p).astype(np.int32))
    lengths = jnp.full((b,), ctx, jnp.int32)
    kq = jax.random.split(jax.random.key(heads), 2)
    q_lat = jax.random.normal(kq[0], (b, heads, dc), jnp.bfloat16)
    q_pe = jax.random.normal(kq[1], (b, heads, dr), jnp.bfloat16)
    config = MLADecodeMosaicConfig(**MLA_VARIANTS[variant])
    f = jax.jit(lambda *a: mla_decode_mosaic(*a, sm_scale=0.07, config=config))
    return f, (q_lat, q_pe, cache, table, lengths)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", help="e.g. mosaic16k, tokamax16k, cudnn16k, mla128_cols128, tpla128")
    target = ap.parse_args().target
    name, _, variant = target.partition("_")
    if name.startswith("mla"):  # decode: mla128, mla16_<variant>
        f, args = mla_decode(int(name[3:]), variant)
    elif name.startswith("tpla"):  # decode on a TPLA g=2 shard (Dc = 256): tpla128_<variant>
        f, args = mla_decode(int(name[4:]), variant, dc=256)
    elif name.endswith(("16k", "64k")) or "mla" in name:  # prefill: mosaic16k, tokamaxmla16
        f, args = attention(target)
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
