"""DeepSeek-V3.2's index keys split by token over the `tensor` axis (engine TPLA decode).

With TPLA the latent pool is split over `tensor` by latent columns, but every device needs the
indexer's top-k over all of a row's tokens, and a replicated index-key pool costs each device
the whole pool's memory and a whole read per decode step (at 128K tokens 32 MiB a layer in
bf16, 16.5 MiB in FP8, against 2.3 MiB for the sparse attention's 2,048 latent rows). Here
device d of g holds slots [d w, (d + 1) w) of every page (w = page / g), so every row is split
evenly whatever pages it owns:

  index pool   [num_pages, page, W] sharded over axis 1 (W = Di, or Di + 4 for FP8 rows)
  write        each device writes the tokens whose slot falls in its range
  decode       each device takes the top-k of its own keys (any `index_topk` backend; the
               causal limit is a prefix of its keys, as positions rise with the local index),
               scores those k candidates again in float32, and an all-gather of g x k
               (score, position) pairs gives every device the same global top-k: an entry
               outranked by k entries of its own shard is outranked by them in the row too.
               Ties go to the earlier position, as in `index_topk`.

The candidates' second scoring is the indexer's formula in float32 on the operands the scoring
read (FP8 values and scales for FP8 keys), so the selection equals the replicated pool's up to
float rounding at the k-th place (the same caveat as between `index_topk` backends).

Prefill reads a chunk's rows whole through `dsa_tpla_steps.exact_view` (the compiler gathers
the shards: a prefill call reads every key of its rows once per layer anyway).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxprefill.mla.tpla import shard_map
from jaxprefill.models.dsa import index_pool, page_rows, unpack_index_keys
from pallas_kernels.dsa_ops import index_topk
from pallas_kernels.dsa_reference import canonical, fp8_index_queries, quantize_e4m3

LAYOUTS = ("replicated", "sharded")


def pool_sharding(mesh: Mesh, axis: str) -> NamedSharding:
    """Index pages [num_pages, page, W] split over their slot axis."""
    return NamedSharding(mesh, P(None, axis, None))


def make_pools(cfg, num_pages: int, page_size: int, dtype, mesh: Mesh, axis: str,
               fp8: bool) -> tuple[jax.Array, ...]:
    """Zeroed per-layer index pools, each device holding page_size / g slots of every page."""
    g = mesh.shape[axis]
    if page_size % g:
        raise ValueError(f"tpla index_keys='sharded' needs tensor={g} to divide page_size "
                         f"({page_size})")
    return tuple(jax.device_put(index_pool(cfg, num_pages, page_size, dtype, fp8),
                                pool_sharding(mesh, axis)) for _ in range(cfg.num_layers))


def _write_local(pool: jax.Array, flat_slots: jax.Array, rows: jax.Array, page: int,
                 axis: str) -> jax.Array:
    """A device's pool [N, w, W] with rows [M, W] written at global flat slots [M] (page id x
    page + slot; other devices' slots and slots past the pool dropped)."""
    n, w = pool.shape[:2]
    d = jax.lax.axis_index(axis)
    pg, slot = flat_slots // page, flat_slots % page - d * w
    mine = (slot >= 0) & (slot < w) & (pg >= 0) & (pg < n)
    flat = jnp.where(mine, pg * w + slot, n * w)  # past the local pool: dropped
    out = pool.reshape(n * w, -1).at[flat].set(rows.astype(pool.dtype), mode="drop")
    return out.reshape(pool.shape)


def write(pool: jax.Array, flat_slots: jax.Array, rows: jax.Array, *, mesh: Mesh,
          axis: str) -> jax.Array:
    """`pool` [N, page, W] (sharded) with rows [M, W] at flat slots [M] (page x page + slot;
    slots past the pool are dropped, as the engine's padding tokens need)."""
    body = partial(_write_local, page=pool.shape[1], axis=axis)
    return shard_map(body, mesh=mesh, in_specs=(P(None, axis, None), P(), P()),
                     out_specs=P(None, axis, None), check_vma=False)(pool, flat_slots, rows)


