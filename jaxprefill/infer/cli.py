"""`jaxprefill infer --config configs/infer/x.yaml --input prompts.jsonl --output out.jsonl`.

Exit status of `infer`: 0 when the job ran to the end (rejected lines are in the errors file), 2
for an ordinary mistake (missing input, output in use by another job, bad --shard: one
`error: ...` line, checked before the model loads), 128 + signal number when SIGTERM (143) or
SIGINT (130) stopped it (the summary says how to resume). `infer-merge`: 0, or 1 while some
input id has no output yet, 2 for a missing file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Callable

from jaxprefill.infer.job_files import JobError
from jaxprefill.infer.job_lock import OutputLock
from jaxprefill.infer.jobs import (JobEngine, JobInterrupted, check_input, check_output,
                                   default_errors_path, merge_outputs, run_job)


def register(sub) -> None:
    p = sub.add_parser("infer", help="run a resumable batch job over a JSONL file of prompts")
    p.add_argument("--config", help="YAML InferConfig (model, dtype, attention, engine: {...}, "
                   "dsa: {...})")
    p.add_argument("--input", required=True, help="JSONL: {'id', 'prompt' | 'messages', ...}")
    p.add_argument("--output", required=True, help="JSONL completions (appended; reruns resume)")
    p.add_argument("--errors", help="JSONL of rejected lines (default: <output>.errors.jsonl)")
    p.add_argument("--model", help="override the config's model")
    p.add_argument("--sparse", help="sparse prefill policy name, name:key=value,... or YAML "
                   "(overrides engine.sparse; 'none' turns it off)")
    p.add_argument("--shard", default="0/1", help="INDEX/COUNT: this process's share of lines")
    p.set_defaults(func=run)
    m = sub.add_parser("infer-merge", help="merge per-host outputs of a sharded job (--shard)")
    m.add_argument("parts", nargs="+", help="per-host output JSONL files")
    m.add_argument("--output", required=True, help="merged JSONL (one line per id)")
    m.add_argument("--input", help="the job's input JSONL: keep its order, count missing ids")
    m.set_defaults(func=merge)


def merge(args: argparse.Namespace) -> int:
    try:
        counts = merge_outputs(args.parts, args.output, args.input)
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    damaged = f", {counts['damaged']} damaged lines skipped" if counts["damaged"] else ""
    print(f"merged {counts['ids']} ids into {args.output} ({counts['duplicates']} duplicates "
          f"dropped{damaged}, {counts['missing']} input ids without output)")
    return 1 if counts["missing"] else 0


def parse_shard(text: str) -> tuple[int, int]:
    """`"i/n"` -> (i, n) with 0 <= i < n; JobError otherwise."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise JobError(f"--shard must be INDEX/COUNT with 0 <= INDEX < COUNT, got {text!r}")
    return index, count


def load_engine(args: argparse.Namespace) -> JobEngine:
    """The engine the job's config asks for (loads the model: seconds to minutes)."""
    import jaxprefill as jp  # heavy: only once the arguments and files are known to be fine
    from jaxprefill.infer.config import InferConfig
    from jaxprefill.infer.data_parallel import make_engine

    cfg = InferConfig.from_yaml(args.config) if args.config else InferConfig()
    if args.model:
        cfg = dataclasses.replace(cfg, model=args.model)
    if args.sparse:
        sparse = None if args.sparse.lower() == "none" else args.sparse
        cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, sparse=sparse))
    model, tokenizer = jp.load(cfg.model, dtype=cfg.dtype, attention=cfg.attention,
                               dsa=None if cfg.dsa is None else dict(cfg.dsa))
    return make_engine(model, tokenizer, cfg.engine)


def run(args: argparse.Namespace,
        make_engine: Callable[[argparse.Namespace], JobEngine] = load_engine) -> int:
    """`jaxprefill infer`: check the files, lock the output, load the engine, run the job.
    make_engine: builds the engine once the output is locked (tests pass a small fake)."""
    try:
        shard = parse_shard(args.shard)
        if args.config and not Path(args.config).is_file():
            raise JobError(f"config file {args.config} does not exist")
        check_input(args.input)
        out = check_output(args.output, "output", args.input)
        check_output(args.errors or default_errors_path(out), "errors file", args.input)
        with OutputLock(out) as lock:  # before the model loads: a second job stops at once
            summary = run_job(make_engine(args), args.input, out, args.errors, shard=shard,
                              lock=lock)
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JobInterrupted as e:
        print(e.summary.table(), flush=True)  # it ends with the resume hint
        return 128 + e.signum
    print(summary.table())
    return 0
