"""`make demo`: the main job on the bundled real model (SmolLM2-135M-Instruct GGUF).

Loads the model, answers a small batch of bundled prompts with greedy chat generation, and
prints each answer with the batch's timings.
"""

from __future__ import annotations

import json
import time
from importlib import resources

import jax

import jaxprefill as jp


def main() -> None:
    prompts = [json.loads(line) for line in
               resources.files("jaxprefill").joinpath("assets/demo_prompts.jsonl").read_text().splitlines()
               if line.strip()]
    print(f"jaxprefill {jp.__version__} on {jax.devices()[0].platform} "
          f"({jax.device_count()} device(s))")
    t0 = time.perf_counter()
    model, tokenizer = jp.load("smollm2-135m-instruct")
    print(f"loaded smollm2-135m-instruct (GGUF, dequantized) in {time.perf_counter() - t0:.1f}s")

    texts = [p["prompt"] for p in prompts]
    jp.generate(model, tokenizer, texts, max_new_tokens=4, chat=True)  # compile once
    outs = jp.generate(model, tokenizer, texts, max_new_tokens=64, chat=True, temperature=0.0)
    for p, out in zip(prompts, outs):
        print(f"\n[{p['id']}] {p['prompt']}\n  -> {out.text.strip()}  "
              f"({out.prompt_tokens} prompt tok, {len(out.tokens)} new, {out.finish_reason})")
    s = outs.stats
    print(f"\nbatch of {len(texts)}: prefill {s.prompt_tokens} tokens in {s.prefill_s:.2f}s "
          f"({s.prefill_tok_s:.0f} tok/s); decode {s.generated_tokens} tokens in {s.decode_s:.2f}s "
          f"({s.decode_tok_s:.1f} tok/s)")


if __name__ == "__main__":
    main()
