"""Sparse prefill on a GPU: estimation cost and sparse attention time vs cuDNN dense attention.

One attention layer at Llama-3-8B shapes (Hq=32, Hkv=8, D=128, bf16, batch 1) at 32K and 128K
tokens, q/k from `jaxprefill.eval.synthetic_qk.structured_qk` (4 sink tokens, 16 vertical lines,
a local window of ~256 tokens, Gaussian noise; see that module), v Gaussian. Per policy at its
paper defaults:
  * est_ms: jitted policy.build(q, k) (estimation + selection + layout conversion);
  * attn_ms: the block-sparse Pallas GPU kernel over that layout (pbs: its attend() minus
    est_ms: the K/V permutation and the kernel over [permuted K; K]);
  * est / cudnn: estimation as a fraction of cuDNN causal attention (bar: <= 5% at 128K);
  * total / cudnn: (estimation + sparse attention) / cuDNN: < 1 means faster than dense;
  * density: listed / causal blocks.
Times: median ms of --iters calls after one warm-up call (compile excluded), one call per
sample (``scripts.common.timing.time_ms``).
Sparse attention runs the `auto` GPU kernel (Mosaic on Hopper, Triton for column layouts).

``--chunk C`` times chunked prefill instead (the batch engine's path): the last C-token chunk of
the prompt against the whole cache view (q_offset = S - C), est = `chunk_layout` (the policy's
layout rows for the chunk), attn = the kernel over them, anchor = the same kernel over the
dense causal rows of the chunk (what the engine runs without sparsity).

    python -m scripts.benchmarks.bench_sparse_gpu --lengths 32768 131072 --out $OUT/sparse_gpu.md
    python -m scripts.benchmarks.bench_sparse_gpu --lengths 32768 --chunk 4096 --out $OUT/chunk.md

``--estimation xla auto`` times each policy's estimation once per estimator implementation
(the policies' ``estimation`` field, :class:`jaxprefill.sparse.Estimation`: "xla" = the XLA
estimators, "auto" = the Pallas Triton estimation kernels on GPUs, "triton" = those by name;
``pallas_gpu`` is accepted for "triton"), in the same process, labels ``policy@impl``.
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

from jaxprefill import sparse
from jaxprefill.eval.synthetic_qk import structured_qk
from jaxprefill.sparse.base import make_geometry
from jaxprefill.sparse.prefill import chunk_layout
from pallas_kernels import block_sparse_attention
from pallas_kernels.layout import structured_layout
from scripts.common.impl_names import canonical
from scripts.common.timing import time_ms

POLICIES = {
    "streaming": dict(sink=1024, local=4096),  # MInference's StreamingLLM baseline
    "minference": dict(),  # VS(1000, 6096), block 64
    "flexprefill": dict(gamma=0.95, tau=0.1),
    "xattention": dict(threshold=0.9, stride=16),
    "xattention_s8": dict(threshold=0.9, stride=8),
    "proxyattn": dict(gamma=0.95, stride=16),
    "trianglemix": dict(start_layer=0),  # a deep ("triangle") layer
    "pbs": dict(tau=0.9, segment=256),
    "oracle_topk": dict(gamma=0.95),
}


def bench_length(seq: int, names: list[str], iters: int, heads: str,
                 breakdown: bool = False) -> list[dict]:
    hq, hkv, d = 32, 8, 128
    q, k = jax.jit(structured_qk, static_argnums=(1, 2, 3, 4, 5))(jax.random.key(0), 1, seq, hq,
                                                                   hkv, d)
    v = jax.random.normal(jax.random.key(1), (1, seq, hkv, d), jnp.bfloat16)
    gpu = jax.default_backend() == "gpu"  # CPU: a smoke run of the script (XLA everywhere)
    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn" if gpu else None))
    cudnn_ms = time_ms(dense, q, k, v, reps=iters).ms
    print(f"S={seq}: cuDNN causal {cudnn_ms:.2f} ms", flush=True)
    rows = []
    kernel = "auto" if gpu else "xla"
    for label in names:
        label, _, impl = label.partition("@")
        estimation = {"estimation": canonical(impl)} if impl else {}
        name = label.split("_s")[0] if label.startswith("xattention_s") else label
        label = f"{label}@{impl}" if impl else label
        if name == "oracle_topk" and seq > 65536:
            print(f"{label}: skipped at S={seq} (as costly as dense attention by design)",
                  flush=True)
            continue
        try:
            policy = sparse.get(name, heads=heads, **estimation,
                                **POLICIES[label.partition("@")[0]])
            # pbs attends over [permuted K; K] with its own attend(): no plain layout to time
            own_attend = type(policy).attend is not sparse.Policy.attend
            build = jax.jit(lambda q, k: policy.build(q, k, layer=20))
            attn = jax.jit(lambda q, k, v, lay: block_sparse_attention(
                q, k, v, lay, causal=True, impl=kernel))
            est_ms = time_ms(build, q, k, reps=iters).ms
            layout = build(q, k)
            split = {}
            # select() (estimation) vs finish() (shared rules + list conversion)
            if breakdown and not own_attend:
                geo = make_geometry(q, k, policy.block_size, None, policy.estimation)
                sel = jax.jit(lambda q, k: policy.select(q, k, geo, 20))
                fin = jax.jit(lambda m: policy.finish(m, geo, 0))
                split["select_ms"] = time_ms(sel, q, k, reps=iters).ms
                m = sel(q, k)
                split["finish_ms"] = time_ms(fin, m, reps=iters).ms
                del m
            if own_attend:  # pbs: permutes K/V; attend = estimation + kernel
                call = sparse.Prefill("prompt", 20, q.shape[-1] ** -0.5, kernel=kernel)
                full = jax.jit(lambda q, k, v: policy.attend(q, k, v, call))
                attn_ms = time_ms(full, q, k, v, reps=iters).ms - est_ms
            else:
                attn_ms = time_ms(attn, q, k, v, layout, reps=iters).ms
            cnt = np.asarray(layout.kv_cnt, np.float64)
            n = layout.num_q_blocks  # pbs lists blocks of [permuted K; K]: 2n key blocks
            density = cnt.sum() / (cnt.shape[0] * cnt.shape[1] * n * (n + 1) / 2)
            row = dict(policy=label, seq=seq, cudnn_ms=cudnn_ms, est_ms=est_ms, attn_ms=attn_ms,
                       est_frac=est_ms / cudnn_ms, total_frac=(est_ms + attn_ms) / cudnn_ms,
                       density=density, block=policy.block_size, heads=layout.num_heads, **split)
        except Exception as e:  # report, never skip silently
            traceback.print_exc()
            row = dict(policy=label, seq=seq, cudnn_ms=cudnn_ms, error=f"{type(e).__name__}: {e}"[:200])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def bench_chunk(seq: int, chunk: int, names: list[str], iters: int, heads: str) -> list[dict]:
    """The last chunk of a seq-token prompt (see the module docstring)."""
    hq, hkv, d = 32, 8, 128
    q, k = jax.jit(structured_qk, static_argnums=(1, 2, 3, 4, 5))(jax.random.key(0), 1, seq, hq,
                                                                   hkv, d)
    v = jax.random.normal(jax.random.key(1), (1, seq, hkv, d), jnp.bfloat16)
    off = jnp.full((1,), seq - chunk, jnp.int32)
    qc = q[:, seq - chunk:]
    impl = "auto" if jax.default_backend() == "gpu" else "xla"
    attn = jax.jit(lambda q, k, v, lay, off: block_sparse_attention(
        q, k, v, lay, causal=True, impl=impl, q_offset=off))
    rows = []
    for label in names:
        name = label.split("_s")[0] if label.startswith("xattention_s") else label
        policy = sparse.get(name, heads=heads, **POLICIES[label])
        blk = policy.block_size
        dense = structured_layout(chunk, seq, 1, hkv, block_q=blk, block_k=blk, causal=True,
                                  q_offset=off, segment_ids=None)
        dense_ms = time_ms(attn, qc, k, v, dense, off, reps=iters).ms
        try:
            build = jax.jit(lambda q, k, off: chunk_layout(policy, q, k, off, None, 1024, 20))
            est_ms = time_ms(build, qc, k, off, reps=iters).ms
            layout = build(qc, k, off)
            attn_ms = time_ms(attn, qc, k, v, layout, off, reps=iters).ms
            cnt = np.asarray(layout.kv_cnt, np.float64)
            causal_blocks = np.asarray(dense.kv_cnt, np.float64).sum() / hkv * cnt.shape[1]
            row = dict(policy=label, seq=seq, chunk=chunk, dense_ms=dense_ms, est_ms=est_ms,
                       attn_ms=attn_ms, density=cnt.sum() / causal_blocks, block=blk,
                       columns=getattr(layout, "col_idx", None) is not None,
                       total_frac=(est_ms + attn_ms) / dense_ms)
        except Exception as e:  # report, never skip silently
            traceback.print_exc()
            row = dict(policy=label, seq=seq, chunk=chunk, dense_ms=dense_ms,
                       error=f"{type(e).__name__}: {e}"[:200])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def chunk_table(rows: list[dict]) -> str:
    out = ["| policy | S | chunk | block | columns | density | est ms | sparse attn ms | dense "
           "attn ms | (est + attn) / dense |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['policy']} | {r['seq']} | {r['chunk']} | error: {r['error']} "
                       "| | | | | | |")
            continue
        out.append(f"| {r['policy']} | {r['seq']} | {r['chunk']} | {r['block']} | "
                   f"{r['columns']} | {r['density']:.3f} | {r['est_ms']:.2f} | "
                   f"{r['attn_ms']:.2f} | {r['dense_ms']:.2f} | {r['total_frac']:.2f} |")
    return "\n".join(out)


def table(rows: list[dict]) -> str:
    out = ["| policy | S | block | density | est ms | sparse attn ms | cuDNN ms | est / cuDNN "
           "| (est + attn) / cuDNN |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['policy']} | {r['seq']} | error: {r['error']} | | | | | | |")
            continue
        out.append(f"| {r['policy']} | {r['seq']} | {r['block']} | {r['density']:.3f} | "
                   f"{r['est_ms']:.2f} | {r['attn_ms']:.2f} | {r['cudnn_ms']:.2f} | "
                   f"{r['est_frac']:.1%} | {r['total_frac']:.2f} |"
                   + (f" select {r['select_ms']:.2f} / finish {r['finish_ms']:.2f} ms" if
                      "select_ms" in r else ""))
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--heads", default="q", choices=["q", "kv"])
    ap.add_argument("--breakdown", action="store_true",
                    help="also time policy.select and policy.finish separately")
    ap.add_argument("--chunk", type=int, default=0,
                    help="time the last chunk of this many tokens (chunked prefill) instead")
    ap.add_argument("--out", default=None, help="markdown table path (a .json beside it)")
    ap.add_argument("--estimation", nargs="+", default=[],
                    help="estimator implementations to compare (xla, auto, triton)")
    args = ap.parse_args()
    if args.estimation and not args.chunk:
        args.policies = [f"{p}@{e}" for p in args.policies for e in args.estimation]
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    rows = []
    for seq in args.lengths:
        if args.chunk:
            rows += bench_chunk(seq, args.chunk, args.policies, args.iters, args.heads)
        else:
            rows += bench_length(seq, args.policies, args.iters, args.heads, args.breakdown)
    md = (f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}\n\n"
          + (chunk_table(rows) if args.chunk else table(rows)))
    print(md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
