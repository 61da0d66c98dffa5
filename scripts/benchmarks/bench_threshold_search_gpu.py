"""Times the estimators' threshold searches per digit width, beside the sort they replace.

    python -m scripts.benchmarks.bench_threshold_search_gpu --out DIR     # GPU
    python -m scripts.benchmarks.bench_threshold_search_gpu --tiny --out DIR   # CPU smoke run

Three sections, run 2, 1, 3 (the shortest first; each prints as it goes; timings:
``scripts.common.timing.time_ms``):

1. The mass-cut kernels (``pallas_kernels.estimation.mass_cut``, impl "triton") against the
   XLA radix search (``select._mass_cut`` with ``Estimation("xla")``) at FlexPrefill's shapes:
   the budget rows at 32K as plain cuts [2, 9, 32768] (where "auto" uses the wide kernel: its
   variants timed beside it) and through ``select.mass_count`` [2, 1, 9, 32768] (kernel, XLA,
   sort); the query-aware rows [1, 9, 65536] (``cumulative_keep`` over the pooled block matrix,
   256 x 256) and [1, 32, 2^20] at 128K; the chunk rows at 128K
   (``flexprefill.uniform_prefix_cut``: 32 heads, 1024 uniform prefix rows + 128 x 1024 pooled
   scores, a weighted cut of 132096 entries per row). Rows wider than 16384 take the wide
   kernel (named here; "auto" gives it rows of at most 32768). Every cut and count is checked
   to be one within float rounding (``check_estimation_gpu.mass_cut_misses`` /
   ``mass_count_misses``; exit 1 if not), rows differing from the XLA search are counted. The
   calls are queued (``sample_ms=20``: device time per call, the launch hidden).
2. The key-column choice (``jaxprefill.sparse.columns.top_columns``: 64 ascending positions
   per head) at [1, 9, 32768] and [1, 32, 131072]: ``select.top_positions`` (two top-k over
   cells, the library's "auto" path) against the Triton kernel path
   (``pallas_kernels.estimation.top_positions``: the DSA indexer's segment top-k and
   tournament; opt-in until timed), the radix top-k mask + list compaction and one
   ``lax.top_k`` over the whole row + a sort of the 64; all must agree.
3. The radix search per digit width. ``jaxprefill.sparse.select`` finds a per-row cut fixing
   ``RADIX_BITS`` bits per dependent pass (32 / bits passes of 2^bits - 1 candidate cuts
   each): wide digits mean few passes (what short rows pay for: a kernel launch each) but more
   comparisons per entry and pass (what long rows pay for). Per shape and width: the median ms
   of ``topk_mask`` (count cut: MInference's vertical / slash top-k) and ``mass_count``
   (FlexPrefill's budget) beside the sort-based reference (``jax.lax.top_k``), every mask
   checked against it; also the library's width with its steps unrolled
   (``select.RADIX_UNROLL``). One call per sample. Shapes, smallest first (batch 1):
   SmolLM2's 9 heads at 32K [1, 9, 32768] and its block rows [1, 9, 256, 256]; Llama-3-8B
   heads: [1, 32, 32768], [1, 32, 131072] (a chunk's vertical sums over the cache view), two
   stacked searches [1, 32, 2, 131072] (MInference's vertical and slash together) and block
   rows [1, 32, 128, 1024].

``--tiny`` runs small shapes (the kernels in interpret mode).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprefill.sparse import select
from jaxprefill.sparse.estimation import Estimation
from jaxprefill.sparse.flexprefill import mass_count_sort, prefix_cut_operands, uniform_prefix_cut
from pallas_kernels import estimation
from pallas_kernels.gpu.mass_cut_wide_triton import mass_cut_wide_triton
from scripts.checks.check_estimation_gpu import chunk_rows, mass_count_misses, mass_cut_misses
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


# shapes: mass_cut / mass_count the rows; prefix_cut (B, Hq, n key blocks, nr chunk rows)
KERNEL_SHAPES = {"flex32k_budget_rows": ("mass_cut", (2, 9, 32768)),  # the wide kernel's variants
                 "flex32k_qa_rows": ("mass_cut", (1, 9, 65536)),
                 "flex32k_budgets": ("mass_count", (2, 1, 9, 32768)),
                 "flex128k_qa_rows": ("mass_cut", (1, 32, 1 << 20)),
                 "flex128k_chunk_rows": ("prefix_cut", (1, 32, 1024, 128))}
TINY_KERNELS = {"qa_rows": ("mass_cut", (1, 2, 16384 + 100)),
                "budgets": ("mass_count", (2, 1, 2, 16384 + 100)),
                "chunk_rows": ("prefix_cut", (1, 2, 128, 128))}
# mass_cut_wide_triton's arguments beside its defaults (tile 4096, 2 bits, 8 warps, 2 stages)
WIDE_VARIANTS = {
    "bits1": dict(digit_bits=1), "bits3": dict(digit_bits=3), "tile2048": dict(tile=2048),
    "tile8192": dict(tile=8192), "warps4": dict(num_warps=4), "stages1": dict(num_stages=1)}


def run_kernels(shapes: dict, reps: int, interpret: bool) -> tuple[list, bool]:
    """Times the mass-cut kernels against the XLA radix search (module docstring); ok when
    every kernel's cut and count is one within float rounding (``check_estimation_gpu``'s
    ``mass_cut_misses`` / ``mass_count_misses``); rows differing from the XLA search are
    counted."""
    results, ok = [], True
    triton = Estimation("triton", interpret=interpret)
    for label, (op, shape) in shapes.items():
        row = dict(shape=label, op=op, dims=list(shape))
        if op != "prefix_cut":
            u = jax.random.uniform(jax.random.key(2), shape, jnp.float32)
            s = jnp.where(u < 0.2, 0.0, u ** 8)  # zeros and a heavy tail, like block masses
        if op == "prefix_cut":  # FlexPrefill's chunk rows: the cut of [uniform prefix; scores]
            args = chunk_rows(jax.random.key(2), *shape)
            fns = {"xla": lambda *a: uniform_prefix_cut(*a, how=XLA),
                   "kernel": lambda *a: uniform_prefix_cut(*a, how=triton)}
            s, _, pv, pcount, pmass, goal = args
            values, weights = prefix_cut_operands(s, pv, pcount, pmass)
            base = jnp.zeros(goal.shape, jnp.float32)
        elif op == "mass_count":  # FlexPrefill's budgets: distributions over valid keys, 0.9
            x = s / s.sum(-1, keepdims=True)
            valid = jnp.ones(shape, bool)
            fns = {"xla": lambda a: select.mass_count(a, valid, 0.9, how=XLA),
                   "kernel": lambda a: select.mass_count(a, valid, 0.9, how=triton),
                   "sort": lambda a: mass_count_sort(a, valid, 0.9)}
            args = (x,)
        else:  # cumulative_keep's cut at gamma 0.95 (no forced entries)
            base, goal = jnp.zeros(shape[:-1]), 0.95 * s.sum(-1)
            fns = {"xla": lambda *a: select._mass_cut(*a, XLA),
                   "kernel": lambda *a: estimation.mass_cut(*a, impl="triton",
                                                            interpret=interpret)}
            if not interpret:  # the wide kernel's variants (interpret mode: the library's only)
                fns.update({f"wide_{n}": functools.partial(mass_cut_wide_triton, **kw)
                            for n, kw in WIDE_VARIANTS.items()})
            args = (s, base, goal)
        want = None
        for name, fn in fns.items():
            f = jax.jit(fn)
            got = np.asarray(f(*args))
            if name == "xla":
                want = got
            elif op == "mass_count":
                row[f"{name}_rows_differ"] = int((got != want).sum())
                if name == "kernel":
                    row[f"{name}_not_a_count"] = misses = mass_count_misses(x, valid, 0.9, got)
                    ok &= misses == 0
            elif op == "prefix_cut":
                row[f"{name}_rows_differ"] = int((got != want).sum())
                row[f"{name}_not_a_cut"] = misses = mass_cut_misses(values, base, goal, got,
                                                                    weight=weights)
                ok &= misses == 0
            else:
                row[f"{name}_rows_differ"] = int((got != want).sum())
                row[f"{name}_not_a_cut"] = misses = mass_cut_misses(s, base, goal, got)
                ok &= misses == 0
            row[f"{name}_ms"] = time_ms(f, *args, reps=reps, sample_ms=None if interpret
                                        else 20).ms
        print(f"kernels {label:16s} {str(shape):20s} " + "  ".join(
            f"{n} {row[f'{n}_ms']:.3f} ms" for n in fns), flush=True)
        results.append(row)
    return results, ok


COLUMN_SHAPES = {"smollm_keys32k": (1, 9, 32768), "keys128k": (1, 32, 131072)}
TINY_COLUMNS = {"keys": (1, 4, 2048)}


def run_columns(shapes: dict, reps: int, interpret: bool, count: int = 64
                ) -> tuple[list, bool]:
    """Times the ways to the key columns (module docstring); ok when all agree."""
    from jaxprefill.sparse.columns import ascending_positions
    from jaxprefill.sparse.estimation import Estimation

    results, ok = [], True
    for label, shape in shapes.items():
        scores = jax.random.uniform(jax.random.key(1), shape, jnp.float32)
        valid = jnp.ones(shape, bool)
        variants = {
            "cells": lambda s: select.top_positions(s, valid, count),
            "triton_topk": lambda s: estimation.top_positions(s, valid, count, impl="triton",
                                                              interpret=interpret),
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
        interpret = jax.default_backend() != "gpu"
        columns, ok_columns = run_columns(TINY_COLUMNS if args.tiny else COLUMN_SHAPES, reps,
                                          interpret)
        kernels, ok_kernels = run_kernels(TINY_KERNELS if args.tiny else KERNEL_SHAPES, reps,
                                          interpret=interpret)
        results, ok = run(TINY if args.tiny else SHAPES, reps)
        ok &= ok_columns and ok_kernels
    finally:
        select.RADIX_BITS, select.RADIX_UNROLL = default_bits, default_unroll
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_threshold_search.json").write_text(json.dumps(dict(
        device=jax.devices()[0].device_kind, jax=jax.__version__, radix_bits=default_bits,
        results=results, columns=columns, kernels=kernels), indent=1))
    if not ok:
        print("MISMATCH: a search's top-k differs from the sort, or a kernel's cut from the XLA "
              "search", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
