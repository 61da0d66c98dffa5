"""Offline MInference pattern search: per head, the candidate whose sparse output is closest to
dense at a bounded density; writes the per-head JSON that `minference` reads (head_config).

Following MInference's offline search (docs/methods/minference.md) on our substrate:
one reference prompt (a multi-key NIAH sample, like the original's kv_retrieval sample), one
dense forward capturing every layer's q/k/v, then for every layer and candidate
(A-shape / vertical-slash / block-sparse settings from the original search space, scaled to the
prompt) the per-head relative output error on sampled query rows and the per-head density.
Per head: the lowest-error candidate whose density is <= --max-density (else the sparsest).
The original equalizes real kernel FLOPs; we bound block density instead (our cost unit).

    python -m scripts.tools.search_minference_patterns --length 4096 \
        --out configs/sparse/minference_heads_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import jaxprefill as jp
from jaxprefill import sparse
from jaxprefill.eval.metrics import head_stats, sample_rows
from jaxprefill.eval.probe import capture_qkv
from jaxprefill.eval.runner import prompt_tokens

# (pattern, p1, p2): the original search space (A-shape 100/800; VS pairs; block-sparse top-k).
CANDIDATES = [("a", 100, 800), ("vs", 30, 800), ("vs", 100, 750), ("vs", 100, 800),
              ("vs", 500, 700), ("vs", 1000, 4096), ("vs", 3500, 100), ("bs", 8, 0),
              ("bs", 16, 0)]


def candidate_policy(pattern: str, p1: int, p2: int, block: int):
    kw = {"vs": dict(vertical=p1, slash=p2), "bs": dict(bs_blocks=p1),
          "a": dict(a_sink=p1, a_local=p2)}[pattern]
    return sparse.get("minference", pattern=pattern, block_size=block, **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--max-density", type=float, default=0.5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    model, tok = jp.load(args.model)
    tokens = prompt_tokens(tok, args.length, task="niah_multikey")
    q_all, k_all, v_all = capture_qkv(model, jnp.asarray(tokens))
    s = tokens.shape[1]
    lengths = jnp.asarray([s], jnp.int32)
    rows = sample_rows([s], args.rows, min_pos=min(256, s - 1))
    layers = {}
    for layer in range(q_all.shape[0]):
        q, k, v = q_all[layer], k_all[layer], v_all[layer]
        errs, dens = [], []
        for cand in CANDIDATES:
            mask = candidate_policy(*cand, args.block).block_mask(q, k, lengths=lengths)
            st = head_stats(q, k, v, mask, lengths, args.block, rows)
            errs.append(st.output_error)
            dens.append(st.density)
        errs, dens = np.array(errs), np.array(dens)  # [candidates, Hq]
        heads = []
        for h in range(errs.shape[1]):
            ok = np.flatnonzero(dens[:, h] <= args.max_density)
            best = ok[np.argmin(errs[ok, h])] if len(ok) else int(np.argmin(dens[:, h]))
            heads.append(list(CANDIDATES[best]))
        layers[str(layer)] = heads
        print(f"layer {layer}: " + " ".join(f"{p}{a}/{b}" for p, a, b in heads), flush=True)
    out = {"model": args.model, "length": s, "block": args.block,
           "max_density": args.max_density, "layers": layers}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
