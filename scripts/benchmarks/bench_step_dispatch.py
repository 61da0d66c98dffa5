"""What passing the model to a jitted engine step costs on the host, per call.

The engine's steps take the model as (graph, state). Passed as an NNX GraphDef (a static
argument, hashed on every call) and State (a pytree flattened in Python), a call spends
milliseconds on the host before the device starts; `jaxprefill.graph.FlatModel` passes a
graph whose hash is computed once and a list of arrays instead. This times one decode step of
the engine (batch ``--batch``, one token each, a cache of ``--context`` tokens) called both
ways on the same engine, back to back, and a jitted no-op for the dispatch floor:

  * ``calls``: samples of ``--calls`` steps issued back to back, blocked on together (device
    time per step, the host's cost hidden when it is shorter);
  * ``one``: one step at a time, each blocked on (host cost + device time + sync, as the
    engine's loop runs them: it reads every step's tokens back).

    python -m scripts.benchmarks.bench_step_dispatch --model smollm2-135m-instruct --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxprefill as jp
from jaxprefill.infer import Engine, EngineConfig
from scripts.common.timing import time_ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model, tok = jp.load(args.model, dtype=args.dtype)
    page = 64
    pages = args.batch * (-(-args.context // page)) + 1
    eng = Engine(model, tok, EngineConfig(max_batch=args.batch, page_size=page, num_pages=pages,
                                          prefill_tokens=args.context, max_new_tokens=1))
    b = args.batch
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, 1000, b), jnp.int32)
    table = jnp.asarray(1 + np.arange(pages - 1).reshape(b, -1), jnp.int32)
    index = jnp.full((b,), args.context - 1, jnp.int32)
    sampling, step = eng._sampling([None] * b, b)
    graph, leaves = eng._model(eng.graphdef)
    forms = {"GraphDef + State": (eng.graphdef, eng.state), "FlatModel": (graph, leaves)}

    def caller(g, s):
        def call():  # the cache is donated: each call takes the previous one's
            nxt, eng.cache = eng.steps.decode(g, s, eng.cache, tokens, table, index, sampling, step)
            return nxt
        return call

    rows = []
    for name, (g, s) in forms.items():
        call = caller(g, s)
        jax.block_until_ready(call())  # compile
        many = time_ms(call, warmup=2, reps=args.reps, calls=args.calls).ms
        one = time_ms(call, warmup=2, reps=args.reps * 3, calls=1).ms
        rows.append(dict(form=name, ms_calls=many, ms_one=one))
        print(json.dumps(rows[-1]), flush=True)
    noop = jax.jit(lambda x: x + 1)
    floor = time_ms(noop, tokens, warmup=2, reps=args.reps * 3).ms
    lines = [f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; {args.model} "
             f"{args.dtype}, engine decode step, batch {b}, {args.context}-token context; "
             f"jitted no-op, one call: {floor:.3f} ms", "",
             "| model passed as | ms a step, back to back | ms a step, one at a time |",
             "|---|---|---|"]
    lines += [f"| {r['form']} | {r['ms_calls']:.3f} | {r['ms_one']:.3f} |" for r in rows]
    (args.out / "bench_step_dispatch.md").write_text("\n".join(lines) + "\n")
    (args.out / "bench_step_dispatch.json").write_text(json.dumps(
        dict(args={k: str(v) for k, v in vars(args).items()}, noop_ms=floor, rows=rows),
        indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
