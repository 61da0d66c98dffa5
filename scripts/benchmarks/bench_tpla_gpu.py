"""TPLA vs MLA decode attention on 2 GPUs (docs/methods/tpla.md), DeepSeek-V3 attention shapes.

  python -m scripts.benchmarks.bench_tpla_gpu --out DIR [--impls auto triton]   # >= 2 GPUs

One decode step of attention (no projections other than W_UV) for batch B at context T, H=128
heads, latent d_c=512, rope d_r=64, d_v=128, bf16 cache in 64-token pages:
  * MLA, tensor parallel over heads: each GPU holds the WHOLE latent cache (replicated) and
    computes H/g heads (`mla_decode`), outputs gathered.
  * TPLA g: each GPU holds 1/g of the latent (+ the replicated RoPE key) and computes ALL heads on
    its slice with its own softmax; partial outputs after W_UV are summed (psum).
Inputs are random (timing only; correctness is tested on the CPU in tests/test_tpla*.py).
Reports the median step time of each and the TPLA speedup (target: >= 1.6x at 32K,
docs/performance.md#tpla), for each `mla_decode` implementation in --impls (auto = the Mosaic
GPU kernel on Hopper; triton, mosaic_gpu, reference; pallas_gpu / pallas_mosaic are accepted
for triton / mosaic_gpu). `--tpla-kw` adds TPLA rows: each JSON dict holds `tpla_decode`'s
`output` and/or knobs of the kernel that runs (fields of `MLADecodeMosaicConfig` for
mosaic_gpu, Triton keywords for triton), e.g. '{"pages_per_step": 2}' '{"output": "heads"}'.
Steps run 20 to a program by default (`--in-program`): dispatching each step from Python leaves
the GPUs idle between TPLA's short steps. `--breakdown` adds the kernel alone and kernel + W_UV
per GPU.
Times: median over 7 samples after 3 warm-up calls (``scripts.common.timing.time_ms``); a sample
is one program of N steps, or 10 queued dispatches with `--in-program 0`.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxprefill.mla.tpla import TPLAConfig, shard_map, tpla_decode
from pallas_kernels import mla_decode, mla_decode_backend
from pallas_kernels.gpu.mla_decode_mosaic import MLADecodeMosaicConfig
from scripts.common.impl_names import canonical
from scripts.common.timing import time_ms

PAGE = 64
TIMING = dict(warmup=3, reps=7)  # time_ms options shared by every row


def in_program(step, n: int):
    """`n` dependent calls of `step` inside one jitted program, as a model's decode step runs
    its attention: no per-call dispatch. Each call's query is offset by a running scalar fed
    from the previous output (a tiny all-reduce per call, the same for every method), so XLA
    can neither hoist nor merge the calls. Returns a function of the step's arguments."""
    @jax.jit
    def run(q, *rest):
        def body(_, s):
            out = step(q + s.astype(q.dtype), *rest)
            return s + 1e-30 * jnp.sum(out.astype(jnp.float32))
        return jax.lax.fori_loop(0, n, body, jnp.zeros((), jnp.float32))
    return run


