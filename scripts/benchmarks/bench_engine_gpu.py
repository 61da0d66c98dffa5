"""Batch engine vs padded static batching on one GPU (docs/performance.md#batch-engine).

  python -m scripts.benchmarks.bench_engine_gpu --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out DIR

SmolLM2 bf16, N prompts with lengths drawn uniformly from [min_len, max_len] (real text tokens),
up to 128 new tokens each (greedy, eos ends a request):
  (a) padded static batching: `jp.generate` on consecutive batches of `batch` prompts;
  (b) the engine: prepacked prefill rows + chunking, paged KV cache, continuous batching.
Both run once on a small warm-up set first (compilation stays out of the timings). Reports total
tokens/s (prompt + generated), generated tokens/s and TTFT mean/p50/p99 (time from the start of
the run to a request's first token), and the speedup of (b) over (a).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

import jaxprefill as jp
from jaxprefill.infer import Engine, EngineConfig, Request

TEXT = ("Long-context prefill is the phase where a language model reads the whole prompt before it "
        "writes the first token. The grass is green, the sky is blue and the sun is yellow. ")


def make_prompts(tokenizer, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    pool = tokenizer.encode(TEXT * (hi // 20 + 10))
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, size=n)
    starts = rng.integers(0, len(pool) - hi, size=n)
    return [pool[s:s + n_] + [] for s, n_ in zip(starts, lengths)]


def run_static(model, tokenizer, prompts, batch: int, max_new: int) -> dict:
    t0 = time.perf_counter()
    ttft, gen, prompt_tok = [], 0, 0
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        outs = jp.generate(model, tokenizer, chunk, max_new_tokens=max_new)
        first = time.perf_counter() - t0 - outs.stats.decode_s  # prefill done
        ttft += [first] * len(chunk)
        gen += sum(len(o.tokens) for o in outs)
        prompt_tok += sum(len(p) for p in chunk)
    wall = time.perf_counter() - t0
    return summarize("static padded batching", wall, prompt_tok, gen, ttft)


def run_engine(engine: Engine, prompts, max_new: int) -> dict:
    t0 = time.perf_counter()
    results = []
    reqs = [Request(id=str(i), prompt=p, max_new_tokens=max_new) for i, p in enumerate(prompts)]
    engine.run(reqs, results.append)
    wall = time.perf_counter() - t0
    ttft = [r.ttft_s + (0.0) for r in results]  # submit happens at t0 for every request
    return summarize("engine (prepack + continuous)", wall, sum(len(p) for p in prompts),
                     sum(len(r.tokens) for r in results), ttft)


def summarize(name, wall, prompt_tok, gen, ttft) -> dict:
    t = np.asarray(ttft)
    return {"method": name, "wall_s": wall, "prompt_tokens": prompt_tok, "generated_tokens": gen,
            "total_tok_s": (prompt_tok + gen) / wall, "generated_tok_s": gen / wall,
            "ttft_mean_s": float(t.mean()), "ttft_p50_s": float(np.percentile(t, 50)),
            "ttft_p99_s": float(np.percentile(t, 99))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gguf", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model, tokenizer = jp.load(args.gguf, dtype="bfloat16")
    prompts = make_prompts(tokenizer, args.n, args.min_len, args.max_len, seed=0)
    warm = make_prompts(tokenizer, args.batch, args.min_len, args.max_len, seed=1)
    pages = args.batch * -(-(args.max_len + args.max_new) // 64) + 64
    engine = Engine(model, tokenizer, EngineConfig(
        max_batch=args.batch, prefill_tokens=args.max_len, prefill_rows=4, page_size=64,
        num_pages=pages, max_new_tokens=args.max_new, bucket=1024, chat=False))

    print("warm-up (compilation) ...", flush=True)
    t = time.perf_counter()
    run_static(model, tokenizer, warm, args.batch, args.max_new)
    run_engine(engine, warm, args.max_new)
    print(f"warm-up took {time.perf_counter() - t:.1f}s", flush=True)

    rows = [run_static(model, tokenizer, prompts, args.batch, args.max_new)]
    print(json.dumps(rows[-1]), flush=True)
    rows.append(run_engine(engine, prompts, args.max_new))
    print(json.dumps(rows[-1]), flush=True)
    speed = rows[1]["total_tok_s"] / rows[0]["total_tok_s"]
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d"), "args": {k: str(v) for k, v in vars(args).items()},
              "rows": rows, "engine_speedup_total_tok_s": speed, "engine_stats": engine.stats}
    (args.out / "bench_engine_gpu.json").write_text(json.dumps(result, indent=2))
    print("\n| method | wall s | total tok/s | generated tok/s | TTFT mean / p50 / p99 s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['wall_s']:.1f} | {r['total_tok_s']:,.0f} | "
              f"{r['generated_tok_s']:,.0f} | {r['ttft_mean_s']:.2f} / {r['ttft_p50_s']:.2f} / "
              f"{r['ttft_p99_s']:.2f} |")
    print(f"\nengine / static, total tokens/s: {speed:.2f}x")


if __name__ == "__main__":
    main()
