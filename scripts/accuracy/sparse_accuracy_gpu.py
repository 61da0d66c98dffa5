"""Sparse prefill accuracy protocol on a real model: every policy vs dense, one run.
(Protocol and results: docs/performance.md#sparse-prefill-accuracy.)

For SmolLM2-135M-Instruct (real weights) at 4K and 8K tokens:
  * task accuracy: passkey and NIAH single-key (``jaxprefill/eval/tasks.py``), ``--depths``
    needle depths x ``--seeds`` seeds per (task, length), greedy answers, prefill through each
    config's sparse policy (decode dense), dense in the same run;
  * mean density (listed / causal blocks) and mean attention recall (dense mass kept, exact on
    sampled query rows), over all layers and heads, on the first seed's prompts of every
    (task, length, depth), from the dense forward's q/k/v.
All prompts of both lengths go into fixed-shape batches padded to one length: rows carry their
own lengths, policies read only a row's valid tokens (a row's layout equals its layout alone,
tested in tests/test_sparse_policies.py), so each config's prefill compiles once.

    python -m scripts.accuracy.sparse_accuracy_gpu \
        --model /root/smol/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out $OUT [--policies dense streaming ... configs/sparse/x.yaml]

Writes $OUT/sparse_accuracy.json (every answer, per-row stats) and $OUT/sparse_accuracy.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


DEFAULT_POLICIES = ["dense", "streaming", "minference", "configs/sparse/minference_smollm2.yaml",
                    "flexprefill", "xattention", "proxyattn", "trianglemix", "oracle_topk"]


def config_for(spec: str):
    """(label, SparseConfig or None for dense). ``spec``: policy name, YAML path, or
    ``name:key=value,key=value`` (numbers parsed)."""
    from jaxprefill.sparse import SparseConfig

    if spec == "dense":
        return "dense", None
    if spec.endswith((".yaml", ".yml")):
        return Path(spec).stem, SparseConfig.parse(spec)
    name, _, params = spec.partition(":")
    kv = {}
    for item in filter(None, params.split(",")):
        key, _, val = item.partition("=")
        if val.lower() in ("true", "false"):
            kv[key] = val.lower() == "true"
            continue
        try:
            kv[key] = int(val)
        except ValueError:
            try:
                kv[key] = float(val)
            except ValueError:
                kv[key] = val
    return spec, SparseConfig.from_dict({"policy": name, "params": kv})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192],
                    help="target prompt tokens; capped at context - max_new_tokens")
    ap.add_argument("--tasks", nargs="+", default=["passkey", "niah_single"])
    ap.add_argument("--depths", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES)
    ap.add_argument("--batch", type=int, default=40, help="rows per prefill call")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--stats-rows", type=int, default=48, help="sampled query rows for recall")
    ap.add_argument("--no-stats", action="store_true")
    ap.add_argument("--prompts", default=None, help="JSON of tokenized prompts: read if it "
                    "exists, else written (tokenizing 80 long prompts takes ~1.5 min)")
    ap.add_argument("--prompts-only", action="store_true", help="write --prompts and exit")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    import jaxprefill as jp
    from jaxprefill.eval.probe import capture_qkv
    from jaxprefill.eval.runner import greedy_answers, row_attention_stats
    from jaxprefill.eval.tasks import Sample, make_sample

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t_start:6.1f}s] {m}", flush=True)  # noqa: E731
    log(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    model, tok = jp.load(args.model, dtype=args.dtype)
    ctx = model.config.max_position_embeddings
    configs = dict(config_for(s) for s in args.policies)
    if "dense" not in configs:
        configs = {"dense": None, **configs}

    depths = np.linspace(0.0, 1.0, args.depths).round(3).tolist()
    samples = []
    if args.prompts and Path(args.prompts).exists():  # tokenized on another machine
        for r in json.loads(Path(args.prompts).read_text()):
            s = Sample(r["task"], [], r["answers"], r["target"], r["depth"], r["seed"])
            samples.append((r["length"], s, r["ids"]))
        log(f"read {len(samples)} prompts from {args.prompts}")
    else:
        for length in args.lengths:
            target = min(length, ctx - args.max_new_tokens)
            for task in args.tasks:
                for depth in depths:
                    for seed in range(args.seeds):
                        s = make_sample(tok, task, target, depth, seed)
                        ids = tok.encode_prompt(s.messages, chat=True)
                        samples.append((length, s, ids))
        if args.prompts:
            Path(args.prompts).write_text(json.dumps([
                {"length": L, "task": s.task, "answers": s.answers, "target": s.length,
                 "depth": s.depth, "seed": s.seed, "ids": ids} for L, s, ids in samples]))
            log(f"wrote {len(samples)} prompts to {args.prompts}")
            if args.prompts_only:
                return 0
    lens = np.array([len(ids) for _, _, ids in samples], np.int32)
    pad = int(-(-lens.max() // 128) * 128)  # multiple of every policy's block size
    tokens = np.zeros((len(samples), pad), np.int32)
    for i, (_, _, ids) in enumerate(samples):
        tokens[i, :len(ids)] = ids
    log(f"{len(samples)} prompts, tokens {lens.min()}..{lens.max()}, padded to {pad}")

    # ---------------------------------------------------------------- accuracy
    nb = -(-len(samples) // args.batch)
    answers: dict[str, list[str]] = {}
    timing: dict[str, float] = {}
    for label, cfg in configs.items():
        texts, first_s = [], None
        for c in range(nb):
            sel = np.arange(c * args.batch, (c + 1) * args.batch) % len(samples)  # fixed shape
            t, sec = greedy_answers(model, tok, tokens[sel], lens[sel], cfg, args.max_new_tokens)
            first_s = sec if first_s is None else first_s
            texts += t
        answers[label] = texts[:len(samples)]
        timing[label] = first_s
        got = sum(s.score(t) for (_, s, _), t in zip(samples, answers[label]))
        log(f"  {label:>24s}: {int(got)}/{len(samples)} correct (first prefill call incl. "
            f"compile {first_s:.1f}s)")

    # ---------------------------------------------------------------- density / recall
    stats = {}
    stat_rows = [i for i, (_, s, _) in enumerate(samples) if s.seed == 0]
    if not args.no_stats:
        q_all, k_all, v_all = capture_qkv(model, jnp.asarray(tokens[stat_rows]))
        stats = row_attention_stats(q_all, k_all, v_all, lens[stat_rows],
                                    {k: v for k, v in configs.items() if v is not None},
                                    rows=args.stats_rows, log=log)
        del q_all, k_all, v_all

    # ---------------------------------------------------------------- report
    records, table = [], []
    for label in configs:
        for i, (length, s, ids) in enumerate(samples):
            records.append({"config": label, "length": length, "tokens": len(ids), "task": s.task,
                            "depth": s.depth, "seed": s.seed, "answers": s.answers,
                            "text": answers[label][i], "score": s.score(answers[label][i])})
    summary = []
    for label in configs:
        row = {"config": label, "first_prefill_s": timing[label]}
        for length in args.lengths:
            for task in args.tasks:
                sc = [r["score"] for r in records if r["config"] == label and
                      r["length"] == length and r["task"] == task]
                dn = [r["score"] for r in records if r["config"] == "dense" and
                      r["length"] == length and r["task"] == task]
                row[f"{task}@{length}"] = f"{int(sum(sc))}/{len(sc)}"
                row[f"ok_{task}@{length}"] = sum(sc) >= sum(dn) - 1
            idx = [j for j, i in enumerate(stat_rows) if samples[i][0] == length]
            st = stats.get(label)
            row[f"density@{length}"] = 1.0 if st is None else float(st["density"][idx].mean())
            row[f"recall@{length}"] = 1.0 if st is None else float(st["recall"][idx].mean())
            row[f"min_head_recall@{length}"] = (1.0 if st is None else
                                                float(st["min_head_recall"][idx].min()))
        row["within_1_of_dense"] = all(v for k, v in row.items() if k.startswith("ok_"))
        summary.append(row)

    cols = ["config"]
    for length in args.lengths:
        cols += [f"density@{length}", f"recall@{length}"] + [f"{t}@{length}" for t in args.tasks]
    cols += ["within_1_of_dense"]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    md = [f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, model {args.model} "
          f"({args.dtype}); {len(samples)} prompts ({args.seeds} seeds x {len(depths)} depths "
          f"per task and length); density/recall over {len(stat_rows)} prompts x all layers and "
          f"heads, {args.stats_rows} sampled query rows each", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in summary]
    text = "\n".join(md)
    print(text)
    (out / "sparse_accuracy.md").write_text(text + "\n")
    (out / "sparse_accuracy.json").write_text(json.dumps(
        {"args": vars(args), "summary": summary, "records": records,
         "stats_rows": [{"length": samples[i][0], "task": samples[i][1].task,
                         "depth": samples[i][1].depth} for i in stat_rows],
         "stats": {k: {m: v.tolist() for m, v in d.items()} for k, d in stats.items()}},
        indent=1))
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
