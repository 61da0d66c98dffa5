"""H100 timing of the column path (MInference) and BLASST, with cuDNN dense in the same run.

    python -m scripts.benchmarks.bench_columns_blasst_gpu [--out DIR] [--seqs 32768 131072]

Llama-3-8B attention shapes (Hq=32, Hkv=8, D=128, bf16, batch 1), structured synthetic q/k
(``jaxprefill.eval.synthetic_qk.structured_qk``: sinks, local window, 16 vertical lines).

* MInference (default VS(1000, 6096), block 64, per query head): the Triton kernel on the layout
  with the vertical lines as columns vs the same layout with them rounded up to blocks; layout
  densities (computed blocks / all blocks, column chunks counted as blocks).
* BLASST: the Triton kernel on the dense causal layout (block 128, per KV head) with lambda off,
  the paper-calibrated lambda = 0.8 / S and 1e-3.
Each time is the median of 10 calls after 2 warm-ups, one call per sample
(``scripts.common.timing.time_ms``); the anchor is cuDNN dense causal attention, timed the
same way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprefill import sparse
from jaxprefill.eval.synthetic_qk import structured_qk
from pallas_kernels import BlockSparseLayout
from pallas_kernels.gpu.block_sparse_triton import block_sparse_attention_triton
from scripts.common.timing import time_ms

TIMING = dict(warmup=2, reps=10)  # time_ms options: one call per sample


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--seqs", type=int, nargs="+", default=[32768, 131072])
    args = ap.parse_args()
    print("jax", jax.__version__, jax.devices(), flush=True)
    Hq, Hkv, D = 32, 8, 128
    rows = []
    for S in args.seqs:
        q, k = structured_qk(jax.random.key(S), 1, S, Hq, Hkv, D)
        v = jax.random.normal(jax.random.key(S + 1), (1, S, Hkv, D), jnp.bfloat16)
        cudnn = jax.jit(lambda a, b, c: jax.nn.dot_product_attention(
            a, b, c, is_causal=True, implementation="cudnn"))
        t_dense = time_ms(cudnn, q, k, v, **TIMING).ms
        row = dict(S=S, cudnn_ms=t_dense)
        print(f"S={S}: cuDNN dense {t_dense:.2f} ms", flush=True)

        pol = sparse.get("minference")
        lay_c = jax.jit(lambda a, b: pol.build(a, b))(q, k)
        lay_r = jax.jit(lambda l: l.round_columns_to_blocks(max_nnz=l.max_nnz + 1000))(lay_c)
        kern = jax.jit(lambda a, b, c, l: block_sparse_attention_triton(a, b, c, l)[0])
        t_c = time_ms(kern, q, k, v, lay_c, **TIMING).ms
        t_r = time_ms(kern, q, k, v, lay_r, **TIMING).ms
        row.update(minf_density_columns=lay_c.density(), minf_density_rounded=lay_r.density(),
                   minf_columns_ms=t_c, minf_rounded_ms=t_r,
                   minf_mean_cols=float(np.asarray(lay_c.col_cnt).mean()))
        print(f"  minference: columns {t_c:.2f} ms (density {lay_c.density():.4f}, "
              f"{row['minf_mean_cols']:.0f} cols/row) vs rounded {t_r:.2f} ms "
              f"(density {lay_r.density():.4f}); vs cuDNN {t_c / t_dense:.3f} / "
              f"{t_r / t_dense:.3f}", flush=True)
        del lay_c, lay_r

        dense = BlockSparseLayout.dense_causal(1, Hkv, S, S, 128, 128)
        for lam in (None, 0.8 / S, 1e-3):
            fn = jax.jit(lambda a, b, c, l, lam=lam: block_sparse_attention_triton(
                a, b, c, l, blasst_threshold=lam)[0])
            t = time_ms(fn, q, k, v, dense, **TIMING).ms
            row[f"blasst_{lam}_ms"] = t
            print(f"  blasst lambda={lam}: {t:.2f} ms ({t / t_dense:.3f} x cuDNN)", flush=True)
        rows.append(row)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "bench_columns_blasst_gpu.json", "w") as f:
        json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0]), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
