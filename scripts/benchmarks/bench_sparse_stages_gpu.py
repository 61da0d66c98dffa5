"""Where the engine loses the sparse kernel's gains: engine TTFT per policy beside its stages.

  python -m scripts.benchmarks.bench_sparse_stages_gpu --layers 2 --seq 131072 --chunk 16384 \
      --out $OUT

Model: Llama-3-8B shapes, random weights (`--weights local`: local attention by construction,
scripts/common/synthetic_weights.py), `--layers` layers, `--seq` random tokens (as
bench_sparse_ttft_gpu); or `--model NAME|PATH` / `--gguf PATH` (e.g. the bundled
`smollm2-135m-32k`, all its layers) with a real `jaxprefill eval` prompt of about `--seq` tokens
(`--task`). `--tiny`: a tiny float32 model, one sample per stage (CPU smoke run). Engine paths:
chunked (`--chunk`-token chunks against the cached prefix; the cache view is one bucket of
the whole prompt, and sparse policies estimate over `--extent`, default bucket: each chunk up
to its end, see Estimation.extent) and row (the prompt alone in one
prefill row: a "packed" call with segment ids, or a "prompt" call where the engine has
steps.prefill_single; header row_kind, read from the engine's stats). `--policies`: names
(bench_sparse_ttft_gpu's settings where it has them), YAML files or `name:key=value,...`
specs (as `jaxprefill eval --sparse`); dense runs first, the
anchor. Per path and policy:
1. ttft_ms: Engine TTFT, median of `--reps` runs after a warm-up (bench_sparse_ttft_gpu.ttft).
2. Stages on one layer's q/k/v (`--layer`, default the middle one; a dense forward of the
   prompt, jaxprefill.eval.probe.layer_qkv), per attention call the engine makes (chunk c: its
   queries at q_offset c * chunk against the cache view, lengths = its valid queries; the row:
   segment ids, or lengths), each jitted alone and timed with time_ms:
   * est_ms: layout_for (jaxprefill.sparse.prefill) on the Prefill that sparse_call
     (jaxprefill.attention.sparse) makes of the call: estimation + selection + layout;
   * kernel_ms: block_sparse_attention over that layout, called as Policy.attend calls it
     (pbs, which permutes K/V in its own attend: the whole call minus est_ms);
   * attn_ms: the whole call as the layer makes it (attend() with the sparse spec);
   * dense_ms: attend() with the model's own spec, the engine's dense path (GPUs: the
     block-sparse kernel over the masked structure, or cuDNN for a "prompt" row; CPUs: XLA);
     header cudnn_ms: cuDNN causal attention over the whole prompt (jax.nn.dot_product_attention),
     when the device runs it;
   * rest_ms: the layer without attention, timed directly (the attention output is an input):
     norms, QKV projections + RoPE, cache write, O projection, residuals, MLP. A chunk's cache
     write copies the view here (the engine writes in place): the same for every policy, and
     outside_ms absorbs it;
   * density: listed / causal blocks over the call's valid query blocks (key columns count
     1 / block_k); kernel_backends (block_sparse_backend on the call); est_backends (each answer
     of pallas_kernels.estimation.estimation_backend while the layout is traced); fallback: why
     a call stays dense (sparse_call's reason: min_length, call kind), with est 0, kernel dense.
   Configs whose layers differ: each (policy, layer_key) group is measured at its first layer
   index, on the same q/k/v; dense-rule layers take dense_ms; per call, est / kernel / attn /
   density are means over the layers, est counting only the layers that build their layout
   (a policy's share_layers: the others reuse one; attn still includes it).
3. predicted_ms = layers x sum over calls (est + kernel + rest) + outside_ms, with outside_ms =
   TTFT(dense) - layers x sum over calls (dense + rest) on the same path (embedding, final norm,
   last logits, sampling, paged-cache gather / write-back, host time between chunks), so dense's
   actual_over_predicted is 1 by construction. est_over_dense per call; est_over_dense_max_32k
   over the calls whose keys reach 32K. Row stage times: per layer, summed over the calls.
The stages see the dense forward's q/k/v; a sparse engine's later layers see sparse outputs.
Writes bench_sparse_stages_gpu.json (after every row) and bench_sparse_stages_gpu.md to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import logging.handlers
import sys
import time
import traceback
import unittest.mock
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxprefill as jp
from jaxprefill.attention import AttentionSpec, attend, attention_backend
from jaxprefill.attention.sparse import sparse_call
from jaxprefill.eval.probe import layer_qkv
from jaxprefill.eval.runner import prompt_tokens
from jaxprefill.infer import Engine
from jaxprefill.models.layers import dense, rope_cos_sin
from jaxprefill.models.llama import write_rows
from jaxprefill.sparse import Policy, Prefill, SparseConfig
from jaxprefill.sparse.prefill import layout_for
from pallas_kernels import BlockSparseLayout, block_sparse_attention, block_sparse_backend
from pallas_kernels import estimation as pk_estimation
from pallas_kernels.layout import structured_layout
from scripts.benchmarks.bench_sparse_ttft_gpu import (POLICIES, engine_config, llama3_8b_shapes,
                                                      path_spec, policy_config, ttft)
from scripts.common.model_args import add_model_source
from scripts.common.synthetic_weights import add_weights_arg, random_llama
from scripts.common.timing import time_ms

NAME = "bench_sparse_stages_gpu"
TINY = {"min_length": 128, "block_size": 64}  # --tiny: sparse from 128 tokens, 64-token blocks
TINY_PARAMS = {"streaming": {"sink": 64, "local": 128}}
ESTIMATION_SIZES = ("rows", "cell", "columns")  # estimation_backend's size arguments


@dataclasses.dataclass
class Call:
    """One attention call of a layer as the engine makes it: q [1, Sq, Hq, D], k, v [1, Sk,
    Hkv, D] (the cache view, or the padded row); off (the q_offset) and lens int32 [1], seg int32
    [1, S] (segment ids, 0 = padding) or None; queries start..start + valid - 1 are real."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    off: jax.Array | None
    lens: jax.Array | None
    seg: jax.Array | None
    start: int
    valid: int