def write_at(pool: jax.Array, page_table: jax.Array, entries: jax.Array, start: jax.Array, *,
             mesh: Mesh, axis: str) -> jax.Array:
    """As `models.deepseek.write_latent` (entries [B, S, W] at token slots start[b] ..) on a
    sharded pool."""
    page = pool.shape[1]
    pos = start[:, None].astype(jnp.int32) + jnp.arange(entries.shape[1], dtype=jnp.int32)
    pg = jnp.take_along_axis(page_table, pos // page, axis=1)
    flat = (pg * page + pos % page).reshape(-1)
    return write(pool, flat, entries.reshape(-1, entries.shape[-1]), mesh=mesh, axis=axis)


def _candidate_scores(iq, iw, cand, scale, fp8: bool) -> jax.Array:
    """float32 [B, S, k]: the indexer's score of each candidate key cand [B, S, k, Di] (FP8
    values with scale [B, S, k] when fp8) for queries iq [B, S, Hi, Di], weights iw."""
    hi = jax.lax.Precision.HIGHEST
    if fp8:
        q8, w8 = fp8_index_queries(iq, iw)
        dots = jnp.einsum("bshd,bskd->bshk", q8.astype(jnp.float32), cand.astype(jnp.float32),
                          precision=hi)
        return jnp.einsum("bsh,bshk->bsk", w8, jnp.maximum(dots, 0.0), precision=hi) * scale
    dots = jnp.einsum("bshd,bskd->bshk", iq.astype(jnp.float32), cand.astype(jnp.float32),
                      precision=hi)
    return jnp.einsum("bsh,bshk->bsk", iw.astype(jnp.float32), jnp.maximum(dots, 0.0),
                      precision=hi)


def _select_local(iq, iw, pool, page_table, cache_index, *, topk: int, page: int, axis: str,
                  fp8: bool, impl: str):
    """One device: the global top-k positions [B, 1, K] of decode queries iq [B, 1, Hi, Di]
    over every device's keys (module docstring)."""
    b, p = page_table.shape
    w = pool.shape[1]
    d = jax.lax.axis_index(axis)
    cached = jnp.take(pool, page_table, axis=0).reshape(b, p * w, -1)  # local keys, [B, T/g, W]
    # keys at positions <= cache_index: a prefix of the local ones
    c = cache_index.astype(jnp.int32)
    count = (c // page) * w + jnp.clip(c % page - d * w + 1, 0, w)
    kl = min(topk, p * w)
    if pool.dtype == jnp.uint8:
        keys, scale = unpack_index_keys(cached)
        local = index_topk(iq, iw, keys, kl, q_offset=count - 1, k_scale=scale, impl=impl)
    else:
        keys, scale = cached.astype(iq.dtype), None
        local = index_topk(iq, iw, keys, kl, q_offset=count - 1, fp8=fp8, impl=impl)
    safe = jnp.maximum(local, 0)  # [B, 1, kl]
    cand = jnp.take_along_axis(keys[:, None], safe[..., None], axis=2)  # [B, 1, kl, Di]
    if scale is not None:
        cand_scale = jnp.take_along_axis(scale[:, None], safe, axis=2)
    elif fp8:  # FP8 scoring of unquantized keys: quantize the candidates as the scoring did
        cand, cand_scale = quantize_e4m3(cand)
    else:
        cand_scale = None
    score = _candidate_scores(iq, iw, cand, cand_scale, scale is not None or fp8)
    score = jnp.where(local >= 0, canonical(score), -jnp.inf)
    pos = (safe // w) * page + d * w + safe % w
    big = jnp.int32(p * page)
    pos = jnp.where(local >= 0, pos, big)
    score = jax.lax.all_gather(score, axis, axis=2, tiled=True)  # [B, 1, g kl]
    pos = jax.lax.all_gather(pos, axis, axis=2, tiled=True)
    order = jnp.argsort(pos, axis=-1)  # position order: top_k's ties go to the earlier key
    score, pos = (jnp.take_along_axis(x, order, axis=-1) for x in (score, pos))
    val, j = jax.lax.top_k(score, min(topk, p * page))
    sel = jnp.sort(jnp.where(val > -jnp.inf, jnp.take_along_axis(pos, j, axis=-1), big), axis=-1)
    return jnp.where(sel < big, sel, -1)


def select(attn, qr: jax.Array, x: jax.Array, cos: jax.Array, sin: jax.Array, pool: jax.Array,
           page_table: jax.Array, cache_index: jax.Array, dsa, *, mesh: Mesh,
           axis: str) -> jax.Array:
    """`DSAttention.select_cached` for one decode token per row over a sharded pool: rows of
    the flattened latent pages int32 [B, 1, K] (-1: none), the same on every device."""
    iq, iw = attn.indexer.queries(qr, x, cos, sin)
    body = partial(_select_local, topk=attn.cfg.index_topk, page=pool.shape[1], axis=axis,
                   fp8=dsa.fp8, impl=dsa.index_impl)
    idx = shard_map(body, mesh=mesh, in_specs=(P(), P(), P(None, axis, None), P(), P()),
                    out_specs=P(), check_vma=False)(iq, iw, pool, page_table, cache_index)
    return page_rows(page_table, idx, pool.shape[1])


__all__ = ["LAYOUTS", "make_pools", "pool_sharding", "select", "write", "write_at"]
