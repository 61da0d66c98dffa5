"""GPU equivalence check of the block-sparse Pallas GPU kernels (run on the H100).

    python -m scripts.checks.check_kernels_gpu [--out DIR] [--max-seq 32768]
        [--impls triton mosaic_gpu] [--mosaic-kw JSON] [--triton-kw JSON] [--columns-only]

``--impls``: ``triton`` (the Pallas Triton-lowering kernel) and ``mosaic_gpu`` (the Pallas Mosaic
GPU kernel, sm90; ``mosaic`` and ``pallas_mosaic`` are accepted for it, ``pallas_gpu`` for
``triton``). Cases the Mosaic kernel does not take (blocks, dtypes, shared memory: its
``unsupported`` reason) are reported as skipped, not passed. ``--mosaic-kw``: fields of
``BlockSparseMosaicConfig`` (``num_stages``, ``persistent``, ``order``) set in every Mosaic call;
``--triton-kw``: keywords of the Triton kernel (``block_m``, ``num_warps``, ``num_stages``,
``pack_gqa``, ``f32_dot``) in every Triton call. ``--interpret``: a CPU smoke run of the
Triton cases in interpret mode (add ``--max-seq 0`` to leave out the long cases).

Each case draws fresh random inputs and a random layout, runs the kernel with its outputs
poisoned (NaN-filled buffers aliased to the outputs, so unwritten elements stay NaN) and
compares with a float64 NumPy reference (small cases) or the float32 XLA block-gather
implementation on the GPU (large cases; itself checked against float64 NumPy in the CPU tests).
Prints one line per case and writes ``check_kernels_gpu.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import BlockSparseLayout, SegmentIds, block_sparse_attention, with_columns
from pallas_kernels.attention import block_sparse_backend
from pallas_kernels.gpu import block_sparse_mosaic as mosaic
from pallas_kernels.gpu.block_sparse_triton import block_sparse_attention_triton
from pallas_kernels.layout import random_block_mask
from pallas_kernels.testing import random_problem
from pallas_kernels.xla.block_sparse_xla import block_sparse_attention_xla
from scripts.common.impl_names import canonical

CASES = [
    # name, kwargs for random_problem, kwargs for the kernel
    ("odd1000_gqa4_kvhead_seg_bf16", dict(B=2, Sq=1000, Sk=1000, Hq=8, Hkv=2, Dqk=128, Dv=128,
                                          segments=True, per_kv_head=True), {}),
    ("odd1000_gqa4_kvhead_seg_bf16_packed", dict(B=2, Sq=1000, Sk=1000, Hq=8, Hkv=2, Dqk=128,
                                                 Dv=128, segments=True, per_kv_head=True),
     dict(pack_gqa=True)),
    ("chunk64_gqa4_kvhead_bq32_packed", dict(B=2, Sq=64, Sk=2000, Hq=8, Hkv=2, Dqk=128, Dv=128,
                                             q_offset="chunk", block_q=32, block_k=64), {}),
    ("odd1000_gqa4_qhead_chunk_bf16", dict(B=2, Sq=300, Sk=1000, Hq=8, Hkv=2, Dqk=128, Dv=128,
                                           q_offset="chunk", per_kv_head=False), {}),
    ("mla_192_128_bf16", dict(B=1, Sq=777, Sk=777, Hq=4, Hkv=4, Dqk=192, Dv=128), {}),
    ("gqa8_noncausal_bf16", dict(B=1, Sq=512, Sk=640, Hq=8, Hkv=1, Dqk=64, Dv=64,
                                 causal=False), {}),
    ("f32_gqa4", dict(B=1, Sq=384, Sk=384, Hq=4, Hkv=1, Dqk=64, Dv=64, dtype=np.float32,
                      block_q=64, block_k=64), {}),
    # float32: the default three-TF32 dots at D=128 (64-row programs), and exact dots.
    ("f32_d128_gqa4_odd", dict(B=1, Sq=515, Sk=515, Hq=8, Hkv=2, Dqk=128, Dv=128,
                               dtype=np.float32), {}),
    ("f32_gqa4_ieee", dict(B=1, Sq=384, Sk=384, Hq=4, Hkv=1, Dqk=64, Dv=64, dtype=np.float32,
                           block_q=64, block_k=64), dict(triton=dict(f32_dot="ieee"))),
    # Mosaic GPU tiles: a 256-position layout block is two CTA tiles sharing one list;
    # block_k 64; head dims that are not multiples of 64 (zero-padded); 3-stage ring.
    ("bq256_bk64_odd_chunk_gqa2_bf16", dict(B=2, Sq=700, Sk=1300, Hq=4, Hkv=2, Dqk=128,
                                            Dv=128, block_q=256, block_k=64,
                                            q_offset="random", per_kv_head=False), {}),
    # (5 query blocks, no forced empty rows: with 3 blocks ~5% of draws had no attended key)
    ("d80_dv48_seg_noncausal_bf16", dict(B=1, Sq=555, Sk=555, Hq=2, Hkv=1, Dqk=80, Dv=48,
                                         segments=True, causal=False, empty_row_frac=0.0), {}),
    ("fp16_gqa4_stages3", dict(B=1, Sq=515, Sk=515, Hq=8, Hkv=2, Dqk=64, Dv=64,
                               dtype=np.float16), dict(mosaic=dict(num_stages=3))),
    # Mosaic launch variants (BlockSparseMosaicConfig): one CTA per tile (the default) with
    # segments, the all-heads-first tile order, the persistent grid, a 3-stage ring with
    # 256-row blocks.
    ("odd1000_seg_gqa4_onecta_per_tile", dict(B=2, Sq=1000, Sk=1000, Hq=8, Hkv=2, Dqk=128,
                                              Dv=128, segments=True),
     dict(mosaic=dict(persistent=False))),
    ("mla_chunk_order_heads", dict(B=2, Sq=500, Sk=900, Hq=4, Hkv=4, Dqk=192, Dv=128,
                                   q_offset="chunk"),
     dict(mosaic=dict(order="heads"))),
    ("mla_chunk_persistent", dict(B=2, Sq=500, Sk=900, Hq=4, Hkv=4, Dqk=192, Dv=128,
                                  q_offset="chunk"),
     dict(mosaic=dict(persistent=True))),
    ("bq256_bk64_stages3", dict(B=1, Sq=700, Sk=1300, Hq=4, Hkv=2, Dqk=64, Dv=64,
                                block_q=256, block_k=64, q_offset="random"),
     dict(mosaic=dict(num_stages=3))),
]


def rel_err(out, ref):
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


INTERPRET = False  # --interpret: CPU smoke test of this script (small cases only)
KERNELS = {"triton": block_sparse_attention_triton,
           "mosaic_gpu": mosaic.block_sparse_attention_mosaic}
# Kernel options that only one implementation takes: a case's shared options (the top level of
# its kernel_kw) go to both kernels, minus these of the other kernel.
TRITON_ONLY = ("pack_gqa", "block_m", "num_warps", "f32_dot")
MOSAIC_ONLY = ("num_stages",)


EXTRA = {"mosaic": {}, "triton": {}}  # --mosaic-kw / --triton-kw: an experiment in every call


def kernel_kwargs(impl, kernel_kw):
    """Per-impl options: ``kernel_kw`` may hold ``mosaic=dict(...)`` / ``triton=dict(...)``.
    The Mosaic kernel's become its ``config`` (a ``BlockSparseMosaicConfig``)."""
    key = "mosaic" if impl == "mosaic_gpu" else impl
    drop = TRITON_ONLY if key == "mosaic" else MOSAIC_ONLY
    kw = {k: v for k, v in kernel_kw.items() if k not in ("mosaic", "triton", *drop)}
    kw.update(kernel_kw.get(key, {}))
    kw.update(EXTRA[key])
    return dict(config=mosaic.BlockSparseMosaicConfig(**kw)) if key == "mosaic" else kw


