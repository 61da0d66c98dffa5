"""Where the estimation of one prefill chunk goes: MInference's stages, timed one by one.

    python -m scripts.benchmarks.profile_chunk_estimation_gpu --seq 131072 --chunk 16384 [--out DIR]
    python -m scripts.benchmarks.profile_chunk_estimation_gpu --tiny     # CPU smoke run

The engine's chunked prefill estimates each chunk's rows against a cache view of static shape
(``--seq`` keys, the future ones masked by ``lengths``); the stages below see the whole view,
the whole call is timed over both key extents (``Estimation.extent``). This script
builds that call for the chunk at ``--at`` (default: the second chunk, the one whose dense
attention is cheapest relative to a fixed estimation cost) with Llama-3-8B heads (Hq 32, Hkv 8,
D 128, bf16, batch 1, structured synthetic q/k) and times, each as its own jitted program:

  last_q_sums      the vertical and slash sums of the window's last 64 queries
  topk_vertical    the top-1000 columns (threshold search over every key)
  topk_slash       the top-6096 diagonals
  column_positions the selected columns in ascending order
  diagonal_blocks  slash offsets -> the block mask
  finish           the shared rules + block mask -> block lists
  with_columns     the columns per query block
  chunk_layout     the whole call, as the engine runs it (also for flexprefill, xattention),
                   over the whole view (_full) and over the keys up to the chunk's end rounded
                   to a power-of-two extent (_bucket, the default)
  dense_chunk      the chunk's dense causal attention (the 5% bar is of this)

Median of ``--reps`` calls after a warm-up (``scripts.common.timing.time_ms``); each line also
gives the stage as a share of the dense chunk.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprefill import sparse
from jaxprefill.eval.synthetic_qk import structured_qk
from jaxprefill.sparse import estimators as est
from jaxprefill.sparse.base import make_row_geometry
from jaxprefill.sparse.columns import ascending_positions
from jaxprefill.sparse.prefill import chunk_layout
from pallas_kernels import block_sparse_attention, with_columns
from pallas_kernels.layout import structured_layout
from scripts.common.timing import time_ms


def stages(q, k, v, at: int, chunk: int, reps: int) -> dict[str, float]:
    """ms of each stage (module docstring) for the chunk [at, at + chunk) of a prefill."""
    pol = sparse.get("minference")
    blk = pol.block_size
    off = jnp.full((1,), at, jnp.int32)
    lens = jnp.full((1,), chunk, jnp.int32)
    qc = jax.lax.dynamic_slice_in_dim(q, at, chunk, axis=1)
    # the row window chunk_rows_layout builds: one block more than the chunk, from at // blk
    q_rows = jnp.pad(qc, ((0, 0), (0, blk), (0, 0), (0, 0)))
    geo = make_row_geometry(q_rows, k, blk, off // blk, off + lens, pol.estimation)
    kv = np.array([max(pol.vertical, pol.force_vertical)] * geo.Hq)
    ks = np.array([max(pol.slash, 50)] * geo.Hq)
    tok = jnp.arange(geo.S)[None, None, :]
    valid = tok < geo.lengths[:, None, None]

    sums = jax.jit(lambda q, k: est.last_q_sums(q, k, geo, pol.last_q))
    vert, slash = sums(q_rows, k)
    vert = jnp.where(tok < pol.force_vertical, jnp.inf, vert)
    slash = jnp.where(tok < pol.force_slash, jnp.inf, slash)
    topk_v = jax.jit(lambda s: est.topk_mask(s, valid, jnp.asarray(kv)[None, :], how=geo.estimation))
    topk_s = jax.jit(lambda s: est.topk_mask(s, valid, jnp.asarray(ks)[None, :], how=geo.estimation))
    sel_v, sel_s = topk_v(vert), topk_s(slash)
    cols_fn = jax.jit(lambda m: ascending_positions(m, int(kv.max()), geo.estimation))
    diag_fn = jax.jit(lambda m: est.diagonal_blocks(est.slash_offsets_to_blocks(m, geo), geo))
    cols, diag = cols_fn(sel_v), diag_fn(sel_s)
    finish = jax.jit(lambda m, q, k: pol.finish(m, geo, 1024, q, k))
    layout = finish(diag, q_rows, k)
    add_cols = jax.jit(lambda lay, c: with_columns(lay, c[:, :, None, :], seq_q=geo.nq * blk,
                                                   q_offset=geo.query_start()))
    rows = {
        "last_q_sums": time_ms(sums, q_rows, k, reps=reps).ms,
        "topk_vertical": time_ms(topk_v, vert, reps=reps).ms,
        "topk_slash": time_ms(topk_s, slash, reps=reps).ms,
        "column_positions": time_ms(cols_fn, sel_v, reps=reps).ms,
        "diagonal_blocks": time_ms(diag_fn, sel_s, reps=reps).ms,
        "finish": time_ms(finish, diag, q_rows, k, reps=reps).ms,
        "with_columns": time_ms(add_cols, layout, cols, reps=reps).ms,
    }
    for name in ("minference", "flexprefill", "xattention"):
        for keys in ("full", "bucket"):
            p = sparse.get(name, estimation={"extent": keys})
            whole = jax.jit(lambda q, k, o, n, p=p: chunk_layout(p, q, k, o, n, 1024))
            rows[f"chunk_layout_{name}_{keys}"] = time_ms(whole, qc, k, off, lens, reps=reps).ms
    # the engine's dense chunk: the chunk's queries at `at` against the keys up to its end
    kc = jax.lax.slice_in_dim(k, 0, at + chunk, axis=1)
    vc = jax.lax.slice_in_dim(v, 0, at + chunk, axis=1)
    dense_layout = structured_layout(chunk, at + chunk, 1, k.shape[2], block_q=128, block_k=128,
                                     causal=True, q_offset=off, segment_ids=None)
    dense = jax.jit(lambda q, k, v: block_sparse_attention(
        q, k, v, dense_layout, causal=True, q_offset=off))
    rows["dense_chunk"] = time_ms(dense, qc, kc, vc, reps=reps).ms
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=131072, help="keys of the cache view")
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--at", type=int, default=None, help="the chunk's first query (default: "
                                                         "the second chunk)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke run)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.tiny:
        args.seq, args.chunk, args.reps = 4096, 1024, 1
    at = args.chunk if args.at is None else args.at
    if at % 128 or at + args.chunk > args.seq:
        ap.error(f"--at {at}: a multiple of 128 with at + chunk <= seq ({args.seq})")
    hq, hkv, d = (4, 2, 64) if args.tiny else (32, 8, 128)
    q, k = jax.jit(structured_qk, static_argnums=(1, 2, 3, 4, 5))(jax.random.key(0), 1,
                                                                   args.seq, hq, hkv, d)
    v = jax.random.normal(jax.random.key(1), (1, args.seq, hkv, d), q.dtype)
    rows = stages(q, k, v, at, args.chunk, args.reps)
    dense = rows["dense_chunk"]
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: chunk [{at}, "
          f"{at + args.chunk}) of a {args.seq}-key view", flush=True)
    for name, ms in rows.items():
        print(f"{name:32s} {ms:9.3f} ms  {ms / dense:7.1%} of the dense chunk", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "profile_chunk_estimation.json").write_text(json.dumps(
            dict(device=jax.devices()[0].device_kind, seq=args.seq, chunk=args.chunk, at=at,
                 ms=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
