"""How much BLASST would skip on a real model's attention (CPU is fine; no timing).

BLASST drops, per query row, every key tile whose max logit is below the row's running max by
more than ln(lambda); a kernel with ``block_q``-row tiles saves the work of a tile only when
every live row of the tile skips it. The synthetic q/k of the GPU benchmark skip almost nothing
(docs/performance.md), so this measures SmolLM2's own q/k: one dense forward captures every
layer's q, k, v on a passkey prompt, then :func:`pallas_kernels.reference.blasst_skip_stats`
applies the exact rule per layer over the dense causal layout (one list per KV head, block 128,
as the ``blasst`` policy builds it).

    python -m scripts.accuracy.blasst_skip_smollm2 --lengths 2048 4096 --lambdas 0.8/L 1e-3 1e-2

``0.8/L`` is the policy's default (the paper's calibration a / L). Prints and writes a JSON
table (per length and lambda: skipped (row, tile) pairs and tiles all 128 / 32 rows skip).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jaxprefill as jp
from jaxprefill.eval.probe import capture_qkv
from jaxprefill.eval.runner import prompt_tokens
from pallas_kernels import BlockSparseLayout
from pallas_kernels.reference import blasst_skip_stats


def parse_lambda(text: str, length: int) -> float:
    """'1e-3' -> 0.001; 'a/L' -> a / length."""
    if text.endswith("/L"):
        return float(text[:-2]) / length
    return float(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--lambdas", nargs="+", default=["0.8/L", "1e-3", "1e-2"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON file for the table")
    args = ap.parse_args()

    model, tok = jp.load(args.model)
    rows = []
    for length in args.lengths:
        tokens = prompt_tokens(tok, length, seed=args.seed)
        q_all, k_all, v_all = capture_qkv(model, jnp.asarray(tokens))  # [L, 1, S, H, D]
        s, hkv = q_all.shape[2], k_all.shape[3]
        for text in args.lambdas:
            lam = parse_lambda(text, s)
            stats = {"row_tiles": [], "block_tiles_128": [], "block_tiles_32": []}
            for layer in tqdm(range(q_all.shape[0]), desc=f"S={s} lambda={text}", leave=False):
                for block_q, key in ((128, "block_tiles_128"), (32, "block_tiles_32")):
                    layout = BlockSparseLayout.dense_causal(1, hkv, s, s, block_q, 128)
                    st = blasst_skip_stats(q_all[layer], k_all[layer], v_all[layer], layout,
                                           lam)
                    stats[key].append(st["block_tiles"])
                    if block_q == 128:
                        stats["row_tiles"].append(st["row_tiles"])
            row = {"length": int(s), "lambda": text, "lambda_value": lam,
                   **{k: float(np.mean(v)) for k, v in stats.items()},
                   "row_tiles_per_layer": [round(x, 4) for x in stats["row_tiles"]]}
            rows.append(row)
            print(f"S={s:5d} lambda={text:>6s} ({lam:.2e}): (row, tile) pairs skipped "
                  f"{row['row_tiles']:.2%}; tiles all 128 rows skip {row['block_tiles_128']:.2%};"
                  f" all 32 rows {row['block_tiles_32']:.2%}", flush=True)
            if args.out:  # after every row: a long run that is stopped keeps what it measured
                Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
