"""GPU check of the DSA kernels (DeepSeek-V3.2's indexer top-k and sparse MLA; run on the H100).

    python -m scripts.checks.check_dsa_gpu [--out DIR] [--only TEXT] [--smoke]

Index top-k (`pallas_kernels.dsa_ops.index_topk`, Triton kernels) at V3.2's index shapes (64
heads x 128): with small integer inputs every score is exact in float32 whatever the summation
order, so the kernels must select exactly what the XLA path (`lax.top_k` on the GPU) selects,
index for index, including the tie rule (lower index first): odd lengths, ragged query offsets,
rows shorter than k (k not a power of two), rows longer than one 8K register tile (the segment
tournament), packed segments, FP8, decode (one query per sequence, key splits). FP8 keeps
scores exact only if the per-row scales (amax / 448) are powers of two: its integer inputs put
amax = 7 * 2^e in every row (`fp8_exact_inputs`), so the FP8 scores equal the unquantized ones
(checked: the XLA path selects the same with and without FP8). With normal inputs the selection
must be a top-k of the float32 reference scores up to rounding: bf16, and FP8 against the
reference scores of the same FP8-rounded operands.

Sparse MLA (`sparse_mla`, Triton) at DeepSeek dims (H 128, Dc 512, Dr 64, k 2048) in bf16 with
poisoned outputs, against the float32 reference on the GPU: prefill (one query per program),
decode (split rows), ragged row counts and -1 slots.

Prints one line per case and writes check_dsa_gpu.json; exit status 1 if a case fails.
``--smoke``: the same cases at toy sizes through the kernels in interpret mode on a CPU (checks
the script itself, not the GPU).
"""

from __future__ import annotations

import argparse
import json
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dsa_ops
from pallas_kernels.dsa_reference import (allowed, canonical, fp8_index_inputs,
                                          index_scores_reference, query_positions,
                                          sparse_mla_reference)

TAU = 192 ** -0.5 * (0.1 * np.log(40.0) + 1) ** 2  # DeepSeek-V3's softmax scale

# name, B, S, T, offsets (None: T - S per row), topk, options; case j draws with seed 200 + j
INDEX_CASES = [
    ("index_int_odd_ragged", 2, 300, 4099, (3799, 17), 2048, {}),
    ("index_int_short_rows", 2, 257, 257, (0, 0), 2048, {}),  # every row shorter than k
    ("index_int_long_rows", 1, 64, 40000, None, 2048, {}),  # 8K tiles: 5 segments, then 2
    ("index_int_segments", 2, 700, 700, (0, 0), 128, dict(segments=True)),
    ("index_int_fp8", 2, 300, 5000, None, 2048, dict(fp8=True)),
    ("index_int_decode", 64, 1, 32768, None, 2048, {}),
]
RANDOM_CASES = ["index_bf16_random", "index_fp8_random"]
SPARSE_CASES = [  # name, B, S, H, N (latent rows), K, num_splits
    ("sparse_prefill_h128", 1, 256, 128, 60000, 2048, None),
    ("sparse_decode_h128", 64, 1, 128, 64 * 8192, 2048, None),
    ("sparse_decode_h16_split4", 16, 1, 16, 16 * 8192, 2048, 4),
    ("sparse_prefill_h5_pad", 2, 33, 5, 5000, 700, None),
]
SMOKE_INDEX = dict(b=2, s=37, t=300, hi=8, d=32, topk=20)
SMOKE_SPARSE = dict(h=8, dc=32, dr=16, n=400, k=40)


def index_inputs(seed, b, s, t, hi, d, integer, dtype):
    rng = np.random.default_rng(seed)
    draw = (lambda shape: rng.integers(-2, 3, shape)) if integer else rng.standard_normal
    q = jnp.asarray(draw((b, s, hi, d)), dtype)
    w = jnp.asarray(draw((b, s, hi)), jnp.float32)
    k = jnp.asarray(draw((b, t, d)), dtype)
    return q, w, k


