"""GPU equivalence check of the block-sparse Pallas GPU kernel (run on the H100).

    python3 scripts/check_kernels_gpu.py [--out DIR] [--max-seq 32768]

Each case draws fresh random inputs and a random layout, runs the kernel with its outputs
poisoned (NaN-filled buffers aliased to the outputs, so unwritten elements stay NaN) and
compares with a float64 NumPy reference (small cases) or the float32 XLA block-gather
implementation on the GPU (large cases; itself checked against float64 NumPy in the CPU tests).
Prints one line per case and writes ``check_kernels_gpu.json`` to ``--out``.
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

from pallas_kernels import BlockSparseLayout, SegmentIds  # noqa: E402
from pallas_kernels.gpu.block_sparse_triton import block_sparse_attention_triton  # noqa: E402
from pallas_kernels.layout import random_block_mask  # noqa: E402
from pallas_kernels.testing import random_problem  # noqa: E402
from pallas_kernels.xla.block_sparse_xla import block_sparse_attention_xla  # noqa: E402

CASES = [
    # name, kwargs for random_problem, kwargs for the kernel
    ("odd1000_gqa4_kvhead_seg_bf16", dict(B=2, Sq=1000, Sk=1000, Hq=8, Hkv=2, Dqk=128, Dv=128,
                                          segments=True, per_kv_head=True), {}),
    ("odd1000_gqa4_kvhead_seg_bf16_packed", dict(B=2, Sq=1000, Sk=1000, Hq=8, Hkv=2, Dqk=128,
                                                 Dv=128, segments=True, per_kv_head=True),
     dict(pack_gqa=True)),
    ("chunk64_gqa4_kvhead_bq32_packed", dict(B=2, Sq=64, Sk=2000, Hq=8, Hkv=2, Dqk=128, Dv=128,
                                             q_offset="chunk", block_q=32, block_k=64), {}),
    ("odd1000_gqa4_qhead_chunk_bf16", dict(B=2, Sq=300, Sk=1000, Hq=8, Hkv=2, Dqk=128, Dv=128,
                                           q_offset="chunk", per_kv_head=False), {}),
    ("mla_192_128_bf16", dict(B=1, Sq=777, Sk=777, Hq=4, Hkv=4, Dqk=192, Dv=128), {}),
    ("gqa8_noncausal_bf16", dict(B=1, Sq=512, Sk=640, Hq=8, Hkv=1, Dqk=64, Dv=64,
                                 causal=False), {}),
    ("f32_gqa4", dict(B=1, Sq=384, Sk=384, Hq=4, Hkv=1, Dqk=64, Dv=64, dtype=np.float32,
                      block_q=64, block_k=64), {}),
]


def rel_err(out, ref):
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


INTERPRET = False  # --interpret: CPU smoke test of this script (small cases only)


def check_small(name, kw, kernel_kw, results):
    dtype = kw.pop("dtype", jnp.bfloat16)
    kw.setdefault("block_q", 128)
    kw.setdefault("block_k", 128)
    p = random_problem(int(time.time_ns() % 2**31), density=0.5, dtype=dtype, **kw)
    lay = BlockSparseLayout.from_block_mask(p.block_mask, p.block_q, p.block_k)
    seg = None if p.seg_q is None else SegmentIds(jnp.asarray(p.seg_q), jnp.asarray(p.seg_kv))
    out, lse = block_sparse_attention_triton(
        jnp.asarray(p.q), jnp.asarray(p.k), jnp.asarray(p.v), lay, causal=p.causal,
        q_offset=jnp.asarray(p.q_offset), segment_ids=seg, poison_output=True,
        interpret=INTERPRET, **kernel_kw)
    ref_out, ref_lse = p.reference()
    record(name, out, lse, ref_out, ref_lse, dtype == np.float32, results)


def check_big(S, Sq, per_kv_head, results, density=0.3, **kernel_kw):
    rng = np.random.default_rng(int(time.time_ns() % 2**31))
    B, Hq, Hkv, D = 1, 32, 8, 128
    H = Hkv if per_kv_head else Hq
    off = S - Sq
    mask = random_block_mask(rng, B, H, Sq, S, 128, 128, density, q_offset=off)
    lay = BlockSparseLayout.from_block_mask(mask, 128, 128)
    keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), 3)
    q = jax.random.normal(keys[0], (B, Sq, Hq, D), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, S, Hkv, D), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, S, Hkv, D), jnp.bfloat16)
    out, lse = block_sparse_attention_triton(q, k, v, lay, q_offset=off, poison_output=True,
                                             **kernel_kw)
    ref = jax.jit(block_sparse_attention_xla)
    ref_out, ref_lse = ref(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                           lay, q_offset=off)
    name = f"S{S}_Sq{Sq}_{'kvhead' if per_kv_head else 'qhead'}_d{density}{kernel_kw or ''}"
    record(name, out, lse, np.asarray(ref_out), np.asarray(ref_lse), False, results,
           low_precision=True)


def record(name, out, lse, ref_out, ref_lse, is_f32, results, low_precision=None):
    out = np.asarray(jnp.asarray(out, jnp.float32))
    lse = np.asarray(lse)
    low = (not is_f32) if low_precision is None else low_precision
    nan = int(np.isnan(out).sum() + np.isnan(lse).sum())
    err = rel_err(out, ref_out)
    empty = np.isneginf(ref_lse)
    lse_ok = bool(np.array_equal(np.isneginf(lse), empty))
    lse_err = float(np.max(np.abs(lse[~empty] - ref_lse[~empty]), initial=0.0))
    tol = 1e-2 if low else 1e-4
    ok = nan == 0 and err < tol and lse_ok and lse_err < 1e-2
    results.append(dict(name=name, rel_err=err, nan=nan, lse_inf_match=lse_ok,
                        lse_max_abs_err=lse_err, tol=tol, ok=ok))
    print(f"{'PASS' if ok else 'FAIL'} {name:40s} rel_err={err:.2e} nan={nan} "
          f"lse_inf_match={lse_ok} lse_err={lse_err:.1e}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--max-seq", type=int, default=32768)
    ap.add_argument("--interpret", action="store_true")
    args = ap.parse_args()
    global INTERPRET
    INTERPRET = args.interpret
    print("jax", jax.__version__, jax.devices(), flush=True)
    results = []
    for name, kw, kernel_kw in CASES:
        try:
            check_small(name, dict(kw), kernel_kw, results)
        except Exception:  # keep going: report every case
            traceback.print_exc()
            results.append(dict(name=name, ok=False, error=traceback.format_exc(limit=3)))
    for S, Sq, per_kv, kernel_kw in [(4096, 4096, True, {}), (16384, 16384, False, {}),
                                     (32768, 32768, True, {}), (32768, 4096, True, {}),
                                     (32768, 32768, True, dict(pack_gqa=True))]:
        if S > args.max_seq:
            continue
        try:
            check_big(S, Sq, per_kv, results, **kernel_kw)
        except Exception:
            traceback.print_exc()
            results.append(dict(name=f"S{S}", ok=False, error=traceback.format_exc(limit=3)))
    n_ok = sum(r["ok"] for r in results)
    print(f"{n_ok}/{len(results)} cases passed", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "check_kernels_gpu.json", "w") as f:
        json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0]), results=results), f,
                  indent=1)
    return 0 if n_ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
