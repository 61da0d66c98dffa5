"""`make demo`: the main job, a batch over bundled prompts on the bundled real model.

SmolLM2-135M-Instruct (GGUF) answers `assets/demo_prompts.jsonl` through the batch engine
(prepacked prefill, paged KV cache, continuous batching), the same path as
`jaxprefill infer`; it prints each answer and the job's summary table, then prefills one long
passkey prompt dense and with a sparse policy (both answers, both timings): on a GPU the 32K
model on 32K tokens, on a CPU the bundled model on 1,536.
"""

from __future__ import annotations

import json
import tempfile
import time
from importlib import resources
from pathlib import Path

import jax

import jaxprefill as jp
from jaxprefill.infer import Engine, EngineConfig
from jaxprefill.infer.jobs import run_job


def main() -> None:
    prompts = resources.files("jaxprefill").joinpath("assets/demo_prompts.jsonl")
    print(f"jaxprefill {jp.__version__} on {jax.devices()[0].platform} "
          f"({jax.device_count()} device(s))")
    t0 = time.perf_counter()
    model, tokenizer = jp.load("smollm2-135m-instruct")
    print(f"loaded smollm2-135m-instruct (GGUF, dequantized) in {time.perf_counter() - t0:.1f}s")
    engine = Engine(model, tokenizer, EngineConfig(max_batch=8, prefill_tokens=256, prefill_rows=1,
                                                   page_size=64, num_pages=64, max_new_tokens=48,
                                                   bucket=256))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "answers.jsonl"
        with resources.as_file(prompts) as path:
            summary = run_job(engine, path, out, progress=True)
            questions = {json.loads(l)["id"]: json.loads(l) for l in path.read_text().splitlines()
                         if l.strip()}
        for row in map(json.loads, out.read_text().splitlines()):
            q = questions[row["id"]]
            asked = q.get("prompt") or q["messages"][-1]["content"]
            print(f"\n[{row['id']}] {asked}\n  -> {row['text'].strip()}\n     "
                  f"({row['prompt_tokens']} prompt tok, {row['completion_tokens']} new, "
                  f"{row['finish_reason']}, TTFT {row['ttft_s']:.2f}s)")
    print("\n" + summary.table())
    print("(first-call times include XLA compilation)")
    sparse_vs_dense(model, tokenizer)


def sparse_vs_dense(model, tokenizer) -> None:
    """One long passkey prompt, prefilled dense and sparse: the answers and the prefill times.

    On a GPU: the 32K model (``smollm2-135m-32k``) on a 32K-token prompt with xattention, where
    sparse prefill pays. On a CPU: the bundled model on 1,536 tokens with flexprefill, where it
    does not (estimation and block gathers cost more than they save below ~10K tokens); there
    the point is that the answer does not change. Speed: docs/performance.md.
    """
    from jaxprefill.eval.tasks import make_sample

    if jax.devices()[0].platform == "gpu":
        # bf16: the fused attention kernels (cuDNN, Mosaic) take bf16; float32 runs XLA's.
        model, tokenizer = jp.load("smollm2-135m-32k", dtype="bfloat16")
        name, length, policy = "smollm2-135m-32k", 32768 - 32, "xattention"
    else:
        name, length, policy = "smollm2-135m-instruct", 1536, "flexprefill"
    sample = make_sample(tokenizer, "passkey", length, 0.4, seed=0)
    print(f"\nsparse prefill ({policy}) vs dense, {name}, a {length}-token passkey prompt "
          f"(needle at 40% depth, answer {sample.answers[0]}):")
    seconds = {}
    for sparse in (None, policy):
        for _ in range(3):  # the first call compiles; the last shows the compiled time
            outs = jp.generate(model, tokenizer, [sample.messages], max_new_tokens=12,
                               sparse=sparse)
        seconds[sparse] = outs.stats.prefill_s
        print(f"  {sparse or 'dense':>12s}: {outs[0].text.strip()!r}  "
              f"prefill {outs.stats.prefill_s:.3f}s  "
              f"{'correct' if sample.score(outs[0].text) else 'WRONG'}")
    print(f"  sparse / dense prefill time: {seconds[policy] / seconds[None]:.2f}x")


if __name__ == "__main__":
    main()
