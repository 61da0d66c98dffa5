"""Training throughput and MFU of the `llama-1b-bench` recipe, against a matmul peak measured in
the same run.

    python -m scripts.benchmarks.bench_train_gpu          # on a GPU: all variants
    python -m scripts.benchmarks.bench_train_gpu --variants unpacked --steps 10
    python -m scripts.benchmarks.bench_train_gpu --smoke  # CPU: tiny shapes, checks the plumbing

For each variant it builds the real `Trainer` (synthetic tokens, no grain, no checkpoints), runs
one compile step, then times `--steps` steps one by one (``scripts.common.timing.time_ms``, one
step per sample, blocked on its metrics; the sync costs microseconds against a step of hundreds
of ms) and reports the median. The steps' batches are drawn before the timed steps.

MFU = tokens/s * model FLOPs per token / peak, where FLOPs per token = 3 x forward (6N for the
matmuls incl. the output layer + causal attention), remat recomputation not counted. The peak is
a bf16 8192^3 matmul measured here (median of 20), and also the datasheet value for comparison.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxprefill.train import TrainConfig, Trainer
from jaxprefill.train import mfu as mfu_lib
from scripts.common.timing import time_ms

RECIPE = str(Path(__file__).resolve().parents[2] / "configs" / "train" / "llama-1b-bench.yaml")

# name -> overrides of the recipe
VARIANTS = {
    "unpacked": ["model.attention=cudnn"],                                # causal rows, cuDNN
    "packed": ["model.attention=cudnn", "data.synthetic_docs=true"],      # + segment-id mask
    "b2": ["model.attention=cudnn", "batch_size=2"],                      # in case b4 runs out of memory
    "accum2": ["model.attention=cudnn", "batch_size=8", "optim.grad_accum=2"],  # optimizer amortized
    "remat-dots": ["model.attention=cudnn", "model.remat=dots"],
    # the smollm2-longctx recipe's shapes (random init, synthetic packed rows: no GGUF, no grain)
    "smollm2-32k": ["model.fields={}", "model.config=smollm2-135m", "data.seq_len=32768",
                    "model.overrides={max_position_embeddings: 32768, rope: {type: yarn, factor: 4.0, "
                    "original_max_position_embeddings: 8192}}", "batch_size=4", "optim.grad_accum=4",
                    "model.remat=full", "model.attention=cudnn", "data.synthetic_docs=true"],
}
SMOKE = ["model.fields={model_type: llama, vocab_size: 512, hidden_size: 64, intermediate_size: 128, "
         "num_layers: 2, num_heads: 4, num_kv_heads: 2, head_dim: 16, max_position_embeddings: 256}",
         "data.seq_len=128", "model.dtype=float32", "model.attention=xla"]


def matmul_peak(n: int = 8192, reps: int = 20) -> float:
    """Median bf16 n^3 matmul FLOP/s on random data (never zeros: they run faster)."""
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    ms = time_ms(f, a, b, warmup=3, reps=reps).ms
    return 2 * n ** 3 / (ms / 1e3)


def bench(name: str, overrides: list[str], steps: int, out_dir: str, peak: float | None,
          datasheet: float | None) -> dict:
    cfg = TrainConfig.load(RECIPE, [f"output_dir={out_dir}/{name}", "log.progress=false",
                                    f"steps={steps + 1}", *overrides])
    t0 = time.perf_counter()
    trainer = Trainer(cfg, log_fn=lambda m: None)
    state = trainer.state
    state, metrics = trainer.step_fn(state, trainer._next_batch())
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    batches = iter([trainer._next_batch() for _ in range(steps)])  # host work stays untimed
    losses = []

    def step():
        nonlocal state, metrics
        state, metrics = trainer.step_fn(state, next(batches))
        losses.append(metrics["loss"])
        return metrics

    timing = time_ms(step, warmup=0, reps=steps)
    losses = [float(x) for x in losses]
    trainer.state = state
    step_s = timing.ms / 1e3
    times = [x / 1e3 for x in timing.samples_ms]
    tokens = cfg.batch_size * cfg.data.seq_len
    tok_s = tokens / step_s
    fpt = mfu_lib.flops_per_token(trainer.model.config, cfg.data.seq_len)
    n = jax.device_count()
    mem = jax.devices()[0].memory_stats() or {}
    mcfg = trainer.model.config
    trainer.close()
    del trainer, state, metrics, batches
    gc.collect()  # free this variant's buffers before the next one compiles
    return {
        "variant": name, "overrides": overrides, "batch": cfg.batch_size, "seq": cfg.data.seq_len,
        "grad_accum": cfg.optim.grad_accum, "remat": cfg.model.remat, "attention": cfg.model.attention,
        "step_s_median": step_s, "step_s_min": min(times), "step_s_max": max(times),
        "tokens_per_s": tok_s, "flops_per_token": fpt,
        "mfu_measured_peak": tok_s * fpt / (n * peak) if peak else None,
        "mfu_datasheet": tok_s * fpt / (n * datasheet) if datasheet else None,
        "model_tflops_per_s": tok_s * fpt / n / 1e12, "compile_and_first_step_s": compile_s,
        "loss_first": losses[0], "loss_last": losses[-1],
        "peak_mem_gib": mem.get("peak_bytes_in_use", 0) / 2 ** 30,
        "matmul_params": mfu_lib.matmul_params(mcfg),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="unpacked,packed,accum2",
                   help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=os.environ.get("OUT", "runs/bench-train"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check of the script)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = jax.devices()[0]
    info = {"jax": jax.__version__, "device": dev.device_kind, "n_devices": jax.device_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(json.dumps(info), flush=True)
    peak = matmul_peak(1024 if args.smoke else 8192)
    datasheet = mfu_lib.peak_flops(dev)
    info.update(matmul_peak_tflops=peak / 1e12, datasheet_tflops=(datasheet or 0) / 1e12)
    print(f"bf16 matmul peak (measured): {peak / 1e12:.0f} TFLOP/s; datasheet: "
          f"{(datasheet or 0) / 1e12:.0f}", flush=True)
    results = []
    names = args.variants.split(",")
    for name in names:
        overrides = VARIANTS[name] + (SMOKE if args.smoke else [])
        try:
            r = bench(name, overrides, args.steps, args.out, peak, datasheet)
        except Exception as e:  # keep going: one failing variant must not lose the others
            traceback.print_exc()
            r = {"variant": name, "error": f"{type(e).__name__}: {str(e)[:500]}"}
            if "RESOURCE_EXHAUSTED" in str(e) and "b2" not in names:
                names.append("b2")  # out of memory at batch 4: measure batch 2 instead
        results.append(r)
        print(json.dumps(r), flush=True)
        with open(os.path.join(args.out, "bench_train.json"), "w") as f:
            json.dump({"info": info, "results": results}, f, indent=2)
    print("\n| variant | batch x seq | accum | remat | step (ms) | tokens/s | model TFLOP/s | "
          "MFU (measured peak) | MFU (datasheet) | peak mem GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | error: {r['error'][:80]} |")
            continue
        mm = r["mfu_measured_peak"]
        ds = r["mfu_datasheet"]
        print(f"| {r['variant']} | {r['batch']}x{r['seq']} | {r['grad_accum']} | {r['remat']} | "
              f"{r['step_s_median'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | {r['model_tflops_per_s']:.0f} | "
              f"{'-' if mm is None else f'{100 * mm:.1f}%'} | {'-' if ds is None else f'{100 * ds:.1f}%'} | "
              f"{r['peak_mem_gib']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
