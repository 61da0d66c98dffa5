"""DeepSeek-V3.2 sparse attention (DSA) on the GPU: one layer's attention at 128K tokens, sparse
(indexer + top-k + sparse MLA) against our dense MLA prefill, the sparse MLA kernel's rate, the
sparse decode's cache bandwidth against a device copy, the FP8 indexer, and the compiled memory
of the 128K indexer (no [S, S] buffer). All ratios come from one run on one device.

    python -m scripts.benchmarks.bench_dsa_gpu [--out DIR] [--seq 131072] [--query-chunk 8192]
        [--decode-batch 64] [--decode-context 32768] [--smoke]

What is timed (bf16, batch 1, V3.2 shapes: 128 heads, d_qk 192 / d_v 128 decompressed, latent
576 / 512 absorbed, indexer 64 heads x 128, top-k 2048; inputs random):
  * dense: `jaxprefill.attention.attend(q, k, v, causal)` at [S, 128, 192/128], the attention
    core of our MLA prefill ("auto" backend: what the model runs);
  * indexer: `dsa_ops.index_topk` over all S queries (fused scores, k-th key search, compaction;
    bf16, and FP8 e4m3 with per-128 scales);
  * sparse MLA prefill: `dsa_ops.sparse_mla` over one chunk of ``--query-chunk`` queries that
    each select 2048 latent rows of the S-token latent, times S / chunk (every query past the
    first 2047 selects 2048 rows, so this bounds the whole prefill from above). The projections
    around either form (W_UK / W_UV absorption, kv_b decompression; under 1% of the FLOPs at
    128K) are left out of both.
  ratio = (indexer + sparse MLA) / dense; target <= 0.4 (bf16 indexer).
  * TFLOP/s of sparse MLA counted over the selected tokens: 2 H k (Dc + Dr + Dc) per query;
    target >= 500 (FlashMLA reports 640 on an H800).
  * sparse decode: `sparse_mla` of ``--decode-batch`` single queries, 2048 rows each from a
    paged latent cache of ``--decode-context`` tokens per sequence; GB/s of rows read
    (B * 2048 * 576 * 2 bytes) against a jnp copy of an array of the same bytes (read + write);
    target >= 80% of copy, at 128 heads and at 16 (a TP-8 shard of V3.2's heads); each
    also with the rows of a query split among 1-16 programs (``num_splits``; auto: enough
    programs for two per SM).
  * memory: the 128K indexer compiled (`memory_analysis`: temp bytes) and the largest array
    in its HLO, against S^2.
  * decode indexer: one query per sequence over its cached keys, bf16 keys and keys stored
    in FP8 (``k_scale``: what a ``DSAOptions(fp8=True)`` cache holds);
  * FP8 recall: mean |top-k(FP8) & top-k(bf16)| / k over the queries of one chunk (random
    inputs: a floor, not a model's accuracy).
Times: median ms per call (`scripts.common.timing.time_ms`). Writes bench_dsa_gpu.json and
bench_dsa_gpu.md into --out. ``--smoke``: toy sizes on any device (checks the script).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprefill.attention import AttentionSpec, attend
from jaxprefill.attention.dispatch import attention_backend
from pallas_kernels import dsa_ops
from pallas_kernels.dsa_reference import quantize_e4m3
from scripts.common.timing import time_ms

TAU = float(192 ** -0.5 * (0.1 * np.log(40.0) + 1) ** 2)
V32 = dict(heads=128, dc=512, dr=64, dn=128, dv=128, index_heads=64, index_dim=128, topk=2048)
SMOKE = dict(heads=8, dc=64, dr=16, dn=16, dv=16, index_heads=8, index_dim=32, topk=64)
PAGE = 64


def timing(smoke: bool, long: bool = False) -> dict:
    if smoke:
        return dict(warmup=1, reps=2)
    return dict(warmup=1, reps=3) if long else dict(warmup=2, reps=7, sample_ms=50)


def normal(key, shape, dtype=jnp.bfloat16):
    return jax.random.normal(key, shape, dtype)


def index_args(s: int, dims: dict, seed: int):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = normal(ks[0], (1, s, dims["index_heads"], dims["index_dim"]))
    w = normal(ks[1], (1, s, dims["index_heads"]), jnp.float32) * dims["index_heads"] ** -0.5
    k = normal(ks[2], (1, s, dims["index_dim"]))
    return q, w, k


def chunk_rows(s: int, c: int, kk: int, seed: int) -> jax.Array:
    """rows [1, c, kk] of the last c queries of an s-token prompt: kk distinct earlier tokens
    each, one drawn from each of kk equal slices of the query's prefix (ascending, spread over
    the whole latent as an indexer's picks would be)."""
    rng = np.random.default_rng(seed)
    n = (s - c + 1 + np.arange(c, dtype=np.float64))[:, None]  # prefix length of each query
    slots = (np.arange(kk)[None] + rng.random((c, kk))) * n / kk
    return jnp.asarray(np.floor(slots).astype(np.int32)[None])


