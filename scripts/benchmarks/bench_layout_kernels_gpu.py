"""Times the block-sparse kernels and the Mosaic GPU kernel's tuning knobs on real layouts.

  python -m scripts.benchmarks.bench_layout_kernels_gpu --model smollm2-135m-32k --seq 32768 \
      --policies xattention flexprefill --out $OUT

Why: at 32K on SmolLM2 (9 query heads of 64) a policy's Mosaic GPU kernel takes about twice
the time its density predicts from the kernel's dense time, where at 128K with Llama-3-8B heads
it scales with the density: its block lists are short (about 14 blocks a row at 10%), so a
CTA's start and end weigh more. ``BlockSparseMosaicConfig`` has the knobs for that (a
persistent grid that keeps the K/V ring streaming across tiles, the ring depth, the tile
order), settable from a sparse config (``kernel: {impl: mosaic_gpu, ...}``); this script
decides them on the layouts the engine runs, without an engine run per setting.

For each layer of ``--at`` (default: three spread over the model) the prompt's q/k/v come from a
dense forward (``jaxprefill.eval.probe.layer_qkv``, a real ``jaxprefill eval`` prompt of about
``--seq`` tokens), and each policy builds its whole-prompt layout as the engine's row path does
(``layout_for`` on ``sparse_call``'s Prefill). Each layout is attended by ``auto`` (what the
engine runs, named by ``block_sparse_backend``), by ``mosaic_gpu`` under every ``--mosaic``
config (JSON objects of ``BlockSparseMosaicConfig`` fields; default: the defaults, persistent,
3 stages, order "heads") and by ``triton``, beside two anchors on the same q/k/v: cuDNN causal
attention and ``mosaic_gpu`` over the dense causal layout. Per variant: median ms, ms / cuDNN,
and ``scaling`` = ms / (density x Mosaic dense ms), 1.0 when the time follows the listed
blocks. Every output is checked against ``auto``'s (max abs difference; the run fails past
``--tol``). PBS, whose own attend runs the kernel over permuted keys, is refused. ``--tiny``: a
tiny random model on the CPU (XLA and interpret mode, no timings of meaning).

Writes bench_layout_kernels_gpu.json (after every layout) and .md to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprefill.attention.sparse import sparse_call
from jaxprefill.eval.probe import layer_qkv
from jaxprefill.sparse import SparseConfig
from jaxprefill.sparse.prefill import layout_for
from pallas_kernels import block_sparse_attention, block_sparse_backend
from pallas_kernels.gpu.block_sparse_mosaic import BlockSparseMosaicConfig
from pallas_kernels.layout import structured_layout
from scripts.benchmarks.bench_sparse_stages_gpu import load, policy_spec
from scripts.common.model_args import add_model_source
from scripts.common.synthetic_weights import add_weights_arg
from scripts.common.timing import time_ms

NAME = "bench_layout_kernels_gpu"
DEFAULT_MOSAIC = ('{}', '{"persistent": true}', '{"num_stages": 3}', '{"order": "heads"}',
                  '{"persistent": true, "num_stages": 3}')


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_source(p)
    add_weights_arg(p)
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--at", type=int, nargs="+", help="layers (default: three spread over it)")
    p.add_argument("--policies", nargs="+", default=["xattention", "flexprefill"],
                   help="names, YAML files or name:key=value specs (not pbs)")
    p.add_argument("--mosaic", nargs="+", default=list(DEFAULT_MOSAIC),
                   help="BlockSparseMosaicConfig fields as JSON objects, one per variant")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--sample-ms", type=float, default=20.0)
    p.add_argument("--tol", type=float, default=0.05, help="max abs difference from auto (bf16)")
    p.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke run)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.layers, args.dtype = (2 if args.tiny else None), ("float32" if args.tiny else "bfloat16")
    try:
        args.mosaic = [BlockSparseMosaicConfig(**json.loads(m)) for m in args.mosaic]
    except (ValueError, TypeError) as e:
        p.error(f"--mosaic: {e}")
    if any(n.partition(":")[0] == "pbs" for n in args.policies):
        p.error("--policies: pbs runs its kernel over permuted keys inside its own attend")
    if args.seq < 1 or args.reps < 1:
        p.error("--seq and --reps must be >= 1")
    return args


def variants(q, k, v, layout, call, configs) -> dict[str, Callable]:
    """{label: jitted (q, k, v, layout) -> out} of the implementations that run this layout."""
    kw = dict(causal=True, sm_scale=call.sm_scale, q_offset=call.q_offset,
              segment_ids=call.segment_ids)
    on_gpu = jax.default_backend() == "gpu"
    out = {"auto": jax.jit(lambda q, k, v, lay: block_sparse_attention(q, k, v, lay, **kw))}
    if on_gpu:  # a layout Mosaic GPU cannot run raises here, naming why
        block_sparse_backend(q, k, v, layout, impl="mosaic_gpu")
        for cfg in configs:
            label = "mosaic " + (" ".join(f"{f}={getattr(cfg, f)}" for f in cfg.__dataclass_fields__
                                          if getattr(cfg, f) != getattr(BlockSparseMosaicConfig(), f))
                                 or "defaults")
            out[label] = jax.jit(lambda q, k, v, lay, c=cfg: block_sparse_attention(
                q, k, v, lay, impl="mosaic_gpu", config=c, **kw))
    out["triton"] = jax.jit(lambda q, k, v, lay: block_sparse_attention(
        q, k, v, lay, impl="triton", interpret=not on_gpu, **kw))
    return out


class Run:
    def __init__(self, args: argparse.Namespace):
        self.args = args

    def t(self, fn: Callable, *a: Any) -> float:
        if self.args.tiny:
            return time_ms(fn, *a, warmup=1, reps=1).ms
        return time_ms(fn, *a, warmup=1, reps=self.args.reps, sample_ms=self.args.sample_ms).ms

    def anchors(self, q, k, v) -> dict:
        """cuDNN causal attention and Mosaic GPU over the dense causal layout (GPU only)."""
        if jax.default_backend() != "gpu":
            return {"cudnn_ms": None, "mosaic_dense_ms": None}
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"))
        s = q.shape[1]
        lay = structured_layout(s, s, 1, 1, block_q=128, block_k=128, causal=True,
                                q_offset=None, segment_ids=None)
        dense = jax.jit(lambda q, k, v, lay: block_sparse_attention(q, k, v, lay,
                                                                     impl="mosaic_gpu"))
        return {"cudnn_ms": self.t(cudnn, q, k, v), "mosaic_dense_ms": self.t(dense, q, k, v, lay)}

    def layout_row(self, name: str, layer: int, q, k, v, base: dict) -> dict:
        cfg = SparseConfig.parse(policy_spec(name, self.args.tiny) or "dense")
        lens = jnp.full((1,), q.shape[1], jnp.int32)
        call = sparse_call(cfg, layer, q, k, causal=True, q_offset=None, segment_ids=None,
                           window=None, lengths=lens, sm_scale=q.shape[-1] ** -0.5)
        if call is None:
            raise ValueError(f"{name}: layer {layer} stays dense at {q.shape[1]} tokens")
        if cfg.policy_for(layer).kernel_options(k.shape[1]):
            raise ValueError(f"{name}: its kernel takes options (BLASST) these variants omit")
        layout = jax.jit(lambda q, k: layout_for(cfg.policy_for(layer), q, k, call))(q, k)
        density = float(layout.density())
        row = {"policy": name, "layer": layer, "density": density,
               "auto_backend": block_sparse_backend(q, k, v, layout), "variants": {}}
        ref = None
        for label, fn in variants(q, k, v, layout, call, self.args.mosaic).items():
            out = fn(q, k, v, layout)
            diff = 0.0 if ref is None else float(jnp.max(jnp.abs(
                out.astype(jnp.float32) - ref.astype(jnp.float32))))
            ref = out if ref is None else ref
            ms = self.t(fn, q, k, v, layout)
            dense = base["mosaic_dense_ms"]
            row["variants"][label] = {
                "ms": ms, "max_abs_diff": diff,
                "over_cudnn": None if base["cudnn_ms"] is None else ms / base["cudnn_ms"],
                "scaling": None if dense is None else ms / (density * dense)}
            print(f"  layer {layer} {name} {label}: {ms:.3f} ms, diff {diff:.2e}", flush=True)
        return row


def markdown(result: dict) -> str:
    lines = [f"device: {result['device']}, jax {result['jax']}, {result['model']}; "
             f"{result['seq']} tokens", "",
             "| layer | policy | density | variant | ms | / cuDNN | scaling | max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for a in result["anchors"]:
        lines.append(f"| {a['layer']} | anchors | 1 | cuDNN {f(a['cudnn_ms'])} ms, Mosaic dense "
                     f"{f(a['mosaic_dense_ms'])} ms | | | | |")
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['layer']} | {r['policy']} | error: {r['error'][:80]} |")
            continue
        for label, x in r["variants"].items():
            name = f"{label} ({r['auto_backend']})" if label == "auto" else label
            lines.append(f"| {r['layer']} | {r['policy']} | {r['density']:.3f} | {name} | "
                         f"{x['ms']:.3f} | {f(x['over_cudnn'])} | {f(x['scaling'])} | "
                         f"{x['max_abs_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        model, ids, what = load(args)
    except (ValueError, OSError) as e:
        print(f"{NAME}: {e}", file=sys.stderr)
        return 2
    n = model.config.num_layers
    at = sorted(set(args.at or [n // 6, n // 2, 5 * n // 6]))
    if not all(0 <= i < n for i in at):
        print(f"{NAME}: --at {at}: the model has layers 0..{n - 1}", file=sys.stderr)
        return 2
    run, ok = Run(args), True
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "model": what,
              "seq": len(ids), "date": time.strftime("%Y-%m-%d"),
              "mosaic": [str(c) for c in args.mosaic], "anchors": [], "rows": []}
    for layer, q, k, v in layer_qkv(model, jnp.asarray([ids], jnp.int32)):
        if layer not in at:
            continue
        base = run.anchors(q, k, v)
        result["anchors"].append({"layer": layer, **base})
        for name in args.policies:
            try:
                row = run.layout_row(name, layer, q, k, v, base)
                ok &= all(x["max_abs_diff"] <= args.tol for x in row["variants"].values())
            except Exception as e:  # report, never skip silently
                row, ok = {"policy": name, "layer": layer, "error": f"{type(e).__name__}: {e}"}, False
            result["rows"].append(row)
            (args.out / f"{NAME}.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (args.out / f"{NAME}.md").write_text(table)
    print(table)
    if not ok:
        print(f"{NAME}: a variant failed or differs from auto by more than {args.tol}",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