def tpla_options(kw: dict, impl: str, q_shard: jax.ShapeDtypeStruct,
                 cache_shard: jax.ShapeDtypeStruct) -> dict:
    """`tpla_decode` keywords of a --tpla-kw dict: `output` as is, the kernel knobs as `config`
    for the backend `impl` resolves to on one shard (q_shard [B, H, Dc/g], cache_shard [N, page,
    w])."""
    kw = dict(kw)
    opts = {"output": kw.pop("output")} if "output" in kw else {}
    if kw:
        backend = mla_decode_backend(q_shard, cache_shard, impl=impl)
        if backend == "mosaic_gpu":
            opts["config"] = MLADecodeMosaicConfig(**kw)
        elif backend == "triton":
            opts["config"] = kw
        else:
            raise ValueError(f"--tpla-kw {kw}: {impl!r} runs {backend}, which takes no knobs")
    return opts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--heads", type=int, default=128)
    p.add_argument("--impls", nargs="+", default=["auto", "triton"], type=canonical,
                   help="mla_decode implementations: auto, triton, mosaic_gpu, reference")
    p.add_argument("--tpla-kw", type=json.loads, nargs="*", default=[],
                   help='extra TPLA rows, one per JSON dict of tpla_decode output / kernel '
                        'knobs, for each impl, e.g. \'{"pages_per_step": 2}\' '
                        '\'{"output": "heads"}\'')
    p.add_argument("--in-program", type=int, default=20, metavar="N",
                   help="time N dependent steps inside one program, reported per step (as a "
                        "model's decode step runs its attention); 0: one dispatch per step, "
                        "which on 2 x H200 costs about as much as TPLA's kernel at 16-64 heads "
                        "and made those timings vary by 1.7x (2026-11-24, docs/history.md)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the default TPLA step's parts: the kernel alone on each "
                        "GPU, then with the W_UV einsum (no cross-GPU sum)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    g = 2
    devices = jax.devices()[:g]
    assert len(devices) == g, f"needs {g} GPUs, found {jax.devices()}"
    mesh = Mesh(np.asarray(devices), ("tensor",))
    b, t, h, dc, dr, dv = args.batch, args.context, args.heads, 512, 64, 128
    pages_per_seq = t // PAGE
    n_pages = b * pages_per_seq
    key = iter(jax.random.split(jax.random.key(0), 16))
    rnd = lambda shape, dt=jnp.bfloat16: jax.random.normal(next(key), shape, jnp.float32).astype(dt)  # noqa: E731
    table = jnp.arange(n_pages, dtype=jnp.int32).reshape(b, pages_per_seq)
    lengths = jnp.full((b,), t, jnp.int32)
    q_lat, q_pe = rnd((b, h, dc)), rnd((b, h, dr))
    w_uv = rnd((dc, h, dv), jnp.float32)
    scale = (dc // 4 + dr) ** -0.5
    rows = []
    n_in = args.in_program

    def step_ms(step, *a) -> float:
        """Milliseconds per step: n_in steps per program (--in-program), else one step per
        dispatch, 10 dispatches queued per sample (overlapped, as in a decode loop)."""
        if n_in:
            return time_ms(in_program(step, n_in), *a, **TIMING).ms / n_in
        return time_ms(step, *a, calls=10, **TIMING).ms

    # MLA: latent cache replicated, heads split over the 2 GPUs.
    cache = jax.device_put(rnd((n_pages, PAGE, dc + dr)), NamedSharding(mesh, P()))
    ql = jax.device_put(q_lat, NamedSharding(mesh, P(None, "tensor", None)))
    qp = jax.device_put(q_pe, NamedSharding(mesh, P(None, "tensor", None)))
    wuv = jax.device_put(w_uv, NamedSharding(mesh, P(None, "tensor", None)))

    def mla_step(impl):
        @jax.jit
        @partial(shard_map, mesh=mesh, in_specs=(P(None, "tensor", None),
                                                  P(None, "tensor", None), P(), P(), P(),
                                                  P(None, "tensor", None)),
                 out_specs=P(None, "tensor", None), check_vma=False)
        def step(ql, qp, pg, tbl, lens, wuv):
            out_lat, _ = mla_decode(ql, qp, pg, tbl, lens, scale, impl=impl)
            return jnp.einsum("bhc,chv->bhv", out_lat, wuv)
        return step

    cache_bytes = n_pages * PAGE * (dc + dr) * 2
    t_mla, mla_steps = {}, {}
    for impl in args.impls:
        try:
            mla_steps[impl] = mla_step(impl)  # kept: timed again after TPLA, no recompile
            t_mla[impl] = step_ms(mla_steps[impl], ql, qp, cache, table, lengths, wuv)
            rows.append({"method": "MLA, heads split, latent replicated", "impl": impl,
                         "ms": t_mla[impl], "cache_bytes_per_gpu": cache_bytes})
        except Exception as e:  # noqa: BLE001
            rows.append({"method": "MLA", "impl": impl,
                         "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(rows[-1], flush=True)

    # TPLA g=2: each GPU holds its latent slice + the replicated RoPE key, all heads.
    w = dc // g + dr
    tcfg = TPLAConfig(transform="hadamard", rope="replicated", norm="global", logit_scale="1")
    pages = jax.device_put(rnd((n_pages, PAGE, g * w)), NamedSharding(mesh, P(None, None, "tensor")))
    ql2 = jax.device_put(q_lat, NamedSharding(mesh, P(None, None, "tensor")))
    wuv2 = jax.device_put(w_uv, NamedSharding(mesh, P("tensor", None, None)))
    t_tpla = {}
    variants = [(impl, impl, {}) for impl in args.impls]
    variants += [(f"{impl} {json.dumps(kw)}", impl, kw) for kw in args.tpla_kw
                 for impl in args.impls]
    q_shard = jax.ShapeDtypeStruct((b, h, dc // g), jnp.bfloat16)
    cache_shard = jax.ShapeDtypeStruct((n_pages, PAGE, w), jnp.bfloat16)
    for name, impl, kw in variants:
        try:
            opts = tpla_options(kw, impl, q_shard, cache_shard)
            step = jax.jit(lambda a, b_, c, d, e, f, impl=impl, opts=opts: tpla_decode(
                a, b_, c, d, e, f, mesh=mesh, tcfg=tcfg, sm_scale=scale, impl=impl, **opts))
            t_tpla[name] = step_ms(step, ql2, q_pe, pages, table, lengths, wuv2)
            rows.append({"method": f"TPLA g={g}", "impl": name, "ms": t_tpla[name],
                         "cache_bytes_per_gpu": n_pages * PAGE * w * 2})
        except Exception as e:  # noqa: BLE001
            rows.append({"method": "TPLA", "impl": impl,
                         "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(rows[-1], flush=True)

    if args.breakdown:  # where the step's time goes beyond the kernel (no collective here)
        for impl in args.impls:
            for part in ("kernel", "kernel + W_UV"):
                @jax.jit
                @partial(shard_map, mesh=mesh,
                         in_specs=(P(None, None, "tensor"), P(), P(None, None, "tensor"), P(),
                                   P(), P("tensor", None, None)),
                         out_specs=P("tensor", None, None), check_vma=False)
                def local(ql_, qp_, pg, tbl, lens, wuv_, impl=impl, part=part):
                    out_lat, _ = mla_decode(ql_, qp_, pg, tbl, lens, scale, impl=impl)
                    if part == "kernel":
                        return out_lat  # [B, H, d_c / g] per GPU, stacked over the batch axis
                    return jnp.einsum("bhc,chv->bhv", out_lat, wuv_.astype(jnp.float32))
                try:
                    ms = step_ms(local, ql2, q_pe, pages, table, lengths, wuv2)
                    rows.append({"method": f"TPLA g={g} part: {part}", "impl": impl, "ms": ms})
                except Exception as e:  # noqa: BLE001
                    rows.append({"method": f"TPLA part: {part}", "impl": impl,
                                 "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(rows[-1], flush=True)

    # MLA again after TPLA (the first variant timed in a process tends to read slower): the
    # speedup uses MLA's faster time, the conservative choice for TPLA.
    for impl in list(t_mla):
        again = step_ms(mla_steps[impl], ql, qp, cache, table, lengths, wuv)
        rows.append({"method": "MLA, heads split, latent replicated (again)", "impl": impl,
                     "ms": again, "cache_bytes_per_gpu": cache_bytes})
        print(rows[-1], flush=True)
        t_mla[impl] = min(t_mla[impl], again)
    speedup = {name: t_mla[impl] / t_tpla[name] for name, impl, _ in variants
               if impl in t_mla and name in t_tpla}
    result = {"device": jax.devices()[0].device_kind, "n_devices": len(jax.devices()),
              "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "batch": b, "context": t,
              "heads": h, "in_program": n_in, "rows": rows, "tpla_speedup": speedup}
    (args.out / "bench_tpla_gpu.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
