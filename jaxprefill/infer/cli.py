"""`jaxprefill infer --config configs/infer/x.yaml --input prompts.jsonl --output out.jsonl`."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser("infer", help="run a resumable batch job over a JSONL file of prompts")
    p.add_argument("--config", help="YAML InferConfig (model, dtype, attention, engine: {...})")
    p.add_argument("--input", required=True, help="JSONL: {'id', 'prompt' | 'messages', ...}")
    p.add_argument("--output", required=True, help="JSONL completions (appended; reruns resume)")
    p.add_argument("--errors", help="JSONL of rejected lines (default: <output>.errors.jsonl)")
    p.add_argument("--model", help="override the config's model")
    p.add_argument("--sparse", help="sparse prefill policy name or YAML (overrides engine.sparse; "
                   "'none' turns it off)")
    p.add_argument("--shard", default="0/1", help="INDEX/COUNT: this process's share of lines")
    p.set_defaults(func=run)
    m = sub.add_parser("infer-merge", help="merge per-host outputs of a sharded job (--shard)")
    m.add_argument("parts", nargs="+", help="per-host output JSONL files")
    m.add_argument("--output", required=True, help="merged JSONL (one line per id)")
    m.add_argument("--input", help="the job's input JSONL: keep its order, count missing ids")
    m.set_defaults(func=merge)


def merge(args: argparse.Namespace) -> int:
    from jaxprefill.infer.jobs import merge_outputs

    counts = merge_outputs(args.parts, args.output, args.input)
    print(f"merged {counts['ids']} ids into {args.output} ({counts['duplicates']} duplicates "
          f"dropped, {counts['missing']} input ids without output)")
    return 1 if counts["missing"] else 0


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import jaxprefill as jp
    from jaxprefill.infer.data_parallel import make_engine
    from jaxprefill.infer.config import InferConfig
    from jaxprefill.infer.jobs import run_job

    cfg = InferConfig.from_yaml(args.config) if args.config else InferConfig()
    if args.model:
        cfg = dataclasses.replace(cfg, model=args.model)
    if args.sparse:
        sparse = None if args.sparse.lower() == "none" else args.sparse
        cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, sparse=sparse))
    try:
        index, count = (int(x) for x in args.shard.split("/"))
        assert 0 <= index < count
    except (ValueError, AssertionError):
        print(f"error: --shard must be INDEX/COUNT with 0 <= INDEX < COUNT, got {args.shard!r}",
              file=sys.stderr)
        return 2
    model, tokenizer = jp.load(cfg.model, dtype=cfg.dtype, attention=cfg.attention)
    summary = run_job(make_engine(model, tokenizer, cfg.engine), args.input, args.output,
                      args.errors, shard=(index, count))
    print(summary.table())
    return 0
