"""Where a block policy's layout misses attention mass, layer by layer, on a real prompt.

    python -m scripts.accuracy.missed_attention --model smollm2-135m-32k --length 8192 \
      --policies xattention proxyattn flexprefill --out DIR          # CPU: a few minutes

A dense forward of one `jaxprefill eval` dev prompt captures every layer's q/k
(`jaxprefill.eval.probe.capture_qkv`). Per listed layer, exact causal attention of `--rows`
query rows from the prompt's second half gives (means over rows and query heads):

* `keys_50` / `keys_90`: the median number of keys holding 50% / 90% of a query's mass (token
  concentration: a few keys = sharp attention that block pooling can spread away);
* `oracle_90`: the density of the fewest blocks per query-block row that hold 90% of the mass;
* per policy (its layout with `n_last` 0, the method's own): density, recall, the lowest query
  head's recall, and `miss_on_columns`, the share of the missed mass that lies on the
  `--columns` keys the prompt's last 64 queries attend most (what `key_columns` would add).

Writes missed_attention.json and .md to `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

LAST_QUERIES = 64


def exact_probs(q: np.ndarray, k: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float64 [Hq, R, S]: causal softmax of query rows ``rows`` over all keys of one prompt.
    q [S, Hq, D], k [S, Hkv, D]."""
    s, hq, d = q.shape
    kk = np.repeat(k.astype(np.float64), hq // k.shape[1], axis=1)
    logits = np.einsum("rhd,shd->hrs", q[rows].astype(np.float64), kk) / np.sqrt(d)
    logits = np.where(np.arange(s)[None, None, :] <= rows[None, :, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def layer_report(q: np.ndarray, k: np.ndarray, block_masks: dict[str, np.ndarray],
                 rows: np.ndarray, block: int, columns: int) -> dict:
    """One layer's statistics (module docstring). q [S, Hq, D], k [S, Hkv, D]; block_masks:
    policy -> bool [H, n, n] (H = Hq, or Hkv for per-KV-head layouts); rows int [R]."""
    s = q.shape[0]
    p = exact_probs(q, k, rows)  # [Hq, R, S]
    hq, n = p.shape[0], -(-s // block)
    blk = np.pad(p, ((0, 0), (0, 0), (0, n * block - s))).reshape(hq, len(rows), n, block).sum(-1)
    nb = rows // block + 1  # causal blocks of each row
    srt = -np.sort(-blk, axis=-1)
    need = (np.cumsum(srt, axis=-1) < 0.9).sum(-1) + 1
    cum = np.cumsum(-np.sort(-p, axis=-1), axis=-1)
    last = exact_probs(q, k, np.arange(max(0, s - LAST_QUERIES), s)).sum(1)  # [Hq, S]
    top = np.argsort(-last, axis=-1)[:, :columns]
    on_cols = np.zeros((hq, s), bool)
    np.put_along_axis(on_cols, top, True, axis=-1)
    out = {"keys_50": float(np.median((cum < 0.5).sum(-1) + 1)),
           "keys_90": float(np.median((cum < 0.9).sum(-1) + 1)),
           "oracle_90": float(np.mean(need / nb[None])), "policies": {}}
    for name, mask in block_masks.items():
        sel = np.repeat(mask, hq // mask.shape[0], axis=0)[:, rows // block, :]  # [Hq, R, n]
        recall = (blk * sel).sum(-1)  # [Hq, R]
        missed = p * ~np.repeat(sel, block, axis=-1)[..., :s]
        total = missed.sum()
        out["policies"][name] = {
            "density": float(np.mean(sel.sum(-1) / nb[None])),
            "recall": float(recall.mean()), "min_head_recall": float(recall.mean(1).min()),
            "miss_on_columns": float((missed * on_cols[:, None]).sum() / total) if total > 0
            else 0.0}
    return out


def main() -> None:
    import jaxprefill as jp
    from jaxprefill.sparse.config import SparseConfig
    from jaxprefill.eval import tasks
    from jaxprefill.eval.probe import capture_qkv

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-32k")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--task", default="niah_single", choices=tasks.TASKS)
    p.add_argument("--depth", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--layers", type=int, nargs="+", help="default: every other layer")
    p.add_argument("--policies", nargs="+", default=["xattention", "proxyattn", "flexprefill"],
                   help="policy names or name:key=value specs (n_last is set to 0)")
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--columns", type=int, default=64)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    policies = {spec: dataclasses.replace(SparseConfig.parse(spec).rules[0].policy, n_last=0)
                for spec in args.policies}
    model, tok = jp.load(args.model, dtype="float32")
    sample = tasks.make_sample(tok, args.task, args.length, args.depth, args.seed, split="dev",
                               haystack="prose")
    ids = np.asarray([tok.encode_prompt(sample.messages, chat=True)], np.int32)
    q_all, k_all, _ = capture_qkv(model, jnp.asarray(ids))
    s = ids.shape[1]
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(np.arange(s // 2, s), min(args.rows, s - s // 2), replace=False))
    layers = args.layers or list(range(0, q_all.shape[0], 2))
    report = {"model": args.model, "tokens": int(s), "task": args.task, "depth": args.depth,
              "rows": len(rows), "columns": args.columns, "layers": {}}
    for layer in layers:
        q, k = q_all[layer], k_all[layer]
        masks = {n: np.asarray(jax.jit(lambda q, k, pol=pol: pol.block_mask(
            q, k, layer=layer))(q, k))[0] for n, pol in policies.items()}
        blocks = {pol.block_size for pol in policies.values()}
        block = blocks.pop() if len(blocks) == 1 else 128
        rep = layer_report(np.asarray(q[0]), np.asarray(k[0]), masks, rows, block, args.columns)
        report["layers"][layer] = rep
        cells = "  ".join(f"{n}: recall {v['recall']:.2f} (min head {v['min_head_recall']:.2f}), "
                          f"miss on columns {v['miss_on_columns']:.2f}"
                          for n, v in rep["policies"].items())
        print(f"layer {layer:2d}: keys 50/90% {rep['keys_50']:.0f}/{rep['keys_90']:.0f}, "
              f"oracle 0.9 density {rep['oracle_90']:.2f}  {cells}", flush=True)
    (args.out / "missed_attention.json").write_text(json.dumps(report, indent=1))
    head = "| layer | keys 50% | keys 90% | oracle 0.9 density | " + " | ".join(
        f"{n} density / recall / min head / miss on columns" for n in policies) + " |"
    lines = [head, "|" + "---|" * (4 + len(policies))]
    for layer, rep in report["layers"].items():
        cells = " | ".join(f"{v['density']:.2f} / {v['recall']:.2f} / {v['min_head_recall']:.2f}"
                           f" / {v['miss_on_columns']:.2f}" for v in rep["policies"].values())
        lines.append(f"| {layer} | {rep['keys_50']:.0f} | {rep['keys_90']:.0f} | "
                     f"{rep['oracle_90']:.2f} | {cells} |")
    (args.out / "missed_attention.md").write_text(
        f"{args.model}, {args.task} dev prompt of {s} tokens (depth {args.depth}), {len(rows)} "
        f"query rows, {args.columns} columns\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
