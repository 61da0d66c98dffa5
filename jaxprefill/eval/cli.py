"""`jaxprefill analyze` (attention statistics + pictures) and `jaxprefill eval` (task accuracy).

    jaxprefill analyze --length 4096 --sparse flexprefill xattention --layer 12 --out-dir out/
    jaxprefill eval --model smollm2-135m-instruct --sparse configs/sparse/flexprefill_smollm2.yaml \
        --lengths 4096 8192 --samples 20 --split dev --out-dir eval/dev

Sparse configs: policy names (paper defaults), YAML files (configs/sparse/*.yaml; label = file
stem) or ``name:key=value,...`` (parameters of one policy for every layer; label = the spec).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import signal
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

import jaxprefill as jp
from jaxprefill.eval import haystack as hay
from jaxprefill.eval import plots, report, suite
from jaxprefill.eval.probe import layer_qkv
from jaxprefill.eval.runner import attention_stats, markdown_table, prompt_tokens
from jaxprefill.eval.tasks import TASKS
from jaxprefill.loading.adapter import check_overrides
from jaxprefill.sparse import SparseConfig
from jaxprefill.sparse.config import names_file
from jaxprefill.sparse.base import make_geometry
from jaxprefill.sparse.oracle import exact_block_mass
from jaxprefill.validate import InputError, as_input_error


def register(sub) -> None:
    an = sub.add_parser("analyze", help="sparse prefill: density / recall / output error + PNGs")
    _common(an)
    an.add_argument("--length", type=int, default=4096, help="prompt tokens")
    an.add_argument("--rows", type=int, default=64, help="sampled query rows for recall")
    an.add_argument("--layer", type=int, default=12, help="layer drawn in the heatmap")
    an.add_argument("--head", type=int, default=0, help="query head drawn in the heatmap")
    an.add_argument("--out-dir", default=None, help="write heatmap.png, density_recall.png, "
                                                    "stats.md, stats.json here")
    an.set_defaults(func=run_analyze, sparse=["flexprefill"])

    ev = sub.add_parser(
        "eval", help="long-context accuracy (RULER-style tasks), dense vs sparse prefill",
        description="Answers synthetic long-context tasks greedily with dense prefill and with "
                    "each --sparse config on the same samples; writes answers.jsonl (resumable: "
                    "rerun the same command to continue), report.md (accuracy with Wilson "
                    "intervals, paired differences against dense, density / recall), "
                    "summary.json and accuracy.png to --out-dir.")
    _common(ev)
    ev.add_argument("--adapter", default=None,
                    help="adapter weights passed to jp.load(adapter=...) (needs a jp.load that "
                         "takes one)")
    ev.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, metavar="TASK",
                    help=f"default: all of {' '.join(TASKS)}")
    ev.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192],
                    help="prompt lengths in tokens (chat template included); capped at the "
                         "model's context minus the generated tokens")
    ev.add_argument("--depths", type=float, nargs="+", default=[5],
                    help="needle depths in [0, 1], or one integer n >= 2 for n evenly spaced "
                         "depths from 0 to 1 (default 5)")
    ev.add_argument("--samples", type=int, default=20,
                    help="samples per (task, length), spread over the depths")
    ev.add_argument("--split", choices=hay.SPLITS, default="dev",
                    help="dev: tune defaults here; test: report here (other documents, other "
                         "seeds)")
    ev.add_argument("--haystack", choices=("code", "prose", "mixed"), default="mixed",
                    help="haystack text (qa always uses prose, cwe a word list)")
    ev.add_argument("--max-new-tokens", type=int, default=None,
                    help="tokens generated per answer (default: per task, 32 to 128)")
    ev.add_argument("--batch-size", type=int, default=None,
                    help="rows per prefill call (default: about 64K tokens per batch)")
    ev.add_argument("--stats-prompts", type=int, default=4,
                    help="prompts per length for density / recall (0: skip)")
    ev.add_argument("--stats-rows", type=int, default=32,
                    help="sampled query rows per prompt for recall")
    ev.add_argument("--out-dir", required=True, help="output directory (resumable)")
    ev.set_defaults(func=run_eval, sparse=[])


def _common(p) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="bundled model name, HF directory or .gguf file")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--override", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="model config.json fields changed after loading (jp.load(overrides=...)), "
                        "the value parsed as YAML, e.g. max_position_embeddings=32768 "
                        "'rope_scaling={rope_type: yarn, factor: 4.0}'")
    p.add_argument("--sparse", "--policies", dest="sparse", nargs="+",
                   help="sparse configs: policy names, YAML files or name:key=value,... "
                        "(dense is always the baseline)")


def parse_spec(spec: str):
    """(label, SparseConfig or None for dense) of one --sparse spec (see module docstring)."""
    if spec == "dense":
        return "dense", None
    yaml_file = names_file(spec)
    with as_input_error("--sparse" if yaml_file else f"--sparse {spec}"):  # a file's errors name it
        if yaml_file:
            if not Path(spec).is_file():
                raise FileNotFoundError(2, "no such sparse config file", spec)
            return Path(spec).stem, SparseConfig.parse(spec)
        return spec, SparseConfig.parse(spec)  # a policy name or name:key=value,...


def configs(specs: list[str]) -> dict:
    """--sparse specs -> {label: SparseConfig or None}, dense first; duplicate labels refused."""
    out: dict = {"dense": None}
    for spec in specs or []:
        label, cfg = parse_spec(spec)
        if label in out and label != "dense":
            raise InputError(f"--sparse: two configs are labelled {label!r}")
        out[label] = cfg
    return out


def check_out_dir(path: str | None) -> None:
    """--out-dir: a directory or a path to make one at; a file there fails before the model
    loads, not when the first results are written."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise InputError(f"--out-dir {path} is a file; give a directory")


