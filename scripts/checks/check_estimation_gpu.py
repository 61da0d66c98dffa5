"""GPU check of the sparse-estimation kernels (run on the H100).

    python -m scripts.checks.check_estimation_gpu [--out DIR]

1. ``last_query_sums`` (``impl="triton"``: the Pallas Triton kernel) against the float32
   reference on fresh random inputs: odd lengths, rows shorter than R, GQA 4 and 3, bf16 and
   f32, R = 64 and 128.
2. ``pooled_block_scores`` (``impl="triton"``) against the XLA estimator
   ``block_softmax_scores`` (a geometry with ``Estimation(impl="xla")``): sum and max pooling,
   strides 8 and 16, GQA 4.
3. ``mass_cut`` (``impl="triton"``: the cut of a cumulative-mass selection) against the
   float32 reference bit search: register-resident rows (<= 16384 entries) and wide rows (the
   one-program-per-row kernel: FlexPrefill's query-aware rows at 32K tokens [1, 9, 65536], an
   odd width), each differing row also checked to be a cut within float rounding (float64
   sums); then ``select.mass_count`` (FlexPrefill's budget) through the kernel against the XLA
   search and the sort at [2, 1, 9, 32768] (the stacked vertical / slash budgets at 32K); then
   the weighted cut of FlexPrefill's chunk rows at 128K tokens (``uniform_prefix_cut``: 32
   heads, 1024 uniform prefix rows + 128 x 1024 pooled scores, the wide kernel) against the
   weighted reference and the XLA search, checked the same way.
4. Every policy that uses them builds its layout with the kernels (``estimation="auto"``, the
   Triton kernels on GPUs) and with the XLA estimators (``estimation="xla"``) at 16K tokens
   (structured q/k, bf16): the fraction of blocks that differ (bf16 sums in another order may
   flip near-ties) must stay under 0.5%.

Prints one line per case and writes ``check_estimation_gpu.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprefill import sparse
from jaxprefill.eval.synthetic_qk import structured_qk
from jaxprefill.sparse import Estimation
from jaxprefill.sparse import estimators as est
from jaxprefill.sparse import select
from jaxprefill.sparse.base import make_geometry
from jaxprefill.sparse.flexprefill import (mass_count_sort, prefix_cut_operands, uniform_prefix,
                                           uniform_prefix_cut)
from jaxprefill.sparse.xattention import antidiagonal_operands
from pallas_kernels.estimation import (last_query_sums, mass_cut, mass_cut_reference,
                                       pooled_block_scores)

XLA = Estimation(impl="xla")  # the XLA estimators: the reference of the pooled-scores kernel


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30))


def check_last_query_sums() -> list[dict]:
    rows = []
    cases = [  # B, S, Hq, Hkv, R, D, lengths, dtype, tol
        (2, 8191, 32, 8, 128, 128, (8191, 1000), jnp.bfloat16, 2e-2),
        (1, 32768, 32, 8, 128, 128, (32768,), jnp.bfloat16, 2e-2),
        (2, 5000, 9, 3, 64, 64, (5000, 40), jnp.float32, 1e-4),
        (1, 4097, 8, 2, 128, 80, (4097,), jnp.bfloat16, 2e-2),
    ]
    for i, (b, s, hq, hkv, r, d, lens, dtype, tol) in enumerate(cases):
        name = f"lqs_B{b}_S{s}_g{hq // hkv}_R{r}_D{d}_{jnp.dtype(dtype).name}"
        try:
            kq, kk = jax.random.split(jax.random.key(100 + i))
            q = jax.random.normal(kq, (b, hq, r, d), jnp.float32).astype(dtype)
            k = jax.random.normal(kk, (b, s, hkv, d), jnp.float32).astype(dtype)
            lengths = jnp.asarray(lens, jnp.int32)
            scale = d ** -0.5
            vert, slash = jax.jit(lambda q, k, l: last_query_sums(
                q, k, l, scale=scale, impl="triton"))(q, k, lengths)
            v_ref, s_ref = jax.jit(lambda q, k, l: last_query_sums(
                q, k, l, scale=scale, impl="reference"))(q, k, lengths)
            nan = bool(np.isnan(np.asarray(vert)).any() or np.isnan(np.asarray(slash)).any())
            ev, es = rel_err(vert, v_ref), rel_err(slash, s_ref)
            ok = (not nan) and ev < tol and es < tol
            rows.append(dict(case=name, ok=ok, vert_err=ev, slash_err=es, nan=nan))
        except Exception as e:  # report, never skip silently
            traceback.print_exc()
            rows.append(dict(case=name, ok=False, error=f"{type(e).__name__}: {e}"[:300]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def check_pooled_scores() -> list[dict]:
    rows = []
    cases = [  # S, Hq, Hkv, stride, pool, lengths, dtype
        (16384, 32, 8, 8, "sum", (16384,), jnp.bfloat16),
        (16384, 32, 8, 16, "sum", (16384,), jnp.bfloat16),
        (9000, 8, 2, 16, "max", (9000, 3001), jnp.bfloat16),
        (9000, 8, 2, 8, "sum", (9000, 3001), jnp.bfloat16),
        (9000, 8, 2, 8, "sum", (9000, 3001), jnp.float32),  # float32 tiling, three-TF32 dots
        (5000, 8, 2, 1, "max", (5000,), jnp.float32),  # r = 128 cells
    ]
    for i, (s, hq, hkv, stride, pool, lens, dtype) in enumerate(cases):
        name = (f"pooled_S{s}_g{hq // hkv}_stride{stride}_{pool}_B{len(lens)}_"
                f"{jnp.dtype(dtype).name}")
        try:
            b, block, d = len(lens), 128, 128
            q, k = structured_qk(jax.random.key(200 + i), b, s, hq, hkv, d, dtype=dtype)
            geo = make_geometry(q, k, block, jnp.asarray(lens, jnp.int32), estimation=XLA)
            qr, kr, valid = antidiagonal_operands(q, k, geo, stride)
            r = block // stride
            if dtype == jnp.float32:  # exact products on the CPU: XLA's GPU float32 dots are
                # TF32 (2e-4 off on these logits), its HIGHEST fusion overflows shared memory
                cpu = jax.devices("cpu")[0]
                with jax.default_device(cpu), jax.default_matmul_precision("highest"):
                    geo_c = make_geometry(q, k, block, np.asarray(lens, np.int32),
                                          estimation=XLA)
                    valid_c = (geo_c.lengths + stride - 1) // stride
                    ref = jax.jit(lambda a, c: est.block_softmax_scores(
                        a, c, geo_c, r, valid_c, geo_c.scale / stride, pool))(
                        *jax.device_put((qr, kr), cpu))
            else:
                ref = jax.jit(lambda a, c: est.block_softmax_scores(
                    a, c, geo, r, valid, geo.scale / stride, pool))(qr, kr)
            out = jax.jit(lambda a, c: pooled_block_scores(
                a, c, valid, jnp.zeros((b,), jnp.int32), r=r, scale=geo.scale / stride,
                pool=pool, impl="triton"))(qr, kr)
            nan = bool(np.isnan(np.asarray(out)).any())
            err = rel_err(out, ref)
            tol = 1e-4 if dtype == jnp.float32 else 2e-2
            rows.append(dict(case=name, ok=(not nan) and err < tol, err=err, nan=nan))
        except Exception as e:  # report, never skip silently
            traceback.print_exc()
            rows.append(dict(case=name, ok=False, error=f"{type(e).__name__}: {e}"[:300]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def mass_cut_misses(s, base, goal, cut, rtol: float = 1e-5, weight=None) -> int:
    """Rows where ``cut`` (uint32 keys [...]) is not the mass cut of s [..., m] (>= 0) within
    float rounding: in float64, base + mass above u must be < goal (unless u is the last key:
    no cut qualifies) and base + mass at or above u must reach goal (unless u is the first),
    each to rtol x (base + row total). weight [..., m]: the mass of each entry (None: s)."""
    s = np.asarray(s, np.float32).reshape(-1, np.shape(s)[-1])
    key = s.view(np.int32).astype(np.int64)
    u = (np.asarray(cut).reshape(-1).astype(np.int64) & 0x7FFFFFFF)[:, None]
    base = np.asarray(base, np.float64).reshape(-1)
    goal = np.asarray(goal, np.float64).reshape(-1)
    s64 = s.astype(np.float64) if weight is None else np.asarray(weight, np.float64).reshape(
        s.shape)
    above = base + np.where(key > u, s64, 0.0).sum(-1)
    at = base + np.where(key >= u, s64, 0.0).sum(-1)
    tol = rtol * (base + s64.sum(-1))
    u = u[:, 0]
    ok = ((u == 0x7FFFFFFF) | (above < goal + tol)) & ((u == 0) | (at >= goal - tol))
    return int((~ok).sum())


def mass_count_misses(x, valid, gamma: float, count, rtol: float = 1e-5) -> int:
    """Rows where ``count`` (int [...]) is not ``select.mass_count`` of x [..., m] within float
    rounding: in float64, the ``count`` largest positive valid entries must sum to <= gamma
    and one more must pass it (unless none is left), each to rtol x max(row total, gamma)."""
    x = np.where(np.asarray(valid), np.asarray(x, np.float64), 0.0)
    x = np.maximum(x, 0.0).reshape(-1, x.shape[-1])
    cum = np.cumsum(-np.sort(-x, axis=-1), axis=-1)  # [rows, m]: mass of the j + 1 largest
    c = np.asarray(count).reshape(-1).astype(np.int64)
    n_pos = (x > 0).sum(-1)
    tol = rtol * np.maximum(cum[:, -1], gamma)
    r = np.arange(len(c))
    taken = np.where(c > 0, cum[r, np.maximum(c - 1, 0)], 0.0)
    fits = (c <= n_pos) & (taken <= gamma + tol)
    full = (c == n_pos) | (cum[r, np.minimum(c, x.shape[-1] - 1)] > gamma - tol)
    return int((~(fits & full)).sum())


def check_mass_cut() -> list[dict]:
    """The cut searches against the XLA bit search: exact cuts expected except where a row sum
    lands within rounding of the goal (at most one row or 0.1% of rows may differ, each a cut
    within rounding: :func:`mass_cut_misses`). Rows wider than 16384 take the wide kernel."""
    rows = []
    cases = [((32, 1024, 1024), 0.9), ((8, 300, 700), 0.95), ((4, 64, 4096), 0.5),
             ((1, 9, 65536), 0.95), ((2, 5, 20001), 0.9)]
    for i, (shape, gamma) in enumerate(cases):
        name = f"mass_cut_{'x'.join(map(str, shape))}_gamma{gamma}"
        try:
            u = jax.random.uniform(jax.random.key(300 + i), shape, jnp.float32)
            s = jnp.where(u < 0.2, 0.0, u ** 8)  # zeros and a heavy tail, like block masses
            total = s.sum(-1)
            base, goal = 0.05 * total, gamma * total
            ref = np.asarray(jax.jit(mass_cut_reference)(s, base, goal))
            out = np.asarray(jax.jit(lambda a, b, c: mass_cut(a, b, c, impl="triton"))(
                s, base, goal))
            n_differ = int((out != ref).sum())
            misses = mass_cut_misses(s, base, goal, out)
            ok = misses == 0 and n_differ <= max(1, ref.size // 1000)
            rows.append(dict(case=name, ok=ok, rows_differ=n_differ / ref.size,
                             rows_not_a_cut=misses))
        except Exception as e:  # report, never skip silently
            traceback.print_exc()
            rows.append(dict(case=name, ok=False, error=f"{type(e).__name__}: {e}"[:300]))
        print(json.dumps(rows[-1]), flush=True)
    return rows + check_mass_count() + check_weighted_cut()


def check_mass_count(shape=(2, 1, 9, 32768)) -> list[dict]:
    """``select.mass_count`` through the kernel (``Estimation("triton")``) against the XLA
    search and the sort. Dyadic masses (exact sums in any order): all three equal; FlexPrefill-
    like distributions (a heavy tail, normalized): every count a count within float rounding
    (:func:`mass_count_misses`; the three may differ where a partial sum lands within
    rounding of gamma)."""
    rows = []
    for data in ("dyadic", "distribution"):
        name = f"mass_count_{'x'.join(map(str, shape))}_{data}"
        try:
            key = jax.random.key(400 + len(rows))
            valid = jax.random.uniform(jax.random.fold_in(key, 1), shape) < 0.95
            if data == "dyadic":  # 0 to 4 units of 2^-bits(m) each: rows of about 1
                x = jax.random.randint(key, shape, 0, 5).astype(jnp.float32)
                x = x * 2.0 ** -shape[-1].bit_length()
            else:
                x = jax.random.uniform(key, shape, jnp.float32) ** 8
                x = x / x.sum(-1, keepdims=True)
            counts = {}
            for label, how in (("kernel", Estimation("triton")), ("xla", XLA)):
                counts[label] = np.asarray(jax.jit(lambda a, b: select.mass_count(
                    a, b, 0.75, how=how))(x, valid))
            counts["sort"] = np.asarray(jax.jit(lambda a, b: mass_count_sort(a, b, 0.75))(
                x, valid))
            diff = {k: np.abs(counts["kernel"].astype(np.int64) - counts[k]) for k in
                    ("xla", "sort")}
            misses = mass_count_misses(x, valid, 0.75, counts["kernel"])
            ok = misses == 0
            if data == "dyadic":
                ok &= all(int(d.max()) == 0 for d in diff.values())
            rows.append(dict(case=name, ok=ok, rows_not_a_count=misses,
                             max_diff_xla=int(diff["xla"].max()),
                             max_diff_sort=int(diff["sort"].max()),
                             rows_differ_xla=int((diff["xla"] > 0).sum()),
                             mean_count=float(counts["kernel"].mean())))
        except Exception as e:  # report, never skip silently
            traceback.print_exc()
            rows.append(dict(case=name, ok=False, error=f"{type(e).__name__}: {e}"[:300]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def chunk_rows(key: jax.Array, b: int, h: int, n: int, nr: int, gamma: float = 0.95):
    """FlexPrefill's chunk rows at the last chunk of a prompt of n key blocks: nr query-block
    rows of pooled softmax (a heavy tail over each row's causal blocks) after the n - nr
    uniform prefix rows. Returns ``uniform_prefix_cut``'s arguments: (s [b, h, nr * n],
    valid, pv, pcount, pmass [b, h, n], goal [b, h])."""
    row0 = n - nr
    value, count = uniform_prefix(types.SimpleNamespace(n=n, row0=jnp.full((b,), row0)))
    causal = jnp.arange(n)[None, :] <= (row0 + jnp.arange(nr))[:, None]  # [nr, n]
    e = jnp.where(causal, jax.random.uniform(key, (b, h, nr, n)) ** 8, 0.0)
    s = (e / e.sum(-1, keepdims=True)).reshape(b, h, nr * n)
    valid = jnp.broadcast_to(causal.reshape(-1), s.shape)
    pv = jnp.broadcast_to(value[:, None, :], (b, h, n))
    pcount = jnp.broadcast_to(count[:, None, :], (b, h, n))
    pmass = pv * pcount
    goal = gamma * (s.sum(-1) + pmass.sum(-1))
    return s, valid, pv, pcount, pmass, goal


def check_weighted_cut(shape=(1, 32, 1024, 128), interpret: bool = False) -> list[dict]:
    """FlexPrefill's chunk rows (``uniform_prefix_cut`` with ``Estimation("triton")``: the
    weighted kernel; shape (B, Hq, n key blocks, nr chunk rows)) against the weighted reference
    over [prefix; scores] and the XLA search (``Estimation("xla")``): as :func:`check_mass_cut`,
    at most one row or 0.1% of rows may differ from the reference, each a cut within rounding.
    ``interpret``: a CPU smoke run (small shapes)."""
    b, h, n, nr = shape
    name = f"weighted_cut_chunk_rows_B{b}_H{h}_P{n}_M{nr * n}"
    try:
        args = chunk_rows(jax.random.key(500), b, h, n, nr)
        s, _, pv, pcount, pmass, goal = args
        kernel = Estimation("triton", interpret=interpret)
        out = np.asarray(jax.jit(lambda *a: uniform_prefix_cut(*a, how=kernel))(*args))
        xla = np.asarray(jax.jit(lambda *a: uniform_prefix_cut(*a, how=XLA))(*args))
        values, weights = prefix_cut_operands(s, pv, pcount, pmass)
        base = jnp.zeros(goal.shape, jnp.float32)
        ref = np.asarray(jax.jit(mass_cut_reference)(values, base, goal, weights))
        n_differ = int((out != ref).sum())
        misses = mass_cut_misses(values, base, goal, out, weight=weights)
        ok = misses == 0 and n_differ <= max(1, ref.size // 1000)
        row = dict(case=name, ok=ok, rows_differ=n_differ / ref.size,
                   rows_differ_xla=int((out != xla).sum()) / ref.size, rows_not_a_cut=misses)
    except Exception as e:  # report, never skip silently
        traceback.print_exc()
        row = dict(case=name, ok=False, error=f"{type(e).__name__}: {e}"[:300])
    print(json.dumps(row), flush=True)
    return [row]


POLICIES = {
    "flexprefill": dict(gamma=0.95, tau=0.1),
    "minference": dict(),
    "proxyattn": dict(gamma=0.95, stride=16),
    "pbs": dict(tau=0.9, segment=256),
    "xattention": dict(threshold=0.9, stride=16),
    "xattention_s8": dict(threshold=0.9, stride=8),
}


def check_policy_layouts(seq: int = 16384) -> list[dict]:
    q, k = structured_qk(jax.random.key(0), 2, seq, 32, 8, 128)
    lengths = jnp.asarray([seq, seq - 3001], jnp.int32)
    rows = []
    for label, params in POLICIES.items():
        name = label.split("_s")[0]
        try:
            masks = {}
            for impl in ("xla", "auto"):
                policy = sparse.get(name, estimation=impl, **params)
                masks[impl] = np.asarray(jax.jit(lambda a, b, l: policy.build(
                    a, b, layer=20, lengths=l).to_block_mask())(q, k, lengths))
            differ = float((masks["auto"] != masks["xla"]).mean())
            rows.append(dict(case=f"layout_{label}_S{seq}", ok=differ < 5e-3, differ=differ,
                             density_auto=float(masks["auto"].mean()),
                             density_xla=float(masks["xla"].mean())))
        except Exception as e:  # report, never skip silently
            traceback.print_exc()
            rows.append(dict(case=f"layout_{label}_S{seq}", ok=False,
                             error=f"{type(e).__name__}: {e}"[:300]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-layouts", action="store_true")
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    rows = check_last_query_sums() + check_pooled_scores() + check_mass_cut()
    if not args.skip_layouts:
        rows += check_policy_layouts()
    passed = sum(r["ok"] for r in rows)
    print(f"{passed}/{len(rows)} passed")
    if args.out:
        Path(args.out, "check_estimation_gpu.json").write_text(json.dumps(rows, indent=1))
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