def bench_prefill(args, dims, log, out):
    s, c, h = args.seq, min(args.query_chunk, args.seq), dims["heads"]
    kk = min(dims["topk"], s - c + 1)
    t = timing(args.smoke, long=True)
    # dense MLA prefill attention core
    ks = jax.random.split(jax.random.key(1), 3)
    dqk = dims["dn"] + dims["dr"]
    q = normal(ks[0], (1, s, h, dqk))
    k = normal(ks[1], (1, s, h, dqk))
    v = normal(ks[2], (1, s, h, dims["dv"]))
    dense = jax.jit(lambda q, k, v: attend(q, k, v, causal=True, sm_scale=TAU,
                                           spec=AttentionSpec()))
    t_dense = time_ms(dense, q, k, v, **t).ms
    flops_dense = 2.0 * h * s * s / 2 * (dqk + dims["dv"])
    log(f"dense MLA prefill S={s} H={h}: {t_dense:.1f} ms "
        f"({flops_dense / t_dense / 1e9:.0f} TFLOP/s causal)")
    del q, k, v
    # indexer over all S queries, bf16 and FP8
    iq, iw, ik = index_args(s, dims, 2)
    t_index = {}
    for fp8 in (False, True):
        fn = jax.jit(lambda q, w, k, fp8=fp8: dsa_ops.index_topk(q, w, k, dims["topk"], fp8=fp8))
        t_index[fp8] = time_ms(fn, iq, iw, ik, **t).ms
        log(f"indexer S={s} {'fp8' if fp8 else 'bf16'}: {t_index[fp8]:.1f} ms")
    # FP8 recall against bf16 on the last chunk of queries
    qc, wc = iq[:, s - c:], iw[:, s - c:]
    off = jnp.asarray([s - c], jnp.int32)
    pick = jax.jit(lambda q, w, k, fp8: dsa_ops.index_topk(q, w, k, dims["topk"], q_offset=off,
                                                           fp8=fp8), static_argnums=3)
    a, b = np.asarray(pick(qc, wc, ik, False)), np.asarray(pick(qc, wc, ik, True))
    recall = np.mean([len(np.intersect1d(x[x >= 0], y[y >= 0])) / max(1, (x >= 0).sum())
                      for x, y in zip(a[0], b[0])])
    log(f"FP8 top-k recall vs bf16 (random inputs, {c} queries): {recall:.4f}")
    del iq, iw, qc, wc
    # sparse MLA over one chunk of queries, each with kk rows of the S-token latent
    ks = jax.random.split(jax.random.key(3), 3)
    ql = normal(ks[0], (1, c, h, dims["dc"]))
    qp = normal(ks[1], (1, c, h, dims["dr"]))
    kv = normal(ks[2], (s, dims["dc"] + dims["dr"]))
    rows = chunk_rows(s, c, kk, 4)
    sparse = jax.jit(lambda ql, qp, kv, rows: dsa_ops.sparse_mla(ql, qp, kv, rows, TAU))
    t_chunk = time_ms(sparse, ql, qp, kv, rows, **timing(args.smoke)).ms
    flops = 2.0 * h * kk * (2 * dims["dc"] + dims["dr"]) * c
    tflops = flops / t_chunk / 1e9
    t_sparse = t_chunk * s / c
    log(f"sparse MLA {c} queries x {kk} rows H={h}: {t_chunk:.2f} ms, {tflops:.0f} TFLOP/s over "
        f"the selected tokens; whole prefill <= {t_sparse:.1f} ms")
    for fp8 in (False, True):
        ratio = (t_index[fp8] + t_sparse) / t_dense
        log(f"ratio (indexer {'fp8' if fp8 else 'bf16'} + top-k + sparse MLA) / dense at "
            f"S={s}: {ratio:.3f}")
    out.update(seq=s, query_chunk=c, topk=kk, dense_ms=t_dense, index_bf16_ms=t_index[False],
               index_fp8_ms=t_index[True], sparse_chunk_ms=t_chunk, sparse_prefill_ms=t_sparse,
               sparse_tflops=tflops, fp8_recall=float(recall),
               ratio_bf16=(t_index[False] + t_sparse) / t_dense,
               ratio_fp8=(t_index[True] + t_sparse) / t_dense)


