"""Times the estimators' threshold searches per digit width, beside the sort they replace.

    python -m scripts.benchmarks.bench_threshold_search_gpu --out DIR     # GPU
    python -m scripts.benchmarks.bench_threshold_search_gpu --tiny --out DIR   # CPU smoke run

`jaxprefill.sparse.select` finds a per-row cut by a radix search that fixes ``RADIX_BITS`` bits
per dependent pass (32 / bits passes of 2^bits - 1 candidate cuts each). Wide digits mean few
passes (what short rows pay for: a kernel launch each) but 2^bits - 1 comparisons per entry
and pass (what long rows pay for). Per shape and width this prints the median ms of
``topk_mask`` (count cut: MInference's vertical / slash top-k) and ``mass_count`` (mass cut:
FlexPrefill's budget), and the sort-based reference (``jax.lax.top_k``); every variant's mask
is checked against the reference (exit 1 on a mismatch).

Shapes, smallest first (batch 1): SmolLM2's 9 heads at 32K, one row of keys per head [1, 9,
32768] and its block rows [1, 9, 256, 256] (the 32K model's searches); Llama-3-8B heads: one
row of 32K / 128K keys per head [1, 32, 131072] (a chunk's vertical sums over the cache
view), two stacked searches [1, 32, 2, 131072] (MInference's vertical and slash together), and
block rows [1, 32, 128, 1024] (a chunk's 128 query blocks over 1024 key blocks). Beside the
widths, the library's width with its steps unrolled (``select.RADIX_UNROLL``: straight-line
steps instead of a loop). Each variant prints as it is timed. Timings:
``scripts.common.timing.time_ms``.

Then the key-column choice (``jaxprefill.sparse.columns.top_columns``: 64 ascending positions
per head) at [1, 9, 32768] and [1, 32, 131072]: ``select.top_positions`` (two top-k over
cells, the library's path) against the radix top-k mask + list compaction (its path before)
and one ``lax.top_k`` over the whole row + a sort of the 64; all three must agree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprefill.sparse import select
from jaxprefill.sparse.estimation import Estimation
from scripts.common.timing import time_ms

SHAPES = {"smollm_keys32k": (1, 9, 32768), "smollm_blockrows": (1, 9, 256, 256),
          "keys32k": (1, 32, 32768), "keys128k": (1, 32, 131072),
          "stacked128k": (1, 32, 2, 131072), "blockrows": (1, 32, 128, 1024)}
TINY = {"keys": (1, 4, 2048), "blockrows": (1, 4, 16, 64)}
WIDTHS = (1, 2, 4, 8)
XLA = Estimation("xla")  # the radix search, timed per width (not the GPU mass-cut kernel)


def reference_topk(scores: jax.Array, count: int) -> jax.Array:
    """bool mask of the `count` largest entries per row by a sort (ties: lowest index)."""
    _, idx = jax.lax.top_k(scores, count)
    rows = jnp.zeros(scores.shape, bool)
    return jnp.put_along_axis(rows, idx, True, axis=-1, inplace=False)


def run(shapes: dict, reps: int) -> tuple[list, bool]:
    results, ok, default_bits = [], True, select.RADIX_BITS
    for label, shape in shapes.items():
        m = shape[-1]
        scores = jax.random.uniform(jax.random.key(0), shape, jnp.float32)
        probs = scores / scores.sum(-1, keepdims=True)
        valid = jnp.ones(shape, bool)
        count = max(1, m // 128)  # ~MInference's 1000 of 128K
        want = jax.jit(lambda s: reference_topk(s, count))(scores)
        row = dict(shape=label, dims=list(shape),
                   sort_ms=time_ms(jax.jit(lambda s: reference_topk(s, count)), scores,
                                   reps=reps).ms)
        print(f"{label:16s} {str(shape):20s} sort {row['sort_ms']:.3f} ms", flush=True)
        variants = [(f"b{bits}", bits, 1) for bits in WIDTHS]
        variants.append((f"b{default_bits}_unrolled", default_bits, True))
        for name, bits, unroll in variants:
            select.RADIX_BITS, select.RADIX_UNROLL = bits, unroll  # read when traced
            topk = jax.jit(lambda s: select.topk_mask(s, valid, count))
            mass = jax.jit(lambda p: select.mass_count(p, valid, 0.9, how=XLA))
            same = bool(jnp.array_equal(topk(scores), want))
            ok &= same
            row[f"topk_ms_{name}"] = time_ms(topk, scores, reps=reps).ms
            row[f"mass_ms_{name}"] = time_ms(mass, probs, reps=reps).ms
            row[f"topk_equal_{name}"] = same
            print(f"  {name:12s} topk {row[f'topk_ms_{name}']:.3f} ms  mass "
                  f"{row[f'mass_ms_{name}']:.3f} ms  {'equal' if same else 'MISMATCH'}",
                  flush=True)
        results.append(row)
    return results, ok


COLUMN_SHAPES = {"smollm_keys32k": (1, 9, 32768), "keys128k": (1, 32, 131072)}
TINY_COLUMNS = {"keys": (1, 4, 2048)}


def run_columns(shapes: dict, reps: int, count: int = 64) -> tuple[list, bool]:
    """Times the three ways to the key columns (module docstring); ok when all agree."""
    from jaxprefill.sparse.columns import ascending_positions
    from jaxprefill.sparse.estimation import Estimation

    results, ok = [], True
    for label, shape in shapes.items():
        scores = jax.random.uniform(jax.random.key(1), shape, jnp.float32)
        valid = jnp.ones(shape, bool)
        variants = {
            "cells": lambda s: select.top_positions(s, valid, count),
            "radix_mask": lambda s: ascending_positions(select.topk_mask(s, valid, count),
                                                        count, Estimation()),
            "top_k_row": lambda s: jnp.sort(jax.lax.top_k(s, count)[1], axis=-1),
        }
        row, outs = dict(shape=label, dims=list(shape), count=count), {}
        for name, fn in variants.items():
            f = jax.jit(fn)
            outs[name] = np.asarray(f(scores))
            row[f"{name}_ms"] = time_ms(f, scores, reps=reps).ms
        same = all(np.array_equal(outs["cells"], o) for o in outs.values())
        ok &= same
        row["equal"] = same
        print(f"columns {label:16s} " + "  ".join(f"{n} {row[f'{n}_ms']:.3f} ms"
                                                   for n in variants)
              + f"  {'equal' if same else 'MISMATCH'}", flush=True)
        results.append(row)
    return results, ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: small shapes")
    args = ap.parse_args(argv)
    default_bits, default_unroll = select.RADIX_BITS, select.RADIX_UNROLL
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; library RADIX_BITS "
          f"{default_bits}", flush=True)
    try:
        reps = 2 if args.tiny else args.reps
        columns, ok_columns = run_columns(TINY_COLUMNS if args.tiny else COLUMN_SHAPES, reps)
        results, ok = run(TINY if args.tiny else SHAPES, reps)
        ok &= ok_columns
    finally:
        select.RADIX_BITS, select.RADIX_UNROLL = default_bits, default_unroll
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_threshold_search.json").write_text(json.dumps(dict(
        device=jax.devices()[0].device_kind, jax=jax.__version__, radix_bits=default_bits,
        results=results, columns=columns), indent=1))
    if not ok:
        print("MISMATCH: a search's top-k differs from the sort", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