def check_small(name, kw, kernel_kw, results, impl="triton"):
    dtype = kw.pop("dtype", jnp.bfloat16)
    kw.setdefault("block_q", 128)
    kw.setdefault("block_k", 128)
    if impl == "triton" and "mosaic" in kernel_kw:
        return  # a mosaic-only variant
    p = random_problem(int(time.time_ns() % 2**31), density=0.5, dtype=dtype, **kw)
    lay = BlockSparseLayout.from_block_mask(p.block_mask, p.block_q, p.block_k)
    q, k, v = jnp.asarray(p.q), jnp.asarray(p.k), jnp.asarray(p.v)
    options = kernel_kwargs(impl, kernel_kw)
    if impl == "mosaic_gpu":
        reason = mosaic.unsupported(q, k, v, lay, options["config"])
        if reason is not None:
            results.append(dict(name=f"{impl}:{name}", ok=None, skipped=reason))
            print(f"SKIP {impl}:{name} (the kernel does not take it: {reason})", flush=True)
            return
    seg = None if p.seg_q is None else SegmentIds(jnp.asarray(p.seg_q), jnp.asarray(p.seg_kv))
    extra = dict(interpret=INTERPRET) if impl == "triton" else {}
    out, lse = KERNELS[impl](
        q, k, v, lay, causal=p.causal, q_offset=jnp.asarray(p.q_offset), segment_ids=seg,
        poison_output=True, **extra, **options)
    ref_out, ref_lse = p.reference()
    record(f"{impl}:{name}", out, lse, ref_out, ref_lse, dtype == np.float32, results)


