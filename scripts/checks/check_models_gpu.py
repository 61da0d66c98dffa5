"""GPU check for the Llama-family model path (docs/performance.md#model-prefill-smollm2-135m).

1. On the CPU:  python -m scripts.checks.check_models_gpu reference --out .carry/smol_ref.npz
   float32 logits of the bundled SmolLM2 on a fixed 512-token prompt (last 16 positions).
2. On the GPU:  python -m scripts.checks.check_models_gpu check \
                    --gguf /root/smol/SmolLM2-135M-Instruct.Q4_1.gguf \
                    --reference .carry/smol_ref.npz --out $OUT
   * logits of the same prompt in bf16 vs the CPU float32 reference (bf16 tolerance);
   * prefill throughput: batch 8 x 4096 tokens, bf16, KV cache written, for each attention
     backend (cuDNN via jax.nn.dot_product_attention, XLA), median ms of 10 calls after 2
     warm-ups (``scripts.common.timing.time_ms``).
Writes a JSON and a markdown table to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxprefill as jp
from jaxprefill.models import KVCache
from scripts.common.timing import time_ms

PROMPT = ("Long-context prefill is the phase where a language model reads the whole prompt before "
          "it writes the first token; its cost grows with the square of the prompt length. ")


def prompt_ids(tokenizer, n: int = 512) -> np.ndarray:
    ids = tokenizer.encode(PROMPT * 40)[:n]
    assert len(ids) == n
    return np.asarray([ids], np.int32)


def make_reference(out: Path) -> None:
    model, tokenizer = jp.load("smollm2-135m-instruct", dtype="float32")
    ids = prompt_ids(tokenizer)
    logits = np.asarray(model(ids))[0, -16:]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, ids=ids, logits=logits)
    print(f"wrote {out}: logits {logits.shape}")


def check(gguf: str, reference: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ref = np.load(reference)
    result: dict = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                    "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}

    model, tokenizer = jp.load(gguf, dtype="bfloat16")
    ids = prompt_ids(tokenizer)
    assert (ids == ref["ids"]).all(), "tokenizer differs between CPU and GPU"
    logits = np.asarray(jax.jit(lambda m, t: m(t))(model, jnp.asarray(ids)))[0, -16:]
    want = ref["logits"]
    rel = float(np.linalg.norm(logits - want) / np.linalg.norm(want))
    top1 = float((logits.argmax(-1) == want.argmax(-1)).mean())
    result["logits_vs_cpu_f32"] = {"rel_l2": rel, "max_abs": float(np.abs(logits - want).max()),
                                   "top1_agreement": top1}
    print(f"bf16 GPU vs f32 CPU logits: rel L2 {rel:.2e}, top-1 agreement {top1:.3f}")

    batch, seq = 8, 4096
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size,
                                                           (batch, seq)), jnp.int32)
    rows = []
    for impl in ("auto", "cudnn", "xla"):
        m, _ = jp.load(gguf, dtype="bfloat16", attention=impl)
        graphdef, state = nnx.split(m)

        @jax.jit
        def prefill(state, tokens):
            mm = nnx.merge(graphdef, state)
            cache = KVCache.zeros(mm.config, tokens.shape[0], tokens.shape[1], mm.dtype)
            hidden, cache = mm.forward(tokens, cache=cache)
            return mm.logits(hidden[:, -1]), cache

        try:
            ms = time_ms(prefill, state, tokens, warmup=2, reps=10).ms
        except Exception as e:  # noqa: BLE001  report a backend that cannot run here
            rows.append({"impl": impl, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        rows.append({"impl": impl, "ms": ms, "tokens_per_s": batch * seq / (ms / 1e3)})
        print(f"prefill {batch}x{seq} bf16 attention={impl}: {ms:.1f} ms, "
              f"{batch * seq / (ms / 1e3):,.0f} tok/s")
    result["prefill_b8_s4096_bf16"] = rows
    base = next((r for r in rows if r["impl"] == "cudnn" and "ms" in r), None)
    for r in rows:
        if base and "ms" in r:
            r["speed_vs_cudnn"] = base["ms"] / r["ms"]
    (out / "check_models_gpu.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reference")
    r.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("check")
    c.add_argument("--gguf", required=True)
    c.add_argument("--reference", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.cmd == "reference":
        make_reference(args.out)
    else:
        check(args.gguf, args.reference, args.out)


if __name__ == "__main__":
    main()
