"""Float32 block-sparse attention on a GPU: which path should ``impl="auto"`` take?

The Mosaic GPU kernel takes only 16-bit inputs, so float32 models fall back to the Triton
kernel, whose float32 dots were exact (CUDA-core) products. This times, in one run, each way to
attend float32 inputs, with the error of each against a float32 XLA dense reference computed
at ``Precision.HIGHEST``:

- ``triton_<dot>``: the Triton kernel with ``f32_dot`` = ieee / tf32x3 / tf32;
- ``xla``: the XLA block gather (``impl="xla"``; XLA's own float32 dot precision);
- ``mosaic_bf16``: cast to bf16, the Mosaic kernel, cast back (what a bf16 model gets);
- ``dense_xla``: ``jax.nn.dot_product_attention(implementation="xla")`` in float32 (anchor).

    python -m scripts.benchmarks.bench_f32_attention --out $OUT [--seq 8192]

Shapes: SmolLM2-135M (B=2, Hq=9, Hkv=3, D=64) and Llama-3-8B (B=1, Hq=32, Hkv=8, D=128),
full causal layouts of 128 x 128 blocks and a 30% random-block layout. Times: median ms per
call of up to 5 samples of queued calls (``TIMING``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention import block_sparse_attention
from pallas_kernels.gpu.block_sparse_mosaic import block_sparse_attention_mosaic
from pallas_kernels.gpu.block_sparse_triton import block_sparse_attention_triton
from pallas_kernels.layout import BlockSparseLayout
from pallas_kernels.reference import block_sparse_attention_reference
from scripts.common.timing import time_ms

BLK = 128
SHAPES = {"smollm2": (2, 9, 3, 64), "llama8b": (1, 32, 8, 128)}
# time_ms options: 5 samples of queued calls lasting >= ~50 ms each (at most 20 calls), one
# sample when 5 would take over 20 s (exact float32 products: 0.25 s per call at 8K).
TIMING = dict(warmup=1, reps=5, sample_ms=50, max_calls=20, budget_ms=20_000)


def random_layout(B, H, S, density, seed):
    """Causal rows keeping the diagonal and a random `density` share of the other blocks."""
    n = -(-S // BLK)
    rng = np.random.default_rng(seed)
    keep = rng.random((B, H, n, n)) < density
    keep |= np.eye(n, dtype=bool)
    keep &= np.tril(np.ones((n, n), dtype=bool))
    return BlockSparseLayout.from_block_mask(keep, BLK, BLK)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--only", nargs="+", default=None, help="run only these variants")
    args = ap.parse_args()
    S = args.seq
    print("devices:", jax.devices(), "jax", jax.__version__, flush=True)
    rows = []
    out_json = Path(args.out) / "bench_f32_attention.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    for name in args.shapes:
        B, HQ, HKV, D = SHAPES[name]
        ks = jax.random.split(jax.random.key(S + D), 3)
        q = jax.random.normal(ks[0], (B, S, HQ, D), jnp.float32)
        k = jax.random.normal(ks[1], (B, S, HKV, D), jnp.float32)
        v = jax.random.normal(ks[2], (B, S, HKV, D), jnp.float32)
        for density in (1.0, 0.3):
            lay = (BlockSparseLayout.dense_causal(B, HKV, S, S, BLK, BLK) if density == 1.0
                   else random_layout(B, HKV, S, density, seed=D))
            with jax.default_matmul_precision("highest"):
                ref = jax.jit(lambda a, b, c, l: block_sparse_attention_reference(a, b, c, l)[0])(
                    q, k, v, lay)
            ref = np.asarray(ref, np.float32)
            variants = {
                **{f"triton_{dot}": jax.jit(lambda a, b, c, l, dot=dot:
                                            block_sparse_attention_triton(a, b, c, l,
                                                                          f32_dot=dot)[0])
                   for dot in ("ieee", "tf32x3", "tf32")},
                "xla": jax.jit(lambda a, b, c, l: block_sparse_attention(a, b, c, l, impl="xla")),
                "mosaic_bf16": jax.jit(lambda a, b, c, l: block_sparse_attention_mosaic(
                    a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), c.astype(jnp.bfloat16),
                    l)[0].astype(jnp.float32)),
            }
            if density == 1.0:
                variants["dense_xla"] = jax.jit(lambda a, b, c, l: jax.nn.dot_product_attention(
                    a, b, c, is_causal=True, implementation="xla"))
            for vname, f in variants.items():
                if args.only and vname not in args.only:
                    continue
                try:
                    timing = time_ms(f, q, k, v, lay, **TIMING)
                    out = np.asarray(f(q, k, v, lay), np.float32)
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"{name} d={density} {vname}: FAILED {type(e).__name__}: "
                          f"{str(e)[:300]}", flush=True)
                    rows.append(dict(shape=name, density=density, impl=vname, failed=str(e)[:300]))
                    continue
                err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
                rows.append(dict(shape=name, density=density, impl=vname, ms=timing.ms,
                                 samples_ms=list(timing.samples_ms), rel_err=err))
                print(f"{name:8s} d={density:.1f} {vname:14s} {timing.ms:10.3f} ms  "
                      f"max err / max|ref| {err:.2e}", flush=True)
                out_json.write_text(json.dumps(dict(  # after every row: a cut-off run keeps them
                    device=str(jax.devices()[0]), jax=jax.__version__, seq=S, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
