"""Where an engine prefill spends its device time: the ops of timed TTFT runs, from a trace.

    python -m scripts.profiling.profile_prefill_ops --model smollm2-135m-32k --seq 32768 \
        --policies dense xattention --out DIR                                    # GPU
    python -m scripts.profiling.profile_prefill_ops --tiny --seq 512 --out DIR   # CPU smoke run

The same engine, prompt and path as `bench_sparse_stages_gpu`'s row path (`--path chunked`
with `--chunk` for the chunked one): per policy, one warm-up request, then `--reps` requests
inside `jax.profiler.trace` (a Perfetto trace). The trace's device ops are summed by name
over the runs and divided by `--reps`:

* per op: ms per run, calls per run, share of the device time; the ops are also put in
  classes by name (attention kernels, GEMMs, scatter / gather, copies, other fusions), so the
  engine's time outside the layers (cache writes, the cache view, sampling) is visible;
* per run: TTFT (the engine's wall clock, as the benchmarks report it), device busy time (the
  sum of op times, overlaps counted once per stream) and the difference, the host's share;
  the op time of each trace line (stream), so a line that repeats others shows.

Device ops are the trace's events on a GPU or TPU device; on a CPU (no device events) the ops
of XLA's CPU client threads stand in for them. Writes profile_prefill_ops.json and .md to
`--out`; the raw trace stays under `--out`/trace unless `--drop-trace`.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxprefill.infer import Engine, Request
from scripts.benchmarks.bench_sparse_stages_gpu import buckets, load, policy_spec
from scripts.benchmarks.bench_sparse_ttft_gpu import engine_config, path_spec
from scripts.common.model_args import add_model_source
from scripts.common.synthetic_weights import add_weights_arg

# (class, pattern on the lower-cased op name); the first match wins
CLASSES = [
    ("attention", r"cudnn|flash|attention|mosaic|block_sparse|sparse|sdpa|fmha|triton"),
    ("gemm", r"gemm|cublas|matmul|dot|sm90_xmma|wgmma|cutlass"),
    ("scatter/gather", r"scatter|gather|dynamic.update.slice|dynamic_update_slice"),
    ("copy", r"copy|memcpy|memset|transpose"),
    ("fusion/other", r"."),
]


def op_class(name: str) -> str:
    low = name.lower()
    return next(c for c, pat in CLASSES if re.search(pat, low))


def trace_events(trace_dir: Path) -> list[dict]:
    files = sorted(trace_dir.glob("**/*perfetto_trace.json.gz"))
    if not files:
        raise SystemExit(f"error: no perfetto_trace.json.gz under {trace_dir}")
    data = json.load(gzip.open(files[-1]))
    return data["traceEvents"] if isinstance(data, dict) else data


# device lines that repeat the ops' time at a coarser grain (TPU traces): left out
SUMMARY_LINES = re.compile(r"XLA Modules|Steps|Framework|Source|TensorFlow")
# the CPU client's wrappers around its ops
CPU_WRAPPERS = re.compile(r"^ThunkExecutor")


def device_ops(events: list[dict]) -> tuple[list[dict], str, dict[str, str]]:
    """The complete events ("ph" X) of device streams, or of XLA's CPU client threads; the
    source; each event's line name by (pid, tid)."""
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    line = {k: f"{procs.get(k[0], '')} {name}".strip() for k, name in threads.items()}
    done = [e for e in events if e.get("ph") == "X" and "dur" in e]
    dev = [e for e in done if re.search(r"/device:(GPU|TPU)", procs.get(e["pid"], ""))
           and not SUMMARY_LINES.search(threads.get((e["pid"], e["tid"]), ""))]
    if dev:
        return dev, "device streams", line
    cpu = [e for e in done if threads.get((e["pid"], e["tid"]), "").startswith("tf_XLA")
           and not CPU_WRAPPERS.match(e["name"])]
    return cpu, "XLA CPU client threads (no device events)", line


def busy_ms(ops: list[dict]) -> float:
    """Time some stream is busy: the union of op intervals per (pid, tid), summed."""
    total = 0.0
    by_stream = collections.defaultdict(list)
    for e in ops:
        by_stream[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e["dur"]))
    for spans in by_stream.values():
        spans.sort()
        end = -np.inf
        for a, b in spans:
            total += max(0.0, b - max(a, end))
            end = max(end, b)
    return total / 1e3


def summarize(ops: list[dict], reps: int, top: int, line: dict) -> dict[str, Any]:
    per_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    per_line: dict[str, float] = collections.Counter()
    for e in ops:
        per_line[line.get((e["pid"], e["tid"]), str(e["tid"]))] += e["dur"] / 1e3 / reps
        name = e["name"]  # the kernel / fusion name: the same op of every layer adds up
        per_op[name][0] += e["dur"] / 1e3
        per_op[name][1] += 1
    total = sum(ms for ms, _ in per_op.values())
    rows = sorted(per_op.items(), key=lambda kv: -kv[1][0])
    classes = collections.Counter()
    for name, (ms, _) in rows:
        classes[op_class(name)] += ms / reps
    return {"op_ms_per_run": total / reps, "busy_ms_per_run": busy_ms(ops) / reps,
            "classes_ms_per_run": dict(classes.most_common()),
            "lines_ms_per_run": dict(per_line.most_common()),
            "top": [{"op": name, "class": op_class(name), "ms_per_run": ms / reps,
                     "calls_per_run": n / reps, "share": ms / total if total else 0.0}
                    for name, (ms, n) in rows[:top]]}


