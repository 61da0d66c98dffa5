"""Float32 inputs in the estimation and MLA-decode Triton kernels: which ``f32_dot``?

The block-sparse attention kernel's float32 dots became three TF32 products (``tf32x3``) on
2026-11-23 (docs/performance.md: 38-55x faster than exact CUDA-core products, error 5-7e-7).
This times the same choice in the other Triton kernels that take float32 inputs, each against a
float32 XLA reference computed on the CPU (exact float32 products), in one run:

- ``pooled``: ``pooled_block_scores_triton`` (XAttention / FlexPrefill block scores), Llama-3-8B
  heads (Hq=32, Hkv=8, D=128) at 16K tokens, stride 8 (Dx = 1024, r = 16), sum pooling; plus
  the XLA estimator ``block_softmax_scores`` (``Estimation(impl="xla")``, XLA's default float32
  dots) as the anchor;
- ``lqs``: ``last_query_sums_triton`` (MInference's last-64-query sums) at 32K tokens, same
  heads; anchor: the materialized XLA reference at default precision;
- ``mla``: ``mla_decode_triton`` over a float32 paged latent cache (B=8, H=16, 8K tokens,
  Dc=512, Dr=64); anchor: the XLA reference at default precision.

    python -m scripts.benchmarks.bench_f32_estimation --out $OUT

Writes ``bench_f32_estimation.json`` (a row per variant: ms, samples, max error / max |ref|;
a variant that fails to compile is recorded with its error). Times as in
``bench_f32_attention`` (its ``TIMING``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprefill.sparse import Estimation
from jaxprefill.sparse import estimators as est
from jaxprefill.sparse.base import make_geometry
from jaxprefill.sparse.xattention import antidiagonal_operands
from pallas_kernels.estimation import last_query_sums_reference
from pallas_kernels.gpu.last_query_stats_triton import last_query_sums_triton
from pallas_kernels.gpu.mla_decode_triton import mla_decode_triton
from pallas_kernels.gpu.pooled_scores_triton import pooled_block_scores_triton
from pallas_kernels.mla_reference import mla_decode_reference
from scripts.benchmarks.bench_f32_attention import TIMING
from scripts.common.timing import time_ms

DOTS = ("ieee", "tf32x3", "tf32")


def normal(seed: int, *shapes: tuple) -> list[jax.Array]:
    """Standard normal float32 arrays drawn by numpy: bit-identical whichever device builds the
    case (the reference is computed on the CPU from a second build)."""
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for shape in shapes]


def pooled_case(s: int = 16384, hq: int = 32, hkv: int = 8, d: int = 128, stride: int = 8):
    """(kernel(f32_dot) -> jitted fn, XLA function (un-jitted), inputs): XAttention's strided
    block scores in float32."""
    b, block = 1, 128
    q, k = normal(7, (b, s, hq, d), (b, s, hkv, d))
    # The XLA estimator is the anchor and the reference: its geometry keeps it off the kernels
    # (which this script calls directly).
    geo = make_geometry(q, k, block, jnp.full((b,), s, jnp.int32), estimation=Estimation("xla"))
    qr, kr, valid = antidiagonal_operands(q, k, geo, stride)
    r, scale = block // stride, geo.scale / stride
    zero = jnp.zeros((b,), jnp.int32)

    def kernel(dot, tiling=None):
        kw = {} if tiling is None else dict(zip(TILING_KEYS, tiling))
        return jax.jit(lambda a, c: pooled_block_scores_triton(a, c, valid, zero, r=r,
                                                               scale=scale, f32_dot=dot, **kw))

    def xla(a, c):
        return est.block_softmax_scores(a, c, geo, r, valid, scale, "sum")

    return kernel, xla, (qr, kr)


def lqs_case(s: int = 32768, hq: int = 32, hkv: int = 8, d: int = 128, rows: int = 64):
    q, k = normal(8, (1, hq, rows, d), (1, s, hkv, d))
    lengths = jnp.full((1,), s, jnp.int32)
    scale = d ** -0.5

    def kernel(dot):
        return jax.jit(lambda a, c: jnp.stack(last_query_sums_triton(a, c, lengths, scale=scale,
                                                                     f32_dot=dot)))

    def xla(a, c):
        return jnp.stack(last_query_sums_reference(a, c, lengths, scale=scale))

    return kernel, xla, (q, k)


def mla_case(b: int = 8, h: int = 16, ctx: int = 8192, dc: int = 512, dr: int = 64):
    page = 64
    p = ctx // page
    ql, qp, cache = normal(9, (b, h, dc), (b, h, dr), (b * p, page, dc + dr))
    table = jnp.asarray(np.random.default_rng(0).permutation(b * p).reshape(b, p), jnp.int32)
    lengths = jnp.asarray(np.linspace(ctx // 3, ctx, b).astype(np.int32))
    sm = (dc + dr) ** -0.5

    def kernel(dot):
        return jax.jit(lambda a, c, x: mla_decode_triton(a, c, x, table, lengths, sm_scale=sm,
                                                         f32_dot=dot)[0])

    def xla(a, c, x):
        return mla_decode_reference(a, c, x, table, lengths, sm)[0]

    return kernel, xla, (ql, qp, cache)


CASES = {"pooled": pooled_case, "lqs": lqs_case, "mla": mla_case,
         "mla128": functools.partial(mla_case, b=16, h=128)}
TILING_KEYS = ("block_m", "block_n", "block_d", "num_warps", "num_stages")
# float32 tilings of the pooled kernel tried with tf32x3 (the 16-bit default, 64 x 512 x 64 with
# 3 stages, needs 288 KiB of shared memory in float32 even with exact dots)
POOLED_F32_TILINGS = [(64, 128, 64, 4, 3), (64, 256, 64, 8, 2), (64, 256, 32, 8, 3),
                      (64, 128, 32, 4, 4), (128, 128, 64, 8, 2), (128, 128, 32, 8, 3),
                      (128, 256, 32, 8, 3), (64, 512, 32, 8, 2)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--tilings", action="store_true",
                    help="also time the pooled kernel with each of POOLED_F32_TILINGS")
    args = ap.parse_args()
    print("devices:", jax.devices(), "jax", jax.__version__, flush=True)
    out_json = Path(args.out) / "bench_f32_estimation.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.cases:
        kernel, xla, inputs = CASES[name]()
        # The float32 reference runs on the CPU: XLA's GPU fusion of the pooled estimator at
        # HIGHEST precision asks for 560 KB of shared memory and fails to compile (H100).
        with jax.default_device(jax.devices("cpu")[0]), jax.default_matmul_precision("highest"):
            _, xla_cpu, inputs_cpu = CASES[name]()
            ref = np.asarray(jax.jit(xla_cpu)(*inputs_cpu), np.float64)
        variants = {**{f"triton_{dot}": kernel(dot) for dot in DOTS}, "xla_default": jax.jit(xla)}
        if name == "pooled" and args.tilings:
            for t in POOLED_F32_TILINGS:
                variants[f"triton_tf32x3_{'x'.join(map(str, t))}"] = kernel("tf32x3", t)
            t = POOLED_F32_TILINGS[0]
            variants[f"triton_ieee_{'x'.join(map(str, t))}"] = kernel("ieee", t)
        for vname, f in variants.items():
            try:
                timing = time_ms(f, *inputs, **TIMING)
                out = np.asarray(f(*inputs), np.float64)
            except Exception as e:  # noqa: BLE001 - report and go on (shared memory overflow)
                print(f"{name} {vname}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                rows.append(dict(case=name, impl=vname, failed=str(e)[:300]))
                continue
            err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
            nan = bool(np.isnan(out).any())
            rows.append(dict(case=name, impl=vname, ms=timing.ms,
                             samples_ms=list(timing.samples_ms), rel_err=err, nan=nan))
            print(f"{name:6s} {vname:30s} {timing.ms:10.3f} ms  max err / max|ref| {err:.2e}"
                  f"{'  NaN!' if nan else ''}", flush=True)
            out_json.write_text(json.dumps(dict(device=str(jax.devices()[0]), jax=jax.__version__,
                                                rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
