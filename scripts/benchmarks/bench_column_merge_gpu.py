"""Key columns on Hopper: Triton's column path against Mosaic GPU with the columns merged.

One block-sparse attention call at the 32K SmolLM2 shapes (9 query / 3 KV heads of 64, bf16,
blocks of 128, per-KV-head lists at ``--density``, ``--columns`` random key columns a row),
timed five ways in one run, each output compared with Triton's:

  * ``triton``: the Triton kernel with its column path (what "auto" runs for such layouts);
  * ``mosaic_blocks``: Mosaic GPU over the listed blocks only (no columns: the floor);
  * ``mosaic+xla_columns``: Mosaic GPU, the columns in XLA (`column_merge.column_attention`);
  * ``mosaic+triton_columns_merge``: Mosaic GPU, the columns by the Triton kernel over the
    columns alone, merged by logsumexp in XLA (the previous library path);
  * ``mosaic+triton_columns``: Mosaic GPU, then the Triton kernel over the columns starting
    from the blocks' softmax (``prior``: no merge pass; `impl="mosaic_gpu"` now).

    python -m scripts.benchmarks.bench_column_merge_gpu --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import block_sparse_attention
from pallas_kernels.column_merge import with_merged_columns
from pallas_kernels.gpu.block_sparse_mosaic import block_sparse_attention_mosaic
from pallas_kernels.gpu.block_sparse_triton import block_sparse_attention_triton
from pallas_kernels.testing import random_problem
from scripts.common.timing import time_ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--columns", type=int, default=64)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    p = random_problem(0, B=1, Sq=args.seq, Sk=args.seq, Hq=9, Hkv=3, Dqk=64, Dv=64,
                       block_q=128, block_k=128, per_kv_head=True, density=args.density,
                       empty_row_frac=0.0, columns=args.columns, dtype=jnp.bfloat16)
    q, k, v = (jnp.asarray(x) for x in (p.q, p.k, p.v))
    layout = p.layout()
    blocks = dataclasses.replace(layout, col_idx=None, col_cnt=None)
    runs = {
        "triton": jax.jit(lambda q, k, v, lay: block_sparse_attention(q, k, v, lay,
                                                                      impl="triton")),
        "mosaic_blocks": jax.jit(lambda q, k, v, lay: block_sparse_attention(
            q, k, v, blocks, impl="mosaic_gpu")),
        "mosaic+xla_columns": jax.jit(lambda q, k, v, lay: with_merged_columns(
            block_sparse_attention_mosaic, q, k, v, lay, causal=True)[0]),
        "mosaic+triton_columns_merge": jax.jit(lambda q, k, v, lay: with_merged_columns(
            block_sparse_attention_mosaic, q, k, v, lay, causal=True,
            columns=block_sparse_attention_triton)[0]),
        "mosaic+triton_columns": jax.jit(lambda q, k, v, lay: block_sparse_attention(
            q, k, v, lay, impl="mosaic_gpu")),
    }
    rows, ref = [], None
    for name, fn in runs.items():
        out = np.asarray(fn(q, k, v, layout), np.float32)
        if ref is None:
            ref = out
        err = float(np.abs(out - ref).max() / (np.abs(ref).max() + 1e-9))
        t = time_ms(fn, q, k, v, layout, warmup=2, reps=7, sample_ms=30).ms
        rows.append(dict(variant=name, ms=t, rel_err_vs_triton=err,
                         nan=bool(np.isnan(out).any())))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["ms"]
    lines = [f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; B 1, S {args.seq}, "
             f"9 / 3 heads of 64, bf16, blocks 128, density {args.density}, {args.columns} "
             f"columns a row", "",
             "| variant | ms | / triton | max rel. error vs triton | NaN |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['ms']:.3f} | {r['ms'] / base:.2f} | "
              f"{r['rel_err_vs_triton']:.1e} | {r['nan']} |" for r in rows]
    (args.out / "bench_column_merge_gpu.md").write_text("\n".join(lines) + "\n")
    (args.out / "bench_column_merge_gpu.json").write_text(json.dumps(
        dict(args={k_: str(v_) for k_, v_ in vars(args).items()}, rows=rows), indent=1))
    print("\n".join(lines))
    bad = [r["variant"] for r in rows if r["nan"] or (r["variant"] != "mosaic_blocks"
                                                      and r["rel_err_vs_triton"] > 2e-2)]
    if bad:
        print(f"error: {bad} disagree with Triton's column path")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
