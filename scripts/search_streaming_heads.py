"""Training-free retrieval-head search for the ``streaming`` policy (DuoAttention-style heads).

DuoAttention trains one gate per KV head to decide which heads need full attention
("retrieval heads") and which can keep only the sink and a recent window ("streaming heads").
Without training, we rank heads by what streaming would drop: on calibration prompts (synthetic
multi-key NIAH and passkey samples with seeds disjoint from the evaluation's 0..3), one dense
forward captures every layer's q/k; per KV head, the score is the attention mass that the
prompt's last ``--rows`` queries (all query heads of the group) put on keys outside the
sink + local window, averaged over prompts. The ``--dense-fraction`` highest-scoring (layer,
KV head) pairs over the whole model become dense; the file is the ``head_config`` of
``streaming``.

    python scripts/search_streaming_heads.py --lengths 4096 8192 --dense-fraction 0.5 \
        --out configs/sparse/streaming_heads_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jaxprefill as jp  # noqa: E402
from jaxprefill.eval.probe import capture_qkv  # noqa: E402
from jaxprefill.eval.runner import prompt_tokens  # noqa: E402


def far_mass(q_last: jax.Array, k: jax.Array, sink: int, local: int) -> np.ndarray:
    """q_last [L, R, Hq, D] (the prompt's last R queries), k [L, S, Hkv, D] -> [L, Hkv].

    Mass outside the window of each query (causal softmax over keys <= its position), averaged
    over the R queries and the group's query heads.
    """
    n_layers, r, hq, d = q_last.shape
    s, hkv = k.shape[1], k.shape[2]
    qg = q_last.astype(jnp.float32).reshape(n_layers, r, hkv, hq // hkv, d)
    logits = jnp.einsum("lrhgd,lshd->lhgrs", qg, k.astype(jnp.float32)) * d ** -0.5
    pos = s - r + jnp.arange(r)[:, None]  # [R, 1]
    key = jnp.arange(s)[None, :]
    p = jax.nn.softmax(jnp.where(key <= pos, logits, -jnp.inf), axis=-1)
    inside = (key < sink) | (key > pos - local)  # [R, S]
    far = jnp.sum(jnp.where(inside, 0.0, p), axis=-1)  # [L, Hkv, G, R]
    return np.asarray(far.mean(axis=(2, 3)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--tasks", nargs="+", default=["niah_multikey", "passkey"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001],
                    help="calibration seeds (the evaluation uses 0..3)")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--local", type=int, default=256)
    ap.add_argument("--rows", type=int, default=128, help="last queries scored per prompt")
    ap.add_argument("--dense-fraction", type=float, default=0.5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not 0.0 <= args.dense_fraction <= 1.0:
        ap.error(f"--dense-fraction must be in [0, 1], got {args.dense_fraction}")

    model, tok = jp.load(args.model)
    prompts = [(n, t, s) for n in args.lengths for t in args.tasks for s in args.seeds]
    scores = []
    for length, task, seed in tqdm(prompts, desc="calibration prompts"):
        tokens = prompt_tokens(tok, length, seed=seed, task=task)
        q, k, _ = capture_qkv(model, jnp.asarray(tokens))  # [L, 1, S, H, D]
        scores.append(far_mass(q[:, 0, -args.rows:], k[:, 0], args.sink, args.local))
    score = np.mean(scores, axis=0)  # [L, Hkv]
    n_layers, hkv = score.shape
    n_dense = int(round(args.dense_fraction * score.size))
    order = np.argsort(-score, axis=None, kind="stable")[:n_dense]
    dense = {str(layer): [] for layer in range(n_layers)}
    for flat in order:
        layer, head = divmod(int(flat), hkv)
        dense[str(layer)].append(head)
    dense = {layer: sorted(heads) for layer, heads in dense.items() if heads}
    out = {"model": args.model, "lengths": args.lengths, "tasks": args.tasks,
           "seeds": args.seeds, "sink": args.sink, "local": args.local,
           "dense_fraction": args.dense_fraction,
           "far_mass": [[round(float(x), 4) for x in row] for row in score],
           "dense_heads": dense}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for layer in range(n_layers):
        marks = " ".join(f"{score[layer, h]:.3f}{'*' if h in dense.get(str(layer), []) else ' '}"
                         for h in range(hkv))
        print(f"layer {layer:2d}: {marks}")
    print(f"{n_dense} of {score.size} KV heads dense; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