def bench_decode(args, dims, log, out):
    b, ctx = args.decode_batch, args.decode_context
    kk = min(dims["topk"], ctx)
    rng = np.random.default_rng(5)
    n_pages = b * ctx // PAGE
    table = rng.permutation(n_pages).reshape(b, ctx // PAGE)
    tok = np.stack([np.sort(rng.choice(ctx, kk, replace=False)) for _ in range(b)])
    rows = jnp.asarray((table[np.arange(b)[:, None], tok // PAGE] * PAGE + tok % PAGE)[:, None],
                       jnp.int32)  # [B, 1, kk] rows of the flattened pages
    kv = normal(jax.random.key(6), (n_pages * PAGE, dims["dc"] + dims["dr"]))
    nbytes = b * kk * (dims["dc"] + dims["dr"]) * 2
    copy_src = normal(jax.random.key(7), (b * kk, dims["dc"] + dims["dr"]))
    copy = jax.jit(lambda x: x * jnp.bfloat16(1) + jnp.bfloat16(0))
    t_copy = time_ms(copy, copy_src, **timing(args.smoke)).ms
    copy_gbs = 2 * nbytes / t_copy / 1e6
    log(f"copy {nbytes / 2**20:.0f} MiB: {t_copy:.4f} ms -> {copy_gbs:.0f} GB/s (read+write)")
    out.update(decode_batch=b, decode_context=ctx, copy_gbs=copy_gbs, decode={})
    for h in sorted({dims["heads"], max(1, dims["heads"] // 8)}, reverse=True):
        ks = jax.random.split(jax.random.key(h), 2)
        ql = normal(ks[0], (b, 1, h, dims["dc"]))
        qp = normal(ks[1], (b, 1, h, dims["dr"]))
        fn = jax.jit(lambda ql, qp, kv, rows: dsa_ops.sparse_mla(ql, qp, kv, rows, TAU))
        t_dec = time_ms(fn, ql, qp, kv, rows, **timing(args.smoke)).ms
        gbs = nbytes / t_dec / 1e6
        log(f"sparse decode B={b} H={h} k={kk}: {t_dec:.4f} ms, {gbs:.0f} GB/s = "
            f"{gbs / copy_gbs:.0%} of copy")
        out["decode"][h] = dict(ms=t_dec, gbs=gbs, of_copy=gbs / copy_gbs, splits={})
        for n in (1, 2, 4, 8, 16):  # the split of a query's rows (auto picks one of these)
            fs = jax.jit(lambda ql, qp, kv, rows, n=n: dsa_ops.sparse_mla(
                ql, qp, kv, rows, TAU, num_splits=n))
            t_n = time_ms(fs, ql, qp, kv, rows, **timing(args.smoke)).ms
            out["decode"][h]["splits"][n] = dict(ms=t_n, of_copy=nbytes / t_n / 1e6 / copy_gbs)
            log(f"  num_splits={n}: {t_n:.4f} ms = {nbytes / t_n / 1e6 / copy_gbs:.0%} of copy")
    # the indexer of one decode step over the cached keys (one query per sequence)
    iq, iw, _ = index_args(b, dims, 8)
    ik = normal(jax.random.key(9), (b, ctx, dims["index_dim"]))
    iq, iw = iq.reshape(b, 1, *iq.shape[2:]), iw.reshape(b, 1, -1)
    off = jnp.full((b,), ctx - 1, jnp.int32)
    fn = jax.jit(lambda q, w, k: dsa_ops.index_topk(q, w, k, dims["topk"], q_offset=off))
    t_idx = time_ms(fn, iq, iw, ik, **timing(args.smoke)).ms
    log(f"decode indexer B={b} over {ctx} keys: {t_idx:.4f} ms")
    out["decode_index_ms"] = t_idx
    # the same over keys stored in FP8 (DSAOptions(fp8=True) caches: values + per-key scales)
    k8, ks = quantize_e4m3(ik)
    fn = jax.jit(lambda q, w, k, s: dsa_ops.index_topk(q, w, k, dims["topk"], q_offset=off,
                                                       k_scale=s))
    t_idx8 = time_ms(fn, iq, iw, k8, ks, **timing(args.smoke)).ms
    log(f"decode indexer B={b} over {ctx} FP8-stored keys: {t_idx8:.4f} ms "
        f"({t_idx8 / t_idx:.2f}x bf16)")
    out["decode_index_fp8_cache_ms"] = t_idx8


def largest_array(hlo: str) -> tuple[int, str]:
    """(elements, shape text) of the largest array shape in an HLO module's text."""
    best = (0, "")
    for m in re.finditer(r"\b(?:f32|bf16|f16|s32|u32|pred|s8|f8e4m3fn)\[([0-9,]+)\]", hlo):
        dims = [int(x) for x in m.group(1).split(",") if x]
        n = int(np.prod(dims)) if dims else 1
        if n > best[0]:
            best = (n, m.group(0))
    return best


def memory_analysis(args, dims, log, out):
    s = args.seq
    avals = (jax.ShapeDtypeStruct((1, s, dims["index_heads"], dims["index_dim"]), jnp.bfloat16),
             jax.ShapeDtypeStruct((1, s, dims["index_heads"]), jnp.float32),
             jax.ShapeDtypeStruct((1, s, dims["index_dim"]), jnp.bfloat16))
    fn = jax.jit(lambda q, w, k: dsa_ops.index_topk(q, w, k, dims["topk"]))
    compiled = fn.trace(*avals).lower().compile()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    n, shape = largest_array(compiled.as_text())
    ok = n < s * s // 4
    temp_txt = "n/a" if temp is None else f"{temp / 2**30:.2f} GiB"
    log(f"indexer at S={s} compiled: temp {temp_txt}; largest array {shape} = {n / (s * s):.4f}"
        f" S^2 -> {'no [S, S] buffer' if ok else 'AN [S, S]-SIZED BUFFER'}")
    out.update(index_temp_bytes=temp, largest_array=shape, largest_over_s2=n / (s * s),
               no_ss_buffer=ok)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--seq", type=int, default=131072)
    ap.add_argument("--query-chunk", type=int, default=8192)
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--decode-context", type=int, default=32768)
    ap.add_argument("--smoke", action="store_true", help="toy sizes (any device)")
    args = ap.parse_args()
    dims = SMOKE if args.smoke else V32
    if args.smoke:
        args.seq, args.query_chunk = 512, 64
        args.decode_batch, args.decode_context = 4, 1024
    lines = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    log(f"devices: {jax.devices()} jax {jax.__version__}")
    q, _, k = index_args(8, dims, 0)
    kv = jnp.zeros((8, dims["dc"] + dims["dr"]), jnp.bfloat16)
    dense_q = jnp.zeros((1, 8, dims["heads"], dims["dn"] + dims["dr"]), jnp.bfloat16)
    log(f"backends: dense attend {attention_backend(dense_q, dims['dv'], simple=True)}, "
        f"index_topk {dsa_ops.index_topk_backend(q, k, dims['topk'])}, "
        f"sparse_mla {dsa_ops.sparse_mla_backend(kv[None, None], kv)}")
    out = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, dims=dims)
    memory_analysis(args, dims, log, out)
    bench_prefill(args, dims, log, out)
    bench_decode(args, dims, log, out)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_dsa_gpu.json").write_text(json.dumps(out, indent=1))
    (Path(args.out) / "bench_dsa_gpu.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