def profile_policy(model, prompt: list[int], spec: Any, args, trace_dir: Path) -> dict:
    bucket = buckets(len(prompt), args.chunk)[args.path]  # the stage benchmark's engine
    width = args.chunk if args.path == "chunked" else bucket
    engine = Engine(model, None, engine_config(width, bucket, path_spec(spec, args.path,
                                                                         "bucket")))

    def run(i: int) -> float:
        out = engine.generate([Request(id=str(i), prompt=prompt, max_new_tokens=1)])
        return out[0].ttft_s * 1e3

    run(0)  # compile and warm up outside the trace
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        ttft = [run(i + 1) for i in range(args.reps)]
    ops, source, line = device_ops(trace_events(trace_dir))
    summary = summarize(ops, args.reps, args.top, line)
    summary.update(ttft_ms=ttft, ttft_median_ms=float(np.median(ttft)), op_source=source,
                   engine_stats=dict(engine.stats))
    summary["host_ms_per_run"] = summary["ttft_median_ms"] - summary["busy_ms_per_run"]
    return summary


def markdown(result: dict) -> str:
    lines = [f"device: {result['device']}, jax {result['jax']}, {result['model']}; "
             f"{result['path']} path, {result['reps']} traced runs per policy", ""]
    for name, r in result["policies"].items():
        lines += [f"## {name}", "",
                  f"TTFT median {r['ttft_median_ms']:.2f} ms (runs "
                  f"{', '.join(f'{t:.1f}' for t in r['ttft_ms'])}); device busy "
                  f"{r['busy_ms_per_run']:.2f} ms a run (ops {r['op_ms_per_run']:.2f} ms); "
                  f"TTFT - busy {r['host_ms_per_run']:.2f} ms. Ops from {r['op_source']}: "
                  + ", ".join(f"{k} {v:.2f} ms" for k, v in r["lines_ms_per_run"].items()), "",
                  "| class | ms a run |", "|---|---|"]
        lines += [f"| {c} | {ms:.3f} |" for c, ms in r["classes_ms_per_run"].items()]
        lines += ["", "| op | class | ms a run | calls a run | share |", "|---|---|---|---|---|"]
        lines += [f"| `{t['op'][:90]}` | {t['class']} | {t['ms_per_run']:.3f} | "
                  f"{t['calls_per_run']:.1f} | {t['share']:.1%} |" for t in r["top"]]
        lines.append("")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_source(p)
    add_weights_arg(p)
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--path", choices=["row", "chunked"], default="row")
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--policies", nargs="+", default=["dense"],
                   help="as bench_sparse_stages_gpu --policies")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--top", type=int, default=25, help="ops listed per policy")
    p.add_argument("--dtype", choices=["bfloat16", "float32"])
    p.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke run)")
    p.add_argument("--drop-trace", action="store_true", help="delete the raw traces")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    for flag in ("seq", "chunk", "reps", "top"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.chunk % 64:
        p.error(f"--chunk must be a multiple of 64 (the engine's page size), got {args.chunk}")
    if args.adapter and not (args.model or args.gguf):
        p.error("--adapter needs --model or --gguf")
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    args.layers = None  # bench_sparse_stages_gpu.load's random model: its default size
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    specs = {name: policy_spec(name, args.tiny) for name in args.policies}  # bad specs first
    t0 = time.perf_counter()
    model, prompt, what = load(args)
    if args.path == "chunked" and len(prompt) <= args.chunk:
        raise SystemExit(f"error: --chunk {args.chunk} >= the prompt's {len(prompt)} tokens: "
                         "the engine prefills it as one row (lower --chunk, or --path row)")
    print(f"{what}: {len(prompt)} prompt tokens, setup {time.perf_counter() - t0:.1f}s; "
          f"{jax.devices()[0].device_kind}", flush=True)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "model": what,
              "path": args.path, "reps": args.reps, "argv": sys.argv[1:], "policies": {}}
    for name, spec in specs.items():
        trace_dir = args.out / "trace" / re.sub(r"[^A-Za-z0-9_.=-]", "_", name)
        shutil.rmtree(trace_dir, ignore_errors=True)
        r = result["policies"][name] = profile_policy(model, prompt, spec, args, trace_dir)
        print(f"{name}: TTFT {r['ttft_median_ms']:.2f} ms, device busy "
              f"{r['busy_ms_per_run']:.2f} ms, " + ", ".join(
                  f"{c} {ms:.2f}" for c, ms in r["classes_ms_per_run"].items()), flush=True)
        (args.out / "profile_prefill_ops.json").write_text(json.dumps(result, indent=1))
    (args.out / "profile_prefill_ops.md").write_text(markdown(result))
    if args.drop_trace:
        shutil.rmtree(args.out / "trace", ignore_errors=True)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
