"""How fast the engine's paged-cache write is, against a device copy of the same bytes.

A prefill writes each layer's new keys and values into the page pool (`write_pages`: one
index per page). The op profile of a 32K SmolLM2 prefill put that write at ~210 GB/s. This
times, for one layer's keys of a prompt ``--tokens`` long (``--heads`` x ``--dim``, bf16):

  * ``pages``: `paged_cache.write_pages` as the engine runs it (XLA scatter, one index a page);
  * ``pages_unique``: the same scatter told that its page indices are unique;
  * ``tokens``: the per-token scatter (`write_back`'s form, one index a token);
  * ``copy`` (the anchor): `lax.dynamic_update_slice` of the same bytes into one contiguous
    run of pages, what the write costs at copy speed.

Each variant runs ``--writes`` times inside one jitted loop that carries the pool (written in
place); its time per write is (loop of n writes - loop of 1 write) / (n - 1), so the pool's
entry copy and the launch stay out. Every variant's pool is checked against the reference
write (page order shuffled, some pages out of range and dropped). Usage:

    python -m scripts.benchmarks.bench_cache_write_gpu --out DIR [--tokens 32768]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprefill.infer.paged_cache import PagedKVCache, write_pages
from jaxprefill.models import KVCache
from scripts.common.timing import time_ms


def variants(page_size: int):
    def pages(pool, rows, slots):
        cache = write_pages(PagedKVCache((pool,), (pool,)), KVCache((rows,), (rows,)), slots)
        return cache.k[0]

    def pages_unique(pool, rows, slots):
        b, t = slots.shape
        idx = (slots[:, ::page_size] // page_size).reshape(-1)
        new = rows.reshape(b * (t // page_size), page_size, *rows.shape[2:])
        return pool.at[idx].set(new.astype(pool.dtype), mode="drop", unique_indices=True)

    def tokens(pool, rows, slots):
        flat = pool.reshape(-1, *pool.shape[2:])
        flat = flat.at[slots.reshape(-1)].set(rows.reshape(-1, *rows.shape[2:]).astype(pool.dtype),
                                              mode="drop")
        return flat.reshape(pool.shape)

    def copy(pool, rows, slots):  # contiguous run from the first page: the copy-speed anchor
        b, t = slots.shape
        new = rows.reshape(b * (t // page_size), page_size, *rows.shape[2:]).astype(pool.dtype)
        return jax.lax.dynamic_update_slice(pool, new, (slots[0, 0] // page_size, 0, 0, 0))

    return {"pages": pages, "pages_unique": pages_unique, "tokens": tokens, "copy": copy}


def looped(write, n: int):
    @jax.jit
    def run(pool, rows, slots):
        def body(i, p):  # a different value each write, so no write is dead
            return write(p, rows + i.astype(rows.dtype), slots)
        return jax.lax.fori_loop(0, n, body, pool)
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--pool-pages", type=int, default=2048)
    ap.add_argument("--writes", type=int, default=31)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    ps, t = args.page_size, args.tokens
    if t % ps or t // ps + 1 > args.pool_pages:
        raise SystemExit("error: --tokens must be a multiple of --page-size and fit the pool")
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n_pages = t // ps
    pool = jnp.asarray(rng.standard_normal((args.pool_pages, ps, args.heads, args.dim)),
                       jnp.bfloat16)
    rows = jnp.asarray(rng.standard_normal((1, t, args.heads, args.dim)), jnp.bfloat16)
    # shuffled pages (a pool in use), the last 3 out of range (a row's unused tail)
    page_ids = rng.permutation(np.arange(1, args.pool_pages))[:n_pages]
    page_ids[-3:] = args.pool_pages
    slots_shuffled = jnp.asarray((page_ids[:, None] * ps + np.arange(ps)).reshape(1, t), jnp.int32)
    # contiguous pages for the copy anchor
    slots_run = jnp.asarray(ps + np.arange(t).reshape(1, t), jnp.int32)
    nbytes = t * args.heads * args.dim * 2
    ref = np.asarray(variants(ps)["pages"](pool, rows, slots_shuffled), np.float32)
    rows_out = []
    for name, fn in variants(ps).items():
        slots = slots_run if name == "copy" else slots_shuffled
        if name != "copy":
            got = np.asarray(jax.jit(fn)(pool, rows, slots), np.float32)
            ok = bool(np.array_equal(got, ref))
        else:
            ok = None
        one = time_ms(looped(fn, 1), pool, rows, slots, warmup=2, reps=7).ms
        many = time_ms(looped(fn, args.writes), pool, rows, slots, warmup=2, reps=7).ms
        per = (many - one) / (args.writes - 1)
        row = dict(variant=name, equal_to_reference=ok, ms_per_write=per,
                   gbs=nbytes / (per * 1e-3) / 1e9 if per > 0 else None)
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    copy_ms = next(r["ms_per_write"] for r in rows_out if r["variant"] == "copy")
    lines = [f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; one layer's keys: "
             f"{t} tokens x {args.heads} x {args.dim} bf16 = {nbytes / 2**20:.1f} MiB, "
             f"pages of {ps}, pool of {args.pool_pages} pages", "",
             "| variant | equal to the engine's write | ms a write | GB/s | / copy |",
             "|---|---|---|---|---|"]
    for r in rows_out:
        ratio = r["ms_per_write"] / copy_ms if copy_ms > 0 else float("nan")
        gbs = "-" if r["gbs"] is None else f"{r['gbs']:.0f}"
        lines.append(f"| {r['variant']} | {r['equal_to_reference']} | {r['ms_per_write']:.4f} | "
                     f"{gbs} | {ratio:.2f} |")
    (args.out / "bench_cache_write_gpu.md").write_text("\n".join(lines) + "\n")
    (args.out / "bench_cache_write_gpu.json").write_text(json.dumps(
        dict(args={k: str(v) for k, v in vars(args).items()}, rows=rows_out), indent=1))
    print("\n".join(lines))
    bad = [r["variant"] for r in rows_out if r["equal_to_reference"] is False]
    if bad:
        print(f"error: {bad} differ from the engine's write")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