def fp8_exact_inputs(seed, b, s, t, hi, d, dtype):
    """Integer-valued inputs whose FP8 (per-row e4m3) scores are exact: every q and k row is
    2^e (e in -2..2, per row) times integers in -2..2 with one entry +-7, so its scale
    amax / 448 = 2^(e - 6) is a power of two and its e4m3 values are the integers times 64.
    The dots are 4096 n with |n| <= 4 (d - 1) + 49 (< 2^11 at d = 128: exact in TF32 too), every
    product with the scales and every partial head sum exact in float32: the FP8 scores equal
    the unquantized float32 scores, whatever the summation order. With scales amax / 448 that
    are not powers of two (plain integers in -2..2: 1/224) each head's term is rounded, and
    the many exact ties of integer inputs fall either way with the summation order."""
    rng = np.random.default_rng(seed)

    def rows(shape):
        x = rng.integers(-2, 3, shape)
        peak = rng.integers(0, shape[-1], shape[:-1])
        np.put_along_axis(x, peak[..., None], 7 * rng.choice([-1, 1], shape[:-1])[..., None], -1)
        return jnp.asarray(x * 2.0 ** rng.integers(-2, 3, shape[:-1])[..., None], dtype)

    w = jnp.asarray(rng.integers(-2, 3, (b, s, hi)), jnp.float32)
    return rows((b, s, hi, d)), w, rows((b, t, d))


def fp8_scores(q, w, k):
    """float32 [B, S, T]: the reference scores of the FP8-rounded operands (what every backend
    computes with fp8=True, up to summation order)."""
    q8, w8, k8, k_scale = fp8_index_inputs(q, w, k)
    return canonical(index_scores_reference(q8, w8, k8) * k_scale[:, None, :])


def run_index_case(i, name, b, s, t, offsets, topk, opts, smoke):
    hi, d = (SMOKE_INDEX["hi"], SMOKE_INDEX["d"]) if smoke else (64, 128)
    if smoke:  # toy sizes; rows shorter than k stay so (k not a power of two)
        short = t < topk
        b, topk = SMOKE_INDEX["b"], SMOKE_INDEX["topk"]
        t = topk - 3 if short else SMOKE_INDEX["t"]
        s = min(s, SMOKE_INDEX["s"], t)
        offsets = None if offsets is None else tuple(min(o, t - s) for o in offsets)
    fp8 = opts.get("fp8", False)
    if fp8:
        q, w, k = fp8_exact_inputs(200 + i, b, s, t, hi, d, jnp.bfloat16)
    else:
        q, w, k = index_inputs(200 + i, b, s, t, hi, d, True, jnp.bfloat16)
    off = jnp.asarray([t - s] * b if offsets is None else offsets, jnp.int32)
    kw = dict(q_offset=off, fp8=fp8)
    if opts.get("segments"):
        cut = np.random.default_rng(i).integers(1, t, (b, 1))
        seg = jnp.asarray((np.arange(t)[None] >= cut).astype(np.int32))
        kw["segment_ids"] = (seg[:, :s], seg)
    extra = dict(interpret=True, chunk=16, config=dict(block_k=16)) if smoke else {}
    got = jax.jit(lambda q, w, k: dsa_ops.index_topk(q, w, k, topk, impl="triton", **kw,
                                                     **extra))(q, w, k)
    want = jax.jit(lambda q, w, k: dsa_ops.index_topk(q, w, k, topk, impl="xla", **kw))(q, w, k)
    got, want = np.asarray(got), np.asarray(want)
    mismatch = float(np.mean(np.any(got != want, axis=-1)))
    info = dict(rows_differing=mismatch, selected=int((got >= 0).sum()))
    if fp8:  # the inputs' premise: FP8 scores exact, so FP8 selects what float32 selects
        plain = jax.jit(lambda q, w, k: dsa_ops.index_topk(
            q, w, k, topk, impl="xla", **dict(kw, fp8=False)))(q, w, k)
        info["fp8_equals_unquantized"] = bool(np.array_equal(want, np.asarray(plain)))
        return mismatch == 0.0 and info["fp8_equals_unquantized"], info
    return mismatch == 0.0, info


def run_index_random(smoke, fp8):
    """Normal inputs: each selection is a top-k of the float32 reference scores (FP8: of the
    FP8-rounded operands' scores) up to rounding."""
    b, s, t, hi, d, topk = (2, 37, 300, 8, 32, 20) if smoke else (1, 128, 8192, 64, 128, 2048)
    q, w, k = index_inputs(301 if fp8 else 300, b, s, t, hi, d, False, jnp.bfloat16)
    off = jnp.asarray([t - s] * b, jnp.int32)
    extra = dict(interpret=True, chunk=16, config=dict(block_k=16)) if smoke else {}
    idx = np.asarray(dsa_ops.index_topk(q, w, k, topk, q_offset=off, fp8=fp8, impl="triton",
                                        **extra))
    scores = np.asarray(fp8_scores(q, w, k) if fp8 else index_scores_reference(q, w, k))
    ok_mask = np.asarray(allowed(query_positions(b, s, off), t))
    worst = 0.0
    for bb in range(b):
        for i in range(s):
            sel = idx[bb, i][idx[bb, i] >= 0]
            rest = np.setdiff1d(np.nonzero(ok_mask[bb, i])[0], sel)
            if len(sel) != min(topk, ok_mask[bb, i].sum()):
                return False, dict(error=f"row {bb},{i}: {len(sel)} selected")
            if len(rest):
                scale = np.abs(scores[bb, i, sel]).max() + 1e-30
                worst = max(worst, (scores[bb, i, rest].max() - scores[bb, i, sel].min()) / scale)
    return worst < 1e-2, dict(worst_boundary_violation=float(worst))