def depth_list(values: list[float]) -> list[float]:
    """--depths: one integer n >= 2 -> n evenly spaced depths in [0, 1]; else the values."""
    if len(values) == 1 and values[0] >= 2 and float(values[0]).is_integer():
        return np.linspace(0.0, 1.0, int(values[0])).round(3).tolist()
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad:
        raise InputError(f"--depths: depths must lie in [0, 1] (or give one integer n >= 2), "
                         f"got {bad}")
    return sorted(set(values))


def parse_overrides(items: list[str]) -> dict:
    """{key: value} of ``--override KEY=VALUE`` items, each value parsed as YAML; checked (the
    fields jp.load can override, their types) before any model loads."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--override {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise InputError(f"--override {item!r}: the value is not YAML ({e.problem})") from None
    check_overrides(out, "--override")
    return out


def load_model(model: str, dtype: str, adapter: str | None = None,
               overrides: dict | None = None):
    """jp.load(model, dtype=..., overrides=...), passing ``adapter`` when given. jp.load's
    signature decides: a jp.load without an ``adapter`` parameter makes --adapter an error, not
    a silent no-op."""
    kwargs = {"dtype": dtype}
    if overrides:
        kwargs["overrides"] = overrides
    if adapter is not None:
        if "adapter" not in inspect.signature(jp.load).parameters:
            raise InputError("--adapter: this jaxprefill's jp.load() takes no adapter argument")
        kwargs["adapter"] = adapter
    model_, tok = jp.load(model, **kwargs)
    if tok is None:
        raise InputError(f"--model {model} has no tokenizer files; the tasks need one")
    return model_, tok


def run_eval(args: argparse.Namespace) -> int:
    cfgs = configs(args.sparse)  # every check that needs no model first
    for flag, value, least in (("--max-new-tokens", args.max_new_tokens, 1),
                               ("--batch-size", args.batch_size, 1),
                               ("--stats-prompts", args.stats_prompts, 0),
                               ("--stats-rows", args.stats_rows, 1)):
        if value is not None and value < least:
            raise InputError(f"{flag} must be >= {least}, got {value}")
    check_out_dir(args.out_dir)
    plan = suite.EvalPlan(tuple(args.tasks), tuple(args.lengths),
                          tuple(depth_list(args.depths)), args.samples, args.split,
                          args.haystack)
    overrides = parse_overrides(args.overrides)
    model, tok = load_model(args.model, args.dtype, args.adapter, overrides)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    partial = None
    with sigterm_as_interrupt():
        try:
            answers, stats = suite.run(
                model, tok, cfgs, plan, args.out_dir,
                {"model": args.model, "adapter": args.adapter, "overrides": overrides,
                 "dtype": args.dtype},
                batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                stats_prompts=args.stats_prompts, stats_rows=args.stats_rows, log=log)
        except suite.Interrupted as stop:  # a killed or time-limited run still reports
            answers, stats = stop.answers, []
            partial = {"answers": len(stop.answers), "planned": stop.planned}
    meta = {"model": args.model, "adapter": args.adapter, "overrides": overrides,
            "dtype": args.dtype, "max_position_embeddings": model.config.max_position_embeddings,
            "split": plan.split, "tasks": list(plan.tasks), "lengths": list(plan.lengths),
            "depths": list(plan.depths), "samples": plan.samples, "haystack": plan.haystack,
            "configs": list(cfgs), "device": jax.devices()[0].device_kind}
    if partial:
        meta["partial"] = partial
    report.write(args.out_dir, answers, stats, meta)
    print((Path(args.out_dir) / "report.md").read_text())
    if partial:
        log(f"interrupted: wrote a partial report/summary over {partial['answers']} of "
            f"{partial['planned']} answers to {args.out_dir}; rerun the same command to "
            f"continue")
        raise KeyboardInterrupt  # the command line's exit status for an interrupted command
    log(f"wrote {args.out_dir}/report.md, summary.json, accuracy.png, answers.jsonl")
    return 0


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (``timeout``, a batch scheduler's kill) raises KeyboardInterrupt as Ctrl-C does,
    so an eval stopped by a time limit still writes its report. Main thread only (Python's
    signal rule); elsewhere the handler is left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_analyze(args: argparse.Namespace) -> int:
    cfgs = {k: v for k, v in configs(args.sparse).items() if v is not None}
    if not cfgs:
        raise InputError("--sparse: analyze needs at least one sparse config")
    for flag, value in (("--length", args.length), ("--rows", args.rows)):
        if value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    check_out_dir(args.out_dir)
    model, tok = load_model(args.model, args.dtype, overrides=parse_overrides(args.overrides))
    if not 0 <= args.layer < model.config.num_layers:
        raise InputError(f"--layer must be in [0, {model.config.num_layers}), got {args.layer}")
    if not 0 <= args.head < model.config.num_heads:
        raise InputError(f"--head must be in [0, {model.config.num_heads}), got {args.head}")
    tokens = prompt_tokens(tok, args.length)
    rows = attention_stats(model, tokens, cfgs, rows=args.rows,
                           log=lambda m: print(m, file=sys.stderr))
    cols = ["policy", "length", "density", "recall", "min_head_recall", "output_error",
            "last_recall", "min_last_recall"]
    table = markdown_table(rows, cols)
    print(table)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "stats.md").write_text(table + "\n")
        (out / "stats.json").write_text(json.dumps(rows))
        # the layer drawn, and the layers whose layouts it runs (share_layers)
        sources = {name: cfg.layout_source(args.layer) for name, cfg in cfgs.items()}
        qk = {}
        for layer, q, k, _ in layer_qkv(model, jnp.asarray(tokens)):
            if layer == args.layer or layer in sources.values():
                qk[layer] = (q, k)
            if layer == args.layer:
                break
        ql, kl = qk[args.layer]
        masks = {}
        for name, cfg in cfgs.items():
            policy = cfg.policy_for(args.layer)
            if policy is not None and hasattr(policy, "key_mask"):
                print(f"{name}: no heatmap (pbs selects blocks of permuted keys)", file=sys.stderr)
            elif policy is not None:
                m = np.asarray(policy.block_mask(*qk[sources[name]], layer=sources[name]))[0]
                masks[name] = m[args.head * m.shape[0] // ql.shape[2]]
        block = next(iter(cfgs.values())).rules[0].policy.block_size
        geometry = make_geometry(ql, kl, block, None)
        mass = np.asarray(exact_block_mass(ql, kl, geometry))[0, args.head]
        plots.mask_heatmaps(str(out / "heatmap.png"), mass, masks,
                            f"{args.model}, {tokens.shape[1]} tokens, layer {args.layer} "
                            f"head {args.head}")
        plots.density_recall(str(out / "density_recall.png"), rows)
        print(f"wrote {out}/heatmap.png, density_recall.png, stats.md", file=sys.stderr)
    return 0