def check_big(S, Sq, per_kv_head, results, density=0.3, impl="triton", **kernel_kw):
    rng = np.random.default_rng(int(time.time_ns() % 2**31))
    B, Hq, Hkv, D = 1, 32, 8, 128
    H = Hkv if per_kv_head else Hq
    off = S - Sq
    mask = random_block_mask(rng, B, H, Sq, S, 128, 128, density, q_offset=off)
    lay = BlockSparseLayout.from_block_mask(mask, 128, 128)
    keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), 3)
    q = jax.random.normal(keys[0], (B, Sq, Hq, D), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, S, Hkv, D), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, S, Hkv, D), jnp.bfloat16)
    out, lse = KERNELS[impl](q, k, v, lay, q_offset=off, poison_output=True,
                             **kernel_kwargs(impl, kernel_kw))
    ref = jax.jit(block_sparse_attention_xla)
    ref_out, ref_lse = ref(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                           lay, q_offset=off)
    name = f"{impl}:S{S}_Sq{Sq}_{'kvhead' if per_kv_head else 'qhead'}_d{density}{kernel_kw or ''}"
    record(name, out, lse, np.asarray(ref_out), np.asarray(ref_lse), False, results,
           low_precision=True)


def record(name, out, lse, ref_out, ref_lse, is_f32, results, low_precision=None):
    out = np.asarray(jnp.asarray(out, jnp.float32))
    lse = np.asarray(lse)
    low = (not is_f32) if low_precision is None else low_precision
    nan = int(np.isnan(out).sum() + np.isnan(lse).sum())
    err = rel_err(out, ref_out)
    empty = np.isneginf(ref_lse)
    lse_ok = bool(np.array_equal(np.isneginf(lse), empty))
    lse_err = float(np.max(np.abs(lse[~empty] - ref_lse[~empty]), initial=0.0))
    tol = 1e-2 if low else 1e-4
    ok = nan == 0 and err < tol and lse_ok and lse_err < 1e-2
    results.append(dict(name=name, rel_err=err, nan=nan, lse_inf_match=lse_ok,
                        lse_max_abs_err=lse_err, tol=tol, ok=ok))
    print(f"{'PASS' if ok else 'FAIL'} {name:40s} rel_err={err:.2e} nan={nan} "
          f"lse_inf_match={lse_ok} lse_err={lse_err:.1e}", flush=True)


