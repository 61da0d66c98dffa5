"""`jaxprefill analyze` (attention statistics + pictures) and `jaxprefill eval` (task accuracy).

    jaxprefill analyze --length 4096 --policies flexprefill xattention --layer 12 --out-dir out/
    jaxprefill eval --policies dense flexprefill --lengths 4096 8192 --tasks passkey \
        --depths 5 --seeds 4 --out benchmarks/results/sparse_smollm2.md
Policies are names (paper defaults) or YAML files (configs/sparse/*.yaml); label = file stem.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub) -> None:
    an = sub.add_parser("analyze", help="sparse prefill: density / recall / output error + PNGs")
    _common(an)
    an.add_argument("--length", type=int, default=4096, help="prompt tokens")
    an.add_argument("--rows", type=int, default=64, help="sampled query rows for recall")
    an.add_argument("--layer", type=int, default=12, help="layer drawn in the heatmap")
    an.add_argument("--head", type=int, default=0, help="query head drawn in the heatmap")
    an.add_argument("--out-dir", default=None, help="write heatmap.png, density_recall.png, "
                                                    "stats.md, stats.json here")
    an.set_defaults(func=run_analyze)

    ev = sub.add_parser("eval", help="sparse prefill: synthetic long-context task accuracy")
    _common(ev)
    ev.add_argument("--lengths", type=int, nargs="+", default=[4096])
    ev.add_argument("--tasks", nargs="+", default=["passkey"])
    ev.add_argument("--depths", type=int, default=5, help="needle depths in [0, 1]")
    ev.add_argument("--seeds", type=int, default=4, help="samples per depth")
    ev.add_argument("--max-new-tokens", type=int, default=16)
    ev.add_argument("--out", default=None, help="markdown summary (a .jsonl of every answer "
                                                "is written beside it)")
    ev.set_defaults(func=run_eval)


def _common(p) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--policies", nargs="+", default=["flexprefill"],
                   help="policy names or YAML configs (dense is always the baseline)")


def configs(specs: list[str]) -> dict:
    from jaxprefill.sparse import SparseConfig

    return {Path(s).stem if s.endswith((".yaml", ".yml")) else s: SparseConfig.parse(s)
            for s in specs}


def run_analyze(args: argparse.Namespace) -> int:
    import jax.numpy as jnp
    import numpy as np

    import jaxprefill as jp
    from jaxprefill.eval import plots
    from jaxprefill.eval.probe import capture_qkv
    from jaxprefill.eval.runner import attention_stats, markdown_table, prompt_tokens
    from jaxprefill.sparse.oracle import exact_block_mass
    from jaxprefill.sparse.base import make_geometry

    model, tok = jp.load(args.model)
    tokens = prompt_tokens(tok, args.length)
    cfgs = configs(args.policies)
    rows = attention_stats(model, tokens, cfgs, rows=args.rows, log=lambda m: print(m, file=sys.stderr))
    cols = ["policy", "length", "density", "recall", "min_head_recall", "output_error"]
    table = markdown_table(rows, cols)
    print(table)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "stats.md").write_text(table + "\n")
        (out / "stats.json").write_text(json.dumps(rows))
        q, k, _ = capture_qkv(model, jnp.asarray(tokens))
        ql, kl = q[args.layer], k[args.layer]
        masks = {}
        for name, cfg in cfgs.items():
            policy = cfg.policy_for(args.layer)
            if policy is not None and hasattr(policy, "key_mask"):
                print(f"{name}: no heatmap (pbs selects blocks of permuted keys)", file=sys.stderr)
            elif policy is not None:
                m = np.asarray(policy.block_mask(ql, kl, layer=args.layer))[0]
                masks[name] = m[args.head * m.shape[0] // ql.shape[2]]
        block = next(iter(cfgs.values())).rules[0].policy.block_size
        mass = np.asarray(exact_block_mass(ql, kl, make_geometry(ql, kl, block, None)))[0, args.head]
        plots.mask_heatmaps(str(out / "heatmap.png"), mass, masks,
                            f"{args.model}, {tokens.shape[1]} tokens, layer {args.layer} "
                            f"head {args.head}")
        plots.density_recall(str(out / "density_recall.png"), rows)
        print(f"wrote {out}/heatmap.png, density_recall.png, stats.md", file=sys.stderr)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import numpy as np

    import jaxprefill as jp
    from jaxprefill.eval.runner import markdown_table, summarize_accuracy, task_accuracy

    model, tok = jp.load(args.model)
    cfgs = {"dense": None, **{k: v for k, v in configs(args.policies).items() if k != "dense"}}
    depths = np.linspace(0.0, 1.0, args.depths).round(3).tolist()
    jsonl = Path(args.out).with_suffix(".jsonl") if args.out else None

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    rows = task_accuracy(model, tok, cfgs, args.tasks, args.lengths, depths,
                         range(args.seeds), args.max_new_tokens, log=log, jsonl=jsonl)
    table = markdown_table(summarize_accuracy(rows),
                           ["config", "task", "length", "correct", "samples", "accuracy"])
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0
