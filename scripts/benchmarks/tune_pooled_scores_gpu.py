"""Tile sweep of the pooled-scores Pallas kernel on XAttention's antidiagonal GEMM (GPU).

The kernel (`pallas_kernels/gpu/pooled_scores_triton.py`) is a causal GEMM of the stride-
reshaped queries and keys (Mq = Mk = S / stride rows, Dx = stride * D) with an online softmax
pooled into cells; its FLOPs are ``Hq * Mq * Mk * Dx`` (2 per multiply-add, the causal half).
For each tiling this script times the kernel alone (median ms of --iters calls after one
warm-up call, ``scripts.common.timing.time_ms``), reports TFLOP/s and the time as a fraction
of cuDNN causal attention on the same q/k/v (the estimation target is <= 5% of it at 128K for
the whole XAttention estimate), and checks the result against the first (default)
tiling (relative L2 error).

    python -m scripts.benchmarks.tune_pooled_scores_gpu --seq 65536 --strides 16 8 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprefill.eval.synthetic_qk import structured_qk
from jaxprefill import sparse
from jaxprefill.sparse.base import make_geometry
from jaxprefill.sparse.xattention import antidiagonal_block_scores
from pallas_kernels.gpu.pooled_scores_triton import pooled_block_scores_triton
from scripts.common.timing import time_ms

# (block_m, block_n, block_d, num_warps, num_stages); the first is the kernel's default.
TILINGS = [  # the first is the kernel's default (2026-11-23 H100 sweeps, docs/history.md)
    (64, 512, 64, 8, 3),
    (128, 64, 128, 4, 2),  # the default before the sweeps
    (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4),
    (128, 256, 32, 8, 4),
    (128, 256, 32, 8, 6),
    (128, 256, 128, 8, 2),
    (64, 256, 64, 4, 3),
    (64, 256, 64, 4, 4),
    (256, 256, 64, 16, 3),  # does not compile: 16 warps leave 128 registers, ptxas needs 154
    (64, 512, 64, 8, 4),
    (64, 512, 32, 8, 5),
    (64, 256, 64, 4, 5),
]


def reshaped(q: jax.Array, k: jax.Array, stride: int) -> tuple[jax.Array, jax.Array]:
    """XAttention's antidiagonal reshape (as `jaxprefill.sparse.xattention`): query rows of a
    stride group reversed and concatenated along D, key rows concatenated in order."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    qr = q.reshape(b, s // stride, stride, hq, d)[:, :, ::-1].transpose(0, 1, 3, 2, 4)
    kr = k.reshape(b, s // stride, stride, hkv, d).transpose(0, 1, 3, 2, 4)
    return (qr.reshape(b, s // stride, hq, stride * d), kr.reshape(b, s // stride, hkv, stride * d))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=65536)
    ap.add_argument("--strides", type=int, nargs="+", default=[16, 8])
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--only", type=int, nargs="*", default=None, help="indices into TILINGS")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    hq, hkv, d, seq = 32, 8, 128, args.seq
    q, k = jax.jit(structured_qk, static_argnums=(1, 2, 3, 4, 5))(jax.random.key(0), 1, seq, hq,
                                                                   hkv, d)
    v = jax.random.normal(jax.random.key(1), (1, seq, hkv, d), jnp.bfloat16)
    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                 implementation="cudnn"))
    cudnn_ms = time_ms(dense, q, k, v, reps=args.iters).ms
    print(f"{jax.devices()[0]} jax {jax.__version__}; S={seq}: cuDNN causal {cudnn_ms:.2f} ms",
          flush=True)
    rows = [dict(name="cudnn_causal", seq=seq, ms=cudnn_ms)]
    valid = jnp.array([seq], jnp.int32)
    for stride in args.strides:
        qr, kr = jax.jit(reshaped, static_argnums=2)(q, k, stride)
        r = args.block // stride
        m = seq // stride
        flops = hq * m * m * stride * d
        ref = None
        for i, (bm, bn, bd, nw, ns) in enumerate(TILINGS):
            if args.only is not None and i not in args.only and i != 0:
                continue
            kw = dict(block_m=bm, block_n=bn, block_d=bd, num_warps=nw, num_stages=ns)
            fn = jax.jit(lambda a, b_, kw=kw: pooled_block_scores_triton(
                a, b_, valid, 0, r=r, scale=d ** -0.5 / stride, **kw))
            name = f"s{stride} bm{bm} bn{bn} bd{bd} w{nw} st{ns}"
            try:
                ms = time_ms(fn, qr, kr, reps=args.iters).ms
                out = np.asarray(fn(qr, kr))
            except Exception as e:  # noqa: BLE001 - report a tiling that fails, keep going
                traceback.print_exc()
                rows.append(dict(name=name, stride=stride, kwargs=kw,
                                 failed=f"{type(e).__name__}: {str(e)[:300]}"))
                print(f"{name}: FAILED {type(e).__name__}", flush=True)
                continue
            if ref is None:
                ref = out
            err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            row = dict(name=name, stride=stride, kwargs=kw, ms=ms, tflops=flops / ms / 1e9,
                       frac_cudnn=ms / cudnn_ms, rel_err_vs_default=err,
                       finite=bool(np.isfinite(out).all()))
            rows.append(row)
            print(f"{name}: {ms:8.2f} ms {row['tflops']:6.1f} TFLOP/s {ms / cudnn_ms:6.2%} of "
                  f"cuDNN, rel err vs default {err:.1e}", flush=True)
        del qr, kr
        # Where the rest of XAttention's estimate goes (kernel defaults; Estimation() "auto"):
        # the reshape + kernel + epilogue (scores), and the whole policy.build (+ selection).
        geo = make_geometry(q, k, args.block, None)
        scores = jax.jit(lambda q, k, stride=stride: antidiagonal_block_scores(q, k, geo, stride))
        policy = sparse.get("xattention", threshold=0.9, stride=stride)
        build = jax.jit(lambda q, k: policy.build(q, k, layer=20))
        for name, fn in (("scores", scores), ("build", build)):
            ms = time_ms(fn, q, k, reps=args.iters).ms
            rows.append(dict(name=f"s{stride} xattention {name}", stride=stride, ms=ms,
                             frac_cudnn=ms / cudnn_ms))
            print(f"s{stride} xattention {name}: {ms:8.2f} ms {ms / cudnn_ms:6.2%} of cuDNN",
                  flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "tune_pooled_scores.json").write_text(json.dumps(
        dict(device=str(jax.devices()[0]), jax=jax.__version__, seq=seq, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