def run_sparse_case(i, name, b, s, h, n, kk, splits, smoke):
    dc, dr = 512, 64
    if smoke:
        h, dc, dr, n, kk = min(h, SMOKE_SPARSE["h"]), SMOKE_SPARSE["dc"], SMOKE_SPARSE["dr"], \
            SMOKE_SPARSE["n"], SMOKE_SPARSE["k"]
        b = min(b, 4)
    rng = np.random.default_rng(400 + i)
    ql = jnp.asarray(rng.standard_normal((b, s, h, dc)), jnp.bfloat16)
    qp = jnp.asarray(rng.standard_normal((b, s, h, dr)), jnp.bfloat16)
    kv = jnp.asarray(rng.standard_normal((n, dc + dr)), jnp.bfloat16)
    rows = np.full((b, s, kk), -1, np.int32)
    counts = rng.integers(0, kk + 1, (b, s))
    counts.flat[0], counts.flat[-1] = kk, 1
    for bb in range(b):
        for j in range(s):
            rows[bb, j, :counts[bb, j]] = rng.choice(n, counts[bb, j], replace=False)
    rows = jnp.asarray(rows)
    config = dict(poison_output=True) if not smoke else dict(poison_output=True, block_k=16)
    out, lse = jax.jit(lambda *a: dsa_ops.sparse_mla(
        *a, float(TAU), impl="triton", num_splits=splits, interpret=smoke, config=config))(
        ql, qp, kv, rows)
    ref_out, ref_lse = jax.jit(lambda *a: sparse_mla_reference(*a, float(TAU)))(
        *(x.astype(jnp.float32) for x in (ql, qp, kv)), rows)
    out, lse, ref_out, ref_lse = map(np.asarray, (out, lse, ref_out, ref_lse))
    finite = bool(np.all(np.isfinite(out)))
    err = float(np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out))
    fin = np.isfinite(ref_lse)
    lse_ok = bool(np.array_equal(np.isfinite(lse), fin))
    lse_err = float(np.max(np.abs(lse[fin] - ref_lse[fin])))
    return finite and lse_ok and err < 2e-2 and lse_err < 0.2, dict(
        rel_err=err, lse_max_abs_err=lse_err, finite=finite)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--only", default=None, help="run only cases whose name has this text")
    ap.add_argument("--smoke", action="store_true",
                    help="toy sizes, kernels in interpret mode (a CPU run of the script)")
    args = ap.parse_args()
    print("devices:", jax.devices(), "jax", jax.__version__, flush=True)
    # (kind, seed index, case): seeds follow the full list, so --only draws the same inputs
    todo = [("index", j, c) for j, c in enumerate(INDEX_CASES)] + \
        [("index_random", 0, (RANDOM_CASES[0],))] + \
        [("sparse", len(INDEX_CASES) + 1 + j, c) for j, c in enumerate(SPARSE_CASES)] + \
        [("index_random", 0, (name,)) for name in RANDOM_CASES[1:]]
    todo = [t for t in todo if args.only is None or args.only in t[2][0]]
    if not todo:
        ap.error(f"--only {args.only!r} matches no case")
    results, ok_all = [], True
    for kind, i, case in todo:
        try:
            if kind == "index":
                ok, info = run_index_case(i, *case, smoke=args.smoke)
            elif kind == "index_random":
                ok, info = run_index_random(args.smoke, fp8="fp8" in case[0])
            else:
                ok, info = run_sparse_case(i, *case, smoke=args.smoke)
        except Exception:  # noqa: BLE001 - report and continue with the other cases
            traceback.print_exc()
            ok, info = False, dict(error="exception")
        ok_all &= ok
        results.append(dict(case=case[0], ok=ok, **info))
        print(f"{'PASS' if ok else 'FAIL'} {case[0]:26s} {info}", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "check_dsa_gpu.json").write_text(json.dumps(results, indent=1))
    print("ALL PASS" if ok_all else "SOME FAILED")
    return 0 if ok_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