def buckets(seq: int, chunk: int) -> dict[str, int]:
    """Per path, the engine's bucket (cache views round up to it; the row's width)."""
    return {"chunked": -(-seq // chunk) * chunk, "row": -(-seq // 128) * 128}


def engine_calls(q: jax.Array, k: jax.Array, v: jax.Array, path: str, seq: int, chunk: int,
                 bucket: int, row_kind: str | None = None) -> list[Call]:
    """The attention calls one layer makes for the prompt (q, k, v [1, seq, H, D]). The row is
    a "packed" call (segment ids) or a "prompt" call (lengths; steps.prefill_single)."""
    pad = lambda a, n: jnp.pad(a, ((0, 0), (0, n - a.shape[1]), (0, 0), (0, 0)))  # noqa: E731
    if path == "row":
        if row_kind not in ("packed", "prompt"):
            raise ValueError(f"row calls are 'packed' or 'prompt', got {row_kind!r}")
        seg = jnp.asarray((np.arange(bucket) < seq).astype(np.int32)[None])
        lens = jnp.full((1,), seq, jnp.int32)
        return [Call(pad(q, bucket), pad(k, bucket), pad(v, bucket), None,
                     lens if row_kind == "prompt" else None,
                     seg if row_kind == "packed" else None, 0, seq)]
    views: dict[int, tuple] = {}  # the engine's view: page table rounded up to the bucket
    calls = []
    for start in range(0, seq, chunk):
        n = min(chunk, seq - start)
        view = -(-(start + chunk) // bucket) * bucket
        if view not in views:
            views[view] = (pad(k, view), pad(v, view))
        calls.append(Call(pad(q[:, start:start + n], chunk), *views[view],
                          jnp.full((1,), start, jnp.int32), jnp.full((1,), n, jnp.int32), None,
                          start, n))
    return calls


def classify(cfg: SparseConfig | None, layer: int, window: int | None, q: jax.Array,
             k: jax.Array, off: Any, lens: Any, seg: Any) -> Prefill | None:
    """The Prefill of the call as the model's attend() classifies it (None: it stays dense)."""
    segs = None if seg is None else (seg, seg)
    return sparse_call(cfg, layer, q, k, causal=True, q_offset=off, segment_ids=segs,
                       window=window, lengths=lens, sm_scale=q.shape[-1] ** -0.5)


def layout_raw(cfg: SparseConfig, layer: int, window: int | None) -> Callable:
    """(q, k, off, lens, seg) -> the layout Policy.attend builds (estimation + selection)."""
    def build(q, k, off, lens, seg):
        call = classify(cfg, layer, window, q, k, off, lens, seg)
        return layout_for(cfg.policy_for(layer), q, k, call)
    return build


def kernel_fn(cfg: SparseConfig, layer: int, window: int | None) -> Callable:
    """(q, k, v, layout, off, lens, seg) -> the kernel call of Policy.attend (jitted)."""
    policy = cfg.policy_for(layer)

    def kernel(q, k, v, layout, off, lens, seg):
        call = classify(cfg, layer, window, q, k, off, lens, seg)
        return block_sparse_attention(q, k, v, layout, causal=True, sm_scale=call.sm_scale,
                                      q_offset=call.q_offset, segment_ids=call.segment_ids,
                                      impl=call.kernel, config=call.kernel_config,
                                      **policy.kernel_options(k.shape[1]))
    return jax.jit(kernel)


def attend_fn(spec: AttentionSpec, layer: int, window: int | None) -> Callable:
    """(q, k, v, off, lens, seg) -> the layer's attend() call in the engine (jitted)."""
    def call(q, k, v, off, lens, seg):
        segs = None if seg is None else (seg, seg)
        return attend(q, k, v, causal=True, q_offset=off, segment_ids=segs, window=window,
                      spec=spec, layer=layer, lengths=lens)
    return jax.jit(call)


@functools.partial(jax.jit, static_argnums=0)
def _rest(graphdef, state, x, cos, sin, out, kc, vc, start):
    """One decoder block without its attention (``out`` [B, S, Hq, D] stands for it): the
    Block / Attention code of jaxprefill.models.llama. A chunk writes its k/v into the view
    (kc, vc) at ``start``; the row fills a fresh view (start None), as prefill_packed does."""
    layer = nnx.merge(graphdef, state)
    q, k, v = layer.attn.project(layer.attn_norm(x), cos, sin)
    if start is None:
        kc, vc, start = jnp.zeros_like(k), jnp.zeros_like(v), jnp.zeros((1,), jnp.int32)
    kc, vc = write_rows(kc, k, start), write_rows(vc, v, start)
    y = dense("bshd,hde->bse", out, layer.attn.o)
    if layer.attn.cfg.o_bias:
        y = y + layer.attn.o_bias[...].astype(x.dtype)
    x = x + y
    return x + layer.mlp(layer.mlp_norm(x)), q, kc, vc  # q returned: nothing is dead code


@contextlib.contextmanager
def debug_messages(name: str) -> Iterator[list[str]]:
    """Debug-level messages of logger ``name`` while the block runs (sparse_call's reasons)."""
    logger, handler = logging.getLogger(name), logging.handlers.BufferingHandler(1 << 20)
    level, messages = logger.level, []
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        messages += [r.getMessage() for r in handler.buffer]


@contextlib.contextmanager
def estimation_answers() -> Iterator[dict[str, str]]:
    """{"op(sizes)": backend} of each estimation_backend answer while the block runs (the
    policies ask the resolver while their layout is traced)."""
    seen, real = {}, pk_estimation.estimation_backend

    def record(op: str, **kw: Any) -> str:
        sizes = ",".join(f"{k}={v}" for k, v in kw.items() if k in ESTIMATION_SIZES and v)
        seen[f"{op}({sizes})"] = name = real(op, **kw)
        return name

    with unittest.mock.patch.object(pk_estimation, "estimation_backend", record):
        yield seen


def layout_density(layout: BlockSparseLayout, start: int, valid: int) -> float:
    """Listed / causal blocks over the valid query blocks of a call (columns: 1 / block_k)."""
    cnt = np.asarray(layout.kv_cnt, np.float64)
    if layout.col_cnt is not None:
        cnt = cnt + np.asarray(layout.col_cnt, np.float64) / layout.block_k
    blk = layout.block_q
    rows = -(-valid // blk)
    causal = (start // blk + np.arange(rows) + 1).sum()
    return float(cnt[:, :, :rows].sum() / (cnt.shape[0] * cnt.shape[1] * causal))


def dense_backend(spec: AttentionSpec, c: Call, window: int | None) -> str:
    """What the engine's dense attention runs for the call (dispatch.structured_block_sparse's
    layout when it is the block-sparse kernel)."""
    simple = c.off is None and c.seg is None and c.q.shape[1] == c.k.shape[1]
    name = attention_backend(c.q, c.v.shape[-1], simple=simple, window=window, impl=spec.impl)
    if name != "block_sparse":
        return name
    segs = None if c.seg is None else (c.seg, c.seg)
    lay = structured_layout(c.q.shape[1], c.k.shape[1], 1, c.k.shape[2],
                            block_q=128 if c.q.shape[1] >= 128 else 64, block_k=128,
                            causal=True, q_offset=c.off, segment_ids=segs)
    return f"block_sparse/{block_sparse_backend(c.q, c.k, c.v, lay)}"


class Bench:
    """The model, the prompt, one layer's calls per path, and the stage timings."""

    def __init__(self, args: argparse.Namespace, model, ids: list[int], layer: int):
        self.args, self.model, self.ids, self.layer = args, model, ids, layer
        self.layers = model.config.num_layers
        self.window = model.config.sliding_window
        self.seq = len(ids)
        self.graphdef, self.state = nnx.split(model.layers[layer])
        self.qkv = next((q, k, v) for i, q, k, v
                        in layer_qkv(model, jnp.asarray([ids], jnp.int32)) if i == layer)
        self.row_kind: str | None = None  # the engine's step for the row (engine_ran)
        self.calls: dict[str, list[Call]] = {}
        self.base: dict[str, list[dict]] = {}

    def engine_ran(self, path: str, stats: dict) -> None:
        """Checks that the engine ran the calls mirrored here: chunks on the chunked path; on
        the row path, its step (a "prompt" forward where it has steps.prefill_single, else
        "packed") must be the same for every engine of the run."""
        if path == "chunked":
            if not stats.get("chunk_rows"):
                raise ValueError(f"the engine prefilled no chunk rows: {stats}")
            return
        kind = "prompt" if stats.get("single_rows") else "packed"
        if self.row_kind not in (None, kind):
            raise ValueError(f"the engine ran the row as a {kind} call, earlier as "
                             f"{self.row_kind}")
        self.row_kind = kind

    def path_calls(self, path: str) -> list[Call]:
        if path not in self.calls:
            self.calls[path] = engine_calls(*self.qkv, path, self.seq, self.args.chunk,
                                            buckets(self.seq, self.args.chunk)[path],
                                            self.row_kind)
        return self.calls[path]

    def t(self, fn: Callable, *a: Any) -> float:
        """Median ms of fn(*a) (compilation in the warm-up call)."""
        if self.args.tiny:
            return time_ms(fn, *a, warmup=1, reps=1).ms
        return time_ms(fn, *a, warmup=1, reps=self.args.stage_reps,
                       sample_ms=self.args.sample_ms).ms

    def cudnn(self) -> dict:
        """cuDNN causal attention over the whole prompt (this layer's q/k/v), if it runs here."""
        if jax.default_backend() != "gpu":
            return {"cudnn_ms": None, "cudnn_note": f"not a GPU ({jax.default_backend()})"}
        f = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                 implementation="cudnn"))
        try:
            return {"cudnn_ms": self.t(f, *self.qkv), "cudnn_note": ""}
        except Exception as e:  # the anchor is optional; say why it is missing
            return {"cudnn_ms": None, "cudnn_note": f"{type(e).__name__}: {e}"[:200]}

    def path_base(self, path: str) -> list[dict]:
        """Per call: the engine's dense attention and the rest of the layer (shared by rows)."""
        if path in self.base:
            return self.base[path]
        model, e = self.model, self.model.config.hidden_size
        dense_call = attend_fn(model.attention, self.layer, self.window)
        out = []
        for i, c in enumerate(self.path_calls(path)):
            s = c.q.shape[1]
            pos = jnp.asarray(c.start + np.arange(s), jnp.int32)[None]
            cos, sin = rope_cos_sin(pos, jnp.asarray(model.rope[0]), model.rope[1])
            x = jax.random.normal(jax.random.key(2 * i), (1, s, e), model.dtype)
            attn_out = jax.random.normal(jax.random.key(2 * i + 1), c.q.shape, model.dtype)
            kc, vc = (None, None) if c.off is None else (c.k, c.v)
            rest = self.t(_rest, self.graphdef, self.state, x, cos, sin, attn_out, kc, vc, c.off)
            d = self.t(dense_call, c.q, c.k, c.v, c.off, c.lens, c.seg)
            out.append({"start": c.start, "valid": c.valid, "dense_ms": d, "rest_ms": rest,
                        "dense_backend": dense_backend(model.attention, c, self.window)})
            print(f"  {path} call {i + 1}/{len(self.calls[path])}: dense attention {d:.2f} ms, "
                  f"rest of the layer {rest:.2f} ms", flush=True)
        self.base[path] = out
        return out

    def group(self, path: str, cfg: SparseConfig, li: int, label: str) -> list[dict]:
        """Stages of each call of ``path`` for the policy of layer ``li`` (q/k/v of self.layer)."""
        policy, base = cfg.policy_for(li), self.path_base(path)
        spec = dataclasses.replace(self.model.attention, sparse=cfg)
        raw = layout_raw(cfg, li, self.window)
        build, kernel = jax.jit(raw), kernel_fn(cfg, li, self.window)
        whole = attend_fn(spec, li, self.window)
        est_backends: dict[str, str] | None = None
        out = []
        for i, (c, b) in enumerate(zip(self.path_calls(path), base)):
            with debug_messages("jaxprefill.attention") as why:
                call = classify(cfg, li, self.window, c.q, c.k, c.off, c.lens, c.seg)
            if call is None:
                out.append({"est_ms": 0.0, "kernel_ms": b["dense_ms"], "attn_ms": b["dense_ms"],
                            "density": 1.0, "kernel_backend": b["dense_backend"],
                            "est_backends": {}, "fallback": "; ".join(why) or "dense"})
                print(f"  {path} {label} call {i + 1}/{len(base)}: dense ({out[-1]['fallback']})",
                      flush=True)
                continue
            attn = self.t(whole, c.q, c.k, c.v, c.off, c.lens, c.seg)
            a = (c.q, c.k, c.off, c.lens, c.seg)
            layout = build(*a)
            if est_backends is None:  # static per shape: trace once per path
                with estimation_answers() as est_backends:
                    jax.make_jaxpr(lambda *x: raw(*x))(*a)
            est = self.t(build, *a)
            blasst = policy.kernel_options(c.k.shape[1]).get("blasst_threshold")
            if type(policy).attend is Policy.attend:
                kern = self.t(kernel, c.q, c.k, c.v, layout, c.off, c.lens, c.seg)
                kb = block_sparse_backend(c.q, c.k, c.v, layout, impl=call.kernel,
                                          blasst_threshold=blasst, config=call.kernel_config)
                kb += "" if call.kernel_config is None else f" {call.kernel_config}"
            else:  # pbs: its attend permutes K/V and runs the kernel over [K'; K] (the layout's)
                kern = attn - est
                keys = jnp.zeros((1, layout.num_kv_blocks * layout.block_k, *c.k.shape[2:]),
                                 c.k.dtype)
                kb = (f"{block_sparse_backend(c.q, keys, keys, layout, impl=call.kernel)} "
                      f"({policy.name}'s own attend: kernel_ms = whole call - est_ms)")
            dens = layout_density(layout, c.start, c.valid)
            out.append({"est_ms": est, "kernel_ms": kern, "attn_ms": attn, "density": dens,
                        "kernel_backend": kb, "est_backends": dict(est_backends), "fallback": ""})
            print(f"  {path} {label} call {i + 1}/{len(base)}: est {est:.2f} ms, kernel "
                  f"{kern:.2f} ms ({kb}), whole call {attn:.2f} ms, dense {b['dense_ms']:.2f} ms, "
                  f"density {dens:.3f}", flush=True)
        return out

    def stages(self, path: str, cfg: SparseConfig | None) -> dict:
        """Per call stage times (means over the layers) and the row's aggregates."""
        base, n = self.path_base(path), self.layers
        # (policy, layer_key) -> [first layer, layers, layers that build their layout]
        groups: dict[Any, list[int]] = {}
        for i in range(n):
            p = None if cfg is None else cfg.policy_for(i)
            g = groups.setdefault(None if p is None else (p, p.layer_key(i)), [i, 0, 0])
            g[1] += 1
            g[2] += p is not None and cfg.layout_source(i) == i  # share_layers: others reuse
        measured = [(count, builds, self.group(path, cfg, li, f"{key[0].name}@{li}"))
                    for key, (li, count, builds) in groups.items() if key is not None]
        n_dense = groups.get(None, [0, 0, 0])[1]
        calls, kernels, est_backends, fallbacks = [], set(), {}, set()
        for i, b in enumerate(base):
            mean = lambda f, d: (n_dense * d + sum(k * g[i][f] for k, _, g in measured)) / n  # noqa
            est = sum(e * g[i]["est_ms"] for _, e, g in measured) / n
            entry = {**{k: b[k] for k in ("start", "valid", "dense_ms", "rest_ms")},
                     "est_ms": est, "kernel_ms": mean("kernel_ms", b["dense_ms"]),
                     "attn_ms": mean("attn_ms", b["dense_ms"]), "density": mean("density", 1.0)}
            entry["est_over_dense"] = entry["est_ms"] / b["dense_ms"]
            entry["fallback"] = sorted({g[i]["fallback"] for _, _, g in measured} - {""})
            calls.append(entry)
            kernels |= {g[i]["kernel_backend"] for _, _, g in measured}
            for _, _, g in measured:
                est_backends.update(g[i]["est_backends"])
            fallbacks |= set(entry["fallback"])
        if n_dense:
            kernels |= {b["dense_backend"] for b in base}
        starts = np.asarray([c["start"] for c in calls], np.float64)
        ends = starts + [c["valid"] for c in calls]
        weight = ends ** 2 - starts ** 2  # ~ causal pairs per call
        big = [c["est_over_dense"] for c in calls if c["start"] + c["valid"] >= 32768]
        total = lambda f: sum(c[f] for c in calls)  # noqa: E731
        return {"density": float((weight * [c["density"] for c in calls]).sum() / weight.sum()),
                "est_ms": total("est_ms"), "kernel_ms": total("kernel_ms"),
                "attn_ms": total("attn_ms"), "dense_ms": total("dense_ms"),
                "rest_ms": total("rest_ms"), "est_over_dense": [c["est_over_dense"] for c in calls],
                "est_over_dense_max_32k": max(big) if big else None,
                "kernel_backends": sorted(kernels), "est_backends": est_backends,
                "fallback": sorted(fallbacks), "dense_layers": n_dense,
                "groups": [{"policy": k[0].name, "layer": li, "layers": cnt, "builds": e}
                           for k, (li, cnt, e) in groups.items() if k is not None],
                "chunks": calls}


def policy_spec(name: str, tiny: bool) -> Any:
    """A --policies entry -> EngineConfig.sparse (None: dense)."""
    if name == "dense" or name.endswith((".yaml", ".yml")):
        return None if name == "dense" else name
    if tiny:  # a name:key=value spec keeps its parameters over the tiny ones
        base = name.partition(":")[0]
        given = policy_config(name).policy_for(0) if ":" in name else None
        params = {f: getattr(given, f) for f in (spec_fields(name) if given else ())}
        return {"policy": base, **TINY, "params": {**TINY_PARAMS.get(base, {}), **params}}
    return policy_config(name)


def spec_fields(spec: str) -> list[str]:
    """The parameter names a name:key=value spec sets."""
    return [item.partition("=")[0] for item in spec.partition(":")[2].split(",") if item]


def load(args: argparse.Namespace) -> tuple[Any, list[int], str]:
    """(model, prompt token ids, description)."""
    source = args.model or args.gguf
    if source:
        model, tok = jp.load(source, adapter=args.adapter, dtype=args.dtype)
        if type(model).__name__ != "Llama":
            raise ValueError(f"{source}: {type(model).__name__} models are not covered (the "
                             "rest-of-layer timing follows the Llama block)")
        ids = prompt_tokens(tok, args.seq, task=args.task)[0].tolist()
        with_adapter = f" + adapter {args.adapter}" if args.adapter else ""
        return model, ids, (f"{source}{with_adapter} ({model.config.num_layers} layers), "
                            f"{args.task} prompt")
    cfg = llama3_8b_shapes(args.layers or 2, args.tiny)
    model, weights = random_llama(cfg, jnp.dtype(args.dtype), args.weights)
    ids = np.random.default_rng(0).integers(1, cfg.vocab_size, args.seq).tolist()
    what = "tiny Llama" if args.tiny else "Llama-3-8B shapes"
    return model, ids, f"{what}, {cfg.num_layers} layers, {weights}, random tokens"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_source(p)
    p.add_argument("--layers", type=int, help="layers of the random model (default 2)")
    add_weights_arg(p)
    p.add_argument("--layer", type=int, help="the layer whose q/k/v the stages use (default: "
                   "the middle one)")
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--reps", type=int, default=3, help="engine TTFT runs after the warm-up")
    p.add_argument("--stage-reps", type=int, default=5, help="samples per stage timing")
    p.add_argument("--sample-ms", type=float, default=20.0, help="time_ms sample length")
    p.add_argument("--paths", nargs="+", default=["chunked", "row"], choices=["chunked", "row"])
    p.add_argument("--policies", nargs="+", default=list(POLICIES),
                   help="policy names, YAML files or name:key=value specs (dense is added first)")
    p.add_argument("--extent", choices=["bucket", "full"], default="bucket",
                   help="chunked path: Estimation.extent of every sparse policy")
    p.add_argument("--dtype", choices=["bfloat16", "float32"],
                   help="compute dtype (default bfloat16; float32 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke test)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    for flag in ("seq", "chunk", "reps", "stage_reps", "layers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.chunk % 64:
        p.error(f"--chunk must be a multiple of 64 (the engine's page size), got {args.chunk}")
    if args.layers is not None and (args.model or args.gguf):
        p.error("--layers sizes the random model; a real model runs all its layers")
    if args.adapter and not (args.model or args.gguf):
        p.error("--adapter needs --model or --gguf (the random model takes none)")
    args.policies = ["dense"] + [n for n in args.policies if n != "dense"]
    return args


def markdown(result: dict) -> str:
    h = result["header"]
    cudnn = f"{h['cudnn_ms']:.2f} ms" if h["cudnn_ms"] is not None else f"- ({h['cudnn_note']})"
    lines = [f"device: {result['device']}, jax {result['jax']}, {h['model']}; prompt "
             f"{h['seq']} tokens, chunk {h['chunk']}; stages on layer {h['layer']}; cuDNN "
             f"causal attention over the prompt: {cudnn}",
             "", "Stage times are per layer, summed over the calls. outside = TTFT(dense) - "
             "layers x (dense + rest) of the path."]
    lines += [f"outside_ms < 0 on the {k} path ({v:.1f} ms): its stages sum to more than the "
              "engine's dense TTFT." for k, v in h["outside_ms"].items() if v < 0]
    lines += ["", "| path | policy | density | TTFT ms | sparse / dense | predicted ms | actual "
              "/ predicted | est ms | kernel ms | whole call ms | dense attn ms | rest ms | max "
              "est / dense (>= 32K) | backends | dense calls (why) |", "|" + "---|" * 15]
    f = lambda x, p=2: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['path']} | {r['policy']} | error: {r['error'][:80]} |")
            continue
        lines.append(
            f"| {r['path']} | {r['policy']} | {r['density']:.3f} | {r['ttft_ms']:.1f} | "
            f"{f(r['sparse_over_dense'])} | {f(r['predicted_ms'], 1)} | "
            f"{f(r['actual_over_predicted'])} | {r['est_ms']:.2f} | {r['kernel_ms']:.2f} | "
            f"{r['attn_ms']:.2f} | {r['dense_ms']:.2f} | {r['rest_ms']:.2f} | "
            f"{f(r['est_over_dense_max_32k'], 3)} | {', '.join(r['kernel_backends'])}; "
            f"{', '.join(f'{k}: {v}' for k, v in r['est_backends'].items()) or 'no estimation'}"
            f" | {'; '.join(r['fallback']) or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        model, ids, what = load(args)
        layer = model.config.num_layers // 2 if args.layer is None else args.layer
        if not 0 <= layer < model.config.num_layers:
            raise ValueError(f"--layer {layer}: the model has layers 0.."
                             f"{model.config.num_layers - 1}")
        if "chunked" in args.paths and len(ids) <= args.chunk:
            raise ValueError(f"--chunk {args.chunk} >= the prompt's {len(ids)} tokens: the "
                             "engine prefills it as one row (lower --chunk, or --paths row)")
        bucket = buckets(len(ids), args.chunk)
        configs = {name: {p: engine_config(args.chunk if p == "chunked" else bucket[p], bucket[p],
                                           path_spec(policy_spec(name, args.tiny), p, args.extent))
                          for p in args.paths}
                   for name in args.policies}
    except (ValueError, OSError) as e:  # bad flags, configs or model paths: one line
        print(f"{NAME}: {e}", file=sys.stderr)
        return 2
    print(f"{what}: {len(ids)} prompt tokens, setup {time.perf_counter() - t0:.1f}s; "
          f"{jax.devices()[0].device_kind}", flush=True)
    bench = Bench(args, model, ids, layer)
    header = {"model": what, "seq": bench.seq, "chunk": args.chunk, "bucket": bucket,
              "layers": bench.layers, "layer": layer, **bench.cudnn(), "outside_ms": {}}
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d"), "args": {k: str(v) for k, v in vars(args).items()},
              "header": header, "rows": []}
    for path in args.paths:
        dense_ttft = outside = None
        for name in args.policies:
            row: dict[str, Any] = {"policy": name, "path": path}
            try:
                engine = Engine(model, None, configs[name][path])
                med, times = ttft(engine, ids, args.reps)
                row.update(ttft_ms=med * 1e3, ttft_runs_ms=[t * 1e3 for t in times],
                           engine_stats=dict(engine.stats))
                bench.engine_ran(path, engine.stats)
                header["row_kind"] = bench.row_kind
                del engine
                row.update(bench.stages(path, configs[name][path].sparse))
                per_layer = sum(c["est_ms"] + c["kernel_ms"] + c["rest_ms"] for c in row["chunks"])
                if name == "dense":
                    dense_ttft = row["ttft_ms"]
                    outside = header["outside_ms"][path] = dense_ttft - bench.layers * per_layer
                predicted = None if outside is None else bench.layers * per_layer + outside
                row.update(outside_ms=outside, predicted_ms=predicted,
                           actual_over_predicted=None if predicted is None
                           else row["ttft_ms"] / predicted,
                           sparse_over_dense=None if dense_ttft is None
                           else row["ttft_ms"] / dense_ttft)
            except Exception as e:  # report, never skip silently
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            result["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "chunks"}), flush=True)
            (args.out / f"{NAME}.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (args.out / f"{NAME}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
