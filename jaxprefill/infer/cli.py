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
    p.add_argument("--shard", default="0/1", help="INDEX/COUNT: this process's share of lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import jaxprefill as jp
    from jaxprefill.infer import Engine
    from jaxprefill.infer.config import InferConfig
    from jaxprefill.infer.jobs import run_job

    cfg = InferConfig.from_yaml(args.config) if args.config else InferConfig()
    if args.model:
        cfg = dataclasses.replace(cfg, model=args.model)
    try:
        index, count = (int(x) for x in args.shard.split("/"))
        assert 0 <= index < count
    except (ValueError, AssertionError):
        print(f"error: --shard must be INDEX/COUNT with 0 <= INDEX < COUNT, got {args.shard!r}",
              file=sys.stderr)
        return 2
    model, tokenizer = jp.load(cfg.model, dtype=cfg.dtype, attention=cfg.attention)
    summary = run_job(Engine(model, tokenizer, cfg.engine), args.input, args.output,
                      args.errors, shard=(index, count))
    print(summary.table())
    return 0
