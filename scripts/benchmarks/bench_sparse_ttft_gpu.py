"""Time to first token of one long prompt through the batch engine: sparse prefill vs dense.

  python -m scripts.benchmarks.bench_sparse_ttft_gpu --layers 2 --seq 32768 --out $OUT
  python -m scripts.benchmarks.bench_sparse_ttft_gpu --model smollm2-135m-32k --seq 32768 \
      --policies dense minference configs/sparse/x.yaml "flexprefill:gamma=0.9" --out $OUT

Default model: Llama-3-8B shapes (hidden 4096, 32 query / 8 KV heads of 128, MLP 14336, vocab
128256) with random bf16 weights and `--layers` decoder layers (a few: compile time; report
TTFT per layer too), on a prompt of `--seq` random tokens; `--weights local` gives that model
local attention by construction (scripts/common/synthetic_weights.py: plain random weights
leave the data-dependent policies nothing to skip). `--model` (a `jp.load` source,
`--adapter` too) times a real model instead, all its layers, in bf16, on a real prompt: the
eval's test-split NIAH prompt of up to `--seq` tokens over prose. One request,
max_new_tokens=1, so TTFT is the whole prefill plus the first token's sampling. Two engine
prefill paths:
  * chunked: `--chunk`-token chunks (SARATHI) against the cached prefix (q_offset); the cache
    view is one bucket of `--seq` tokens, so each configuration compiles once, and sparse
    policies estimate over bucketed key extents (`--extent`, default bucket: the setting for
    such an engine; `full` scans the whole view in every chunk);
  * row: the prompt alone in one prefill row of `--seq` tokens (the prepacked path).
Per path: dense (the anchor, the engine's own dense path: the block-sparse kernel over the
causal structure on chunks, the mask-free prompt kernel on a row holding one prompt) and each
sparse policy (`--policies`: the names below with this benchmark's parameters, or any
`jaxprefill eval --sparse` spec: policy name, YAML file, name:key=value,...), in one process.
TTFT: median of `--reps` runs after a warm-up run (compilation excluded). Ratios are sparse /
dense TTFT. `--stats` adds, per sparse policy, the density of its whole-prompt layouts (the
row path's) on the same prompt (listed causal blocks, mean over layers and heads) and the attention recall of sampled query
rows (`jaxprefill.eval.runner.attention_stats`), so a ratio can be read against the work kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxprefill as jp
from jaxprefill.infer import Engine, EngineConfig, Request
from jaxprefill.sparse import SparseConfig
from scripts.common.synthetic_weights import add_weights_arg, random_llama

POLICIES = {
    "dense": None,
    "streaming": {"policy": "streaming", "min_length": 1024,
                  "params": {"sink": 1024, "local": 4096, "block_size": 128}},
    "minference": {"policy": "minference", "min_length": 1024, "params": {}},  # VS(1000, 6096)
    "flexprefill": {"policy": "flexprefill", "min_length": 1024,
                    "params": {"gamma": 0.95, "tau": 0.1}},
    "xattention": {"policy": "xattention", "min_length": 1024, "params": {}},  # stride 16, 0.9
}


def policy_config(name: str) -> Any:
    """This benchmark's parameters for the names in POLICIES; otherwise a `jaxprefill eval
    --sparse` spec (policy name with paper defaults, YAML file, name:key=value,...)."""
    if name in POLICIES:
        return POLICIES[name]
    from jaxprefill.eval.cli import parse_spec
    return parse_spec(name)[1]


def llama3_8b_shapes(layers: int, tiny: bool) -> jp.ModelConfig:
    if tiny:  # CPU smoke test of the script itself
        return jp.ModelConfig(model_type="llama", vocab_size=512, hidden_size=64,
                              intermediate_size=128, num_layers=layers, num_heads=4,
                              num_kv_heads=2, head_dim=16, max_position_embeddings=8192)
    return jp.ModelConfig(model_type="llama", vocab_size=128256, hidden_size=4096,
                          intermediate_size=14336, num_layers=layers, num_heads=32,
                          num_kv_heads=8, head_dim=128, max_position_embeddings=131072,
                          rms_norm_eps=1e-5)


def engine_config(width: int, bucket: int, sparse: Any) -> EngineConfig:
    """The engine of these benchmarks: one request of up to ``bucket`` tokens, one new token;
    prefill rows of ``width`` tokens (the chunk, or the whole prompt for the row path); cache
    views rounded up to ``bucket`` tokens, so each configuration compiles once."""
    pages = -(-(bucket + 64) // 64) + 2
    return EngineConfig(max_batch=1, prefill_tokens=width, prefill_rows=1, page_size=64,
                        num_pages=pages, max_seq_len=bucket + 64, max_new_tokens=1,
                        bucket=bucket, chat=False, sparse=sparse)


def path_spec(spec: Any, path: str, extent: str) -> Any:
    """The chunked path's cache view is one bucket of the whole prompt: its sparse policies
    estimate over ``extent`` (Estimation.extent; "bucket": each chunk up to its end)."""
    if spec is None or path != "chunked":
        return spec
    return SparseConfig.parse(spec).with_estimation(extent=extent)


def policy_stats(model, prompt: list[int], policies: dict[str, Any]) -> list[dict]:
    """Density and recall of each sparse policy on the prompt (mean over layers and heads)."""
    from jaxprefill.eval.runner import attention_stats
    configs = {name: SparseConfig.parse(cfg) for name, cfg in policies.items() if cfg is not None}
    rows = attention_stats(model, np.asarray([prompt], np.int32), configs, rows=64)
    return [{k: r[k] for k in ("policy", "length", "density", "recall", "min_head_recall",
                               "output_error", "last_recall", "min_last_recall")} for r in rows]


def ttft(engine: Engine, prompt: list[int], reps: int) -> tuple[float, list[float]]:
    """Median TTFT (s) over reps, after one warm-up run."""
    times = []
    for i in range(reps + 1):
        out = engine.generate([Request(id=str(i), prompt=prompt, max_new_tokens=1)])
        if i:
            times.append(out[0].ttft_s)
    return statistics.median(times), times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--paths", nargs="+", default=["chunked", "row"])
    p.add_argument("--policies", nargs="+", default=list(POLICIES))
    p.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke test)")
    add_weights_arg(p)
    p.add_argument("--model", help="a jp.load source (bundled name, directory, .gguf) instead "
                   "of random Llama-3-8B shapes; --layers is then ignored")
    p.add_argument("--adapter", help="with --model: an adapter applied while loading")
    p.add_argument("--extent", choices=["bucket", "full"], default="bucket",
                   help="chunked path: Estimation.extent of every sparse policy")
    p.add_argument("--stats", action="store_true", help="density and attention recall of each "
                   "sparse policy on the prompt (one dense forward per policy, after the timings)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    policies = {name: policy_config(name) for name in args.policies}  # bad specs fail first
    t0 = time.perf_counter()
    if args.model:
        model, tok = jp.load(args.model, adapter=args.adapter, dtype=dtype)
        cfg = model.config
        # a real prompt (data-dependent policies see real structure): the eval's test-split
        # NIAH prompt of --seq tokens over the prose haystack, needle at mid depth
        from jaxprefill.eval.tasks import make_sample
        sample = make_sample(tok, "niah_single", args.seq, 0.5, seed=0, split="test",
                             haystack="prose")
        prompt = tok.encode_prompt(sample.messages, chat=True)
        args.layers = cfg.num_layers
        what = f"{args.model}{' + ' + args.adapter if args.adapter else ''} (real weights, bf16)"
    else:
        cfg = llama3_8b_shapes(args.layers, args.tiny)
        model, weights = random_llama(cfg, dtype, args.weights)
        what = f"{args.layers} layers of Llama-3-8B shapes ({weights}, bf16)"
        prompt = np.random.default_rng(0).integers(1, cfg.vocab_size, args.seq).tolist()
    print(f"prompt {len(prompt)} tokens; model init {time.perf_counter() - t0:.1f}s; "
          f"{jax.devices()[0].device_kind}", flush=True)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d"), "args": {k: str(v) for k, v in vars(args).items()},
              "rows": []}
    for path in args.paths:
        width = args.chunk if path == "chunked" else args.seq
        dense_s = None
        for name in args.policies:
            sparse = path_spec(policies[name], path, args.extent)
            engine = Engine(model, None, engine_config(width, args.seq, sparse))
            t = time.perf_counter()
            med, times = ttft(engine, prompt, args.reps)
            row = {"path": path, "policy": name, "ttft_s": med, "ttft_per_layer_ms":
                   med / args.layers * 1e3, "times_s": times,
                   "wall_incl_compile_s": time.perf_counter() - t, "stats": dict(engine.stats)}
            if name == "dense":
                dense_s = med
            row["ratio_vs_dense"] = med / dense_s if dense_s else None
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            (args.out / "bench_sparse_ttft_gpu.json").write_text(json.dumps(result, indent=2))
            del engine
    if args.stats:
        result["stats"] = policy_stats(model, prompt, policies)
        (args.out / "bench_sparse_ttft_gpu.json").write_text(json.dumps(result, indent=2))
    stats = {r["policy"]: r for r in result.get("stats", [])}
    lines = [f"device: {result['device']}, jax {result['jax']}, {what}, prompt {len(prompt)} "
             "tokens",
             "", "| path | policy | TTFT ms | per layer ms | sparse / dense | density | recall |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = "anchor" if r["policy"] == "dense" else (
            f"{r['ratio_vs_dense']:.2f}" if r["ratio_vs_dense"] else "-")
        st = stats.get(r["policy"]) if r["path"] == "row" else None  # whole-prompt layouts
        dens, rec = (f"{st['density']:.3f}", f"{st['recall']:.4f}") if st else ("-", "-")
        lines.append(f"| {r['path']} | {r['policy']} | {r['ttft_s'] * 1e3:.1f} | "
                     f"{r['ttft_per_layer_ms']:.1f} | {ratio} | {dens} | {rec} |")
    (args.out / "bench_sparse_ttft_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