# --------------------------- column path and BLASST (Triton kernel; Mosaic GPU: columns merged)
def check_columns_blasst(results):
    """Column-path and BLASST cases of the Triton kernel (poisoned outputs): small cases against
    float64 NumPy / the jnp reference, a 32K MInference-like layout against float32 XLA. The
    column cases also run Mosaic GPU over the blocks with the columns merged outside it
    (``impl="mosaic_gpu"``; skipped where it declines, e.g. float32 or 64-query blocks)."""
    from pallas_kernels.reference import block_sparse_attention_reference, blasst_skip_stats

    def run(name, p, ref, **kw):
        seg = None if p.seg_q is None else SegmentIds(jnp.asarray(p.seg_q), jnp.asarray(p.seg_kv))
        out, lse = block_sparse_attention_triton(
            jnp.asarray(p.q), jnp.asarray(p.k), jnp.asarray(p.v), p.layout(), causal=p.causal,
            q_offset=jnp.asarray(p.q_offset), segment_ids=seg, poison_output=True,
            interpret=INTERPRET, **kw)
        record(f"triton:{name}", out, lse, np.asarray(ref[0], np.float64),
               np.asarray(ref[1], np.float64), p.q.dtype == np.float32, results)

    def run_merged(name, p, ref):
        """Mosaic GPU over the blocks, the columns merged outside it (column_merge)."""
        seg = None if p.seg_q is None else SegmentIds(jnp.asarray(p.seg_q), jnp.asarray(p.seg_kv))
        args = (jnp.asarray(p.q), jnp.asarray(p.k), jnp.asarray(p.v), p.layout())
        try:
            if INTERPRET:
                raise ValueError("Mosaic GPU has no interpret mode on a CPU here")
            block_sparse_backend(*args, impl="mosaic_gpu")
        except ValueError as e:
            results.append(dict(name=f"mosaic_gpu_merged:{name}", ok=None, skipped=str(e)))
            print(f"SKIP mosaic_gpu_merged:{name}: {e}", flush=True)
            return
        out, lse = block_sparse_attention(*args, causal=p.causal, segment_ids=seg,
                                          q_offset=jnp.asarray(p.q_offset), return_lse=True,
                                          impl="mosaic_gpu")
        record(f"mosaic_gpu_merged:{name}", out, lse, np.asarray(ref[0], np.float64),
               np.asarray(ref[1], np.float64), p.q.dtype == np.float32, results)

    cases = [("cols_odd1000_gqa4_kvhead_seg", dict(B=2, Sq=1000, Sk=1000, Hq=8, Hkv=2,
                                                   segments=True, block_q=128, block_k=64)),
             ("cols_odd1000_gqa4_kvhead_packed_bq64", dict(B=2, Sq=1000, Sk=1000, Hq=8, Hkv=2,
                                                     per_kv_head=True, block_q=64, block_k=64)),
             ("cols_chunk300_gqa3_qhead", dict(B=2, Sq=300, Sk=1000, Hq=6, Hkv=2,
                                               per_kv_head=False, q_offset="chunk")),
             ("cols_f32_gqa4", dict(B=1, Sq=384, Sk=384, Hq=4, Hkv=1, dtype=np.float32,
                                    block_q=64, block_k=64))]
    for name, kw in cases:
        kw = dict(kw)
        kw.setdefault("block_q", 128)
        kw.setdefault("block_k", 128)
        p = random_problem(int(time.time_ns() % 2**31), Dqk=128, Dv=128, density=0.2,
                           columns=150, col_only_frac=0.2, **{"dtype": jnp.bfloat16, **kw})
        run(name, p, p.reference(), **({"pack_gqa": True} if "packed" in name else {}))
        run_merged(name, p, p.reference())
        # BLASST on the same problem (peaky logits), against the jnp reference's rule.
        p.q = (p.q.astype(np.float32) * 3).astype(p.q.dtype)
        for lam in (0.0, 0.05):
            seg = None if p.seg_q is None else SegmentIds(jnp.asarray(p.seg_q),
                                                          jnp.asarray(p.seg_kv))
            ref = block_sparse_attention_reference(
                jnp.asarray(p.q), jnp.asarray(p.k), jnp.asarray(p.v), p.layout(),
                q_offset=jnp.asarray(p.q_offset), segment_ids=seg, blasst_threshold=lam)
            run(f"{name}_blasst{lam}", p, ref, blasst_threshold=lam)
            if lam:
                stats = blasst_skip_stats(
                    jnp.asarray(p.q), jnp.asarray(p.k), jnp.asarray(p.v), p.layout(), lam,
                    q_offset=jnp.asarray(p.q_offset), segment_ids=seg)
                results[-1]["skip_stats"] = stats
                print(f"     skipped: {stats}", flush=True)
    if INTERPRET:
        return
    # 32K, Llama-3-8B heads: blocks + 600 shared vertical columns per head, against f32 XLA.
    rng = np.random.default_rng(int(time.time_ns() % 2**31))
    S, Hq, Hkv, D = 32768, 32, 8, 128
    for per_kv in (True, False):
        H = Hkv if per_kv else Hq
        mask = random_block_mask(rng, 1, H, S, S, 128, 128, 0.05)
        lay = BlockSparseLayout.from_block_mask(mask, 128, 128)
        lay = with_columns(lay, rng.integers(0, S, (1, H, 1, 600)), seq_q=S)
        keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), 3)
        q = jax.random.normal(keys[0], (1, S, Hq, D), jnp.bfloat16)
        k = jax.random.normal(keys[1], (1, S, Hkv, D), jnp.bfloat16)
        v = jax.random.normal(keys[2], (1, S, Hkv, D), jnp.bfloat16)
        out, lse = block_sparse_attention_triton(q, k, v, lay, poison_output=True)
        ref = jax.jit(block_sparse_attention_xla)(*(x.astype(jnp.float32) for x in (q, k, v)),
                                                  lay)
        record(f"triton:cols_S{S}_{'kvhead' if per_kv else 'qhead'}_600cols", out, lse,
               np.asarray(ref[0]), np.asarray(ref[1]), False, results, low_precision=True)
        out, lse = block_sparse_attention(q, k, v, lay, return_lse=True, impl="mosaic_gpu")
        record(f"mosaic_gpu_merged:cols_S{S}_{'kvhead' if per_kv else 'qhead'}_600cols", out,
               lse, np.asarray(ref[0]), np.asarray(ref[1]), False, results, low_precision=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--max-seq", type=int, default=32768)
    ap.add_argument("--interpret", action="store_true")
    ap.add_argument("--columns-only", action="store_true",
                    help="only the column-path and BLASST cases (Triton kernel)")
    ap.add_argument("--impls", nargs="+", default=["triton", "mosaic_gpu"],
                    choices=list(KERNELS), type=canonical,
                    help="triton and/or mosaic_gpu (also spelled mosaic)")
    ap.add_argument("--mosaic-kw", type=json.loads, default={},
                    help="JSON fields of BlockSparseMosaicConfig for every mosaic_gpu call")
    ap.add_argument("--triton-kw", type=json.loads, default={},
                    help="JSON keywords of the Triton kernel for every triton call")
    args = ap.parse_args()
    tuples = lambda kw: {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}  # noqa: E731
    EXTRA["mosaic"], EXTRA["triton"] = tuples(args.mosaic_kw), tuples(args.triton_kw)
    try:
        mosaic.BlockSparseMosaicConfig(**EXTRA["mosaic"])
    except (TypeError, ValueError) as e:
        ap.error(f"--mosaic-kw: {e} (fields: num_stages, persistent, order)")
    global INTERPRET
    INTERPRET = args.interpret
    print("jax", jax.__version__, jax.devices(), flush=True)
    impls = list(dict.fromkeys(args.impls))
    if args.interpret and "mosaic_gpu" in impls:
        impls.remove("mosaic_gpu")
        print("--interpret: mosaic_gpu left out (JAX's Mosaic GPU interpret mode cannot run "
              "the kernel)", flush=True)
    results = []
    for impl in ([] if args.columns_only else impls):
        for name, kw, kernel_kw in CASES:
            try:
                check_small(name, dict(kw), kernel_kw, results, impl=impl)
            except Exception:  # keep going: report every case
                traceback.print_exc()
                results.append(dict(name=f"{impl}:{name}", ok=False,
                                    error=traceback.format_exc(limit=3)))
        for S, Sq, per_kv, kernel_kw in [(4096, 4096, True, {}), (16384, 16384, False, {}),
                                         (32768, 32768, True, {}), (32768, 4096, True, {}),
                                         (32768, 32768, True, dict(pack_gqa=True))]:
            if S > args.max_seq or (impl == "mosaic_gpu" and kernel_kw):
                continue
            try:
                check_big(S, Sq, per_kv, results, impl=impl, **kernel_kw)
            except Exception:
                traceback.print_exc()
                results.append(dict(name=f"{impl}:S{S}", ok=False,
                                    error=traceback.format_exc(limit=3)))
    try:
        if "triton" in args.impls or args.columns_only:  # column/BLASST cases: Triton only
            check_columns_blasst(results)
    except Exception:
        traceback.print_exc()
        results.append(dict(name="triton:columns_blasst", ok=False,
                            error=traceback.format_exc(limit=3)))
    ran = [r for r in results if r["ok"] is not None]  # ok None: skipped (unsupported)
    n_ok = sum(bool(r["ok"]) for r in ran)
    print(f"{n_ok}/{len(ran)} cases passed ({len(results) - len(ran)} skipped)", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "check_kernels_gpu.json", "w") as f:
        json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0]), results=results), f,
                  indent=1)
    return 0 if n_ok == len(ran) else 1


if __name__ == "__main__":
    sys.exit(main())
