"""TPLA decode in the engine for DeepSeek-V3.2 (DSA) models: the latent pool sharded over a
`tensor` mesh axis as in `tpla_steps`, the indexer's keys replicated beside it.

`EngineConfig(tpla={"tensor": g, ...})` with a `DeepSeekV32` model runs:
  * the model through `jaxprefill.mla.tpla.reparameterize` (exact; the indexer is untouched);
  * per layer a latent pool [num_pages, page, g*w] (`tpla.pack_latent` layout, sharded over
    its last axis) and an index-key pool [num_pages, page, Di] (FP8 rows [..., Di + 4] with
    `DSAOptions(fp8=True)`) under the same page ids: replicated on every device, or with
    `tpla={..., "index_keys": "sharded"}` split by page slot over `tensor`
    (`dsa_index_shards`: each device holds page / g slots of every page and the decode's
    top-k merges g local top-k);
  * prefill as exact DSA (the model's own layers: sparse, or dense for calls of at most
    `index_topk` keys), writing the packed latent and the index keys. A chunk attends over a
    view of its rows' cached entries, the exact latent unpacked from the pool (norm="global");
  * decode: every device runs the same indexer over the same replicated keys (causal limit,
    the deterministic tie rule: the same top-k everywhere), then TPLA restricted to the
    selected rows (`tpla.tpla_sparse_decode`: each shard's own softmax over those rows of its
    latent slice, merged as `tpla_decode` merges). Caches of at most `index_topk` slots run
    dense TPLA (`tpla_decode`), as the plain DSA model runs dense MLA there.
g = 1 is the plain DSA engine up to rounding. The three steps have `jaxprefill.infer.steps`'
signatures once bound to (mesh, tcfg).

Shapes: B rows, S tokens, P pages per row, H heads, d_c latent, d_r rope, Di index key,
g shards, w = d_c/g + (d_r or d_r/g) latent values per token per device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxprefill.decoding import Sampling, next_tokens, sample
from jaxprefill.graph import merge
from jaxprefill.mla import dsa_index_shards as shards
from jaxprefill.mla import tpla_steps
from jaxprefill.mla.dsa_cache import PagedDSACache
from jaxprefill.mla.latent_cache import scatter_rows
from jaxprefill.mla.tpla import TPLAConfig, pack_latent, tpla_decode, tpla_sparse_decode
from jaxprefill.mla.tpla_model import folded_w_uv, raw_latent, require_folded
from jaxprefill.models.deepseek import write_latent
from jaxprefill.models.dsa import index_entries, index_pool


@struct.dataclass
class DSATPLACache:
    """The pools of `PagedDSACache` with the rows' `page_table` int32 [B, P]: what the
    model-level steps below read and write."""

    pages: tuple[jax.Array, ...]
    index_pages: tuple[jax.Array, ...]
    page_table: jax.Array

    @classmethod
    def zeros(cls, cfg, batch: int, length: int, *, mesh: Mesh, tcfg: TPLAConfig,
              dtype=jnp.float32, page_size: int = 64, index_fp8: bool = False,
              index_keys: str = "replicated") -> "DSATPLACache":
        """Capacity >= `length` tokens per row; row b owns pages b*P .. b*P+P-1."""
        p = -(-length // page_size)
        pool = make_cache(cfg, batch * p, page_size, dtype, mesh, tcfg, index_fp8=index_fp8,
                          index_keys=index_keys)
        table = jnp.arange(batch * p, dtype=jnp.int32).reshape(batch, p)
        return cls(pool.pages, pool.index_pages, table)


def make_cache(cfg, num_pages: int, page_size: int, dtype, mesh: Mesh, tcfg: TPLAConfig, *,
               index_fp8: bool = False, index_keys: str = "replicated") -> PagedDSACache:
    """Zeroed pools in the plain DSA engine's `PagedDSACache`: per layer the latent pages of
    `tpla_steps.make_cache` ([num_pages, page, g*w], last axis sharded) and index-key pages
    [num_pages, page_size, Di] (FP8 rows [..., Di + 4] with index_fp8), on every device or
    split by page slot (index_keys="sharded")."""
    if index_keys not in shards.LAYOUTS:
        raise ValueError(f"tpla index_keys must be one of {shards.LAYOUTS}, got {index_keys!r}")
    latent = tpla_steps.make_cache(cfg, num_pages, page_size, dtype, mesh, tcfg)
    if index_keys == "sharded":
        return PagedDSACache(latent.pages, shards.make_pools(cfg, num_pages, page_size, dtype,
                                                             mesh, tcfg.axis, index_fp8))
    everywhere = NamedSharding(mesh, P())
    index = tuple(jax.device_put(index_pool(cfg, num_pages, page_size, dtype, index_fp8),
                                 everywhere) for _ in range(cfg.num_layers))
    return PagedDSACache(latent.pages, index)


def cache_entries(attn, h: jax.Array, cos: jax.Array, sin: jax.Array, g: int,
                  tcfg: TPLAConfig, eps: float) -> tuple[jax.Array, jax.Array]:
    """A layer's cache entries of tokens h [B, S, E] (after attn_norm): the packed latent
    [B, S, g*w] (`pack_latent`) and the index keys [B, S, Di]."""
    packed = pack_latent(*raw_latent(attn, h, cos, sin), g, tcfg, eps)
    return packed, attn.indexer.keys(h, cos, sin)


def exact_view(pool: jax.Array, ipool: jax.Array, page_table: jax.Array, cfg, g: int,
               tcfg: TPLAConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The rows' cached entries as a plain DSA layer cache: (latent pages [B*P, page,
    d_c + d_r] unpacked from the pool, exact for norm="global"; index pages [B*P, page, Di];
    page table [B, P] over them). Row b owns view pages b*P .. b*P+P-1."""
    b, p = page_table.shape
    page = pool.shape[1]
    latent = tpla_steps.unpack_latent(jnp.take(pool, page_table, axis=0), cfg, g, tcfg)
    keys = jnp.take(ipool, page_table, axis=0)
    own = jnp.arange(b * p, dtype=jnp.int32).reshape(b, p)
    return latent.reshape(b * p, page, -1), keys.reshape(b * p, page, -1), own


def write_index(ipool: jax.Array, table: jax.Array, keys: jax.Array, start: jax.Array, *,
                mesh: Mesh, tcfg: TPLAConfig, index_keys: str) -> jax.Array:
    """ipool with index keys [B, S, Di] written at token slots start[b] .. of each row (as the
    pool stores them: FP8 rows for a uint8 pool; each device its own slots when sharded)."""
    entries = index_entries(keys, ipool)
    if index_keys == "sharded":
        return shards.write_at(ipool, table, entries, start, mesh=mesh, axis=tcfg.axis)
    return write_latent(ipool, table, entries, start)


def prefill_forward(model, tokens: jax.Array, cache: DSATPLACache, start: jax.Array, *,
                    mesh: Mesh, tcfg: TPLAConfig, index_keys: str = "replicated"
                    ) -> tuple[jax.Array, DSATPLACache]:
    """Exact DSA forward of tokens [B, S] continuing each row at start [B] (0: a prompt's first
    chunk). Each layer writes its packed latents and index keys into the pools, then runs the
    model's own DSA attention over `exact_view` of the rows (the chunk's entries included).
    Returns (hidden states [B, S, E] after the final norm, cache)."""
    model.check_attention()
    require_folded(model)
    cfg, g = model.config, mesh.shape[tcfg.axis]
    positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    cos, sin = model.rope_tables(positions)
    x = jnp.take(model.embed[...], tokens, axis=0).astype(model.dtype)
    table = cache.page_table
    pages, index_pages = [], []
    for i, (layer, pool, ipool) in enumerate(zip(model.layers, cache.pages,
                                                 cache.index_pages)):
        packed, keys = cache_entries(layer.attn, layer.attn_norm(x), cos, sin, g, tcfg,
                                     cfg.rms_norm_eps)
        pool = write_latent(pool, table, packed, start)
        ipool = write_index(ipool, table, keys, start, mesh=mesh, tcfg=tcfg,
                            index_keys=index_keys)
        pages.append(pool)
        index_pages.append(ipool)
        view = exact_view(pool, ipool, table, cfg, g, tcfg)
        x, _ = layer(x, cos, sin, spec=model.attention, segment_ids=None, cache=view,
                     cache_index=start, **model.block_kwargs(i))
    return model.norm(x), DSATPLACache(tuple(pages), tuple(index_pages), table)


def decode_step(model, tokens: jax.Array, cache: DSATPLACache, cache_index: jax.Array, *,
                mesh: Mesh, tcfg: TPLAConfig, index_keys: str = "replicated"
                ) -> tuple[jax.Array, DSATPLACache]:
    """One decode step: tokens [B, 1] at positions cache_index [B] -> (float32 logits [B, V],
    cache with their entries written). Per layer: the indexer's top-k over the cached keys
    (the same on every device: computed whole, or merged from each device's share with
    index_keys="sharded"), then `tpla_sparse_decode` over the selected rows; caches of at most
    `index_topk` slots run `tpla_decode` over every row (the model's own dense rule)."""
    model.check_attention()
    require_folded(model)
    cfg, g = model.config, mesh.shape[tcfg.axis]
    cos, sin = model.rope_tables(cache_index[:, None].astype(jnp.int32))
    x = jnp.take(model.embed[...], tokens, axis=0).astype(model.dtype)
    table = cache.page_table
    pages, index_pages = [], []
    for layer, pool, ipool in zip(model.layers, cache.pages, cache.index_pages):
        attn = layer.attn
        h = layer.attn_norm(x)
        packed, keys = cache_entries(attn, h, cos, sin, g, tcfg, cfg.rms_norm_eps)
        pool = write_latent(pool, table, packed, cache_index)
        ipool = write_index(ipool, table, keys, cache_index, mesh=mesh, tcfg=tcfg,
                            index_keys=index_keys)
        pages.append(pool)
        index_pages.append(ipool)
        qr = attn.query_latent(h)
        q_nope, q_pe = attn.heads(qr, cos, sin)
        q_lat = attn.absorb_query(q_nope)[:, 0].astype(jnp.float32)
        q_pe = q_pe[:, 0].astype(jnp.float32)
        shared = dict(mesh=mesh, tcfg=tcfg, sm_scale=cfg.softmax_scale)
        if attn.reads_all(table, pool.shape[1]):
            o = tpla_decode(q_lat, q_pe, pool, table, cache_index + 1, folded_w_uv(attn),
                            impl=model.decode_impl, **shared)
        else:  # the same selected rows on every device
            if index_keys == "sharded":  # each device's top-k, merged
                rows = shards.select(attn, qr, h, cos, sin, ipool, table, cache_index,
                                     model.dsa, mesh=mesh, axis=tcfg.axis)[:, 0]
            else:  # every device scores every key
                rows = attn.select_cached(qr, h, cos, sin, ipool, table, cache_index,
                                          model.dsa)[:, 0]
            o = tpla_sparse_decode(q_lat, q_pe, pool, rows, folded_w_uv(attn),
                                   impl=model.dsa.sparse_impl, **shared)
        x = x + attn.out_proj(o[:, None].astype(x.dtype))
        x = x + layer.mlp(layer.mlp_norm(x))
    return model.logits(model.norm(x[:, 0])), DSATPLACache(tuple(pages), tuple(index_pages),
                                                           table)


# ---- the engine's steps -------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5,))
def _prefill_packed(mesh, tcfg, index_keys, graphdef, state, cache: PagedDSACache, tokens,
                    positions, segment_ids, slots, last_index, sampling: Sampling, steps):
    """As steps.prefill_packed: the model's own packed DSA prefill (segment ids keep each
    prompt's indexer to its own tokens); each token's entries go to its pool slot."""
    model = merge(graphdef, state)
    model.check_attention()
    cfg, g = model.config, mesh.shape[tcfg.axis]
    r, c = tokens.shape
    cos, sin = model.rope_tables(positions)
    x = jnp.take(model.embed[...], tokens, axis=0).astype(model.dtype)
    pages, index_pages = [], []
    for i, (layer, pool, ipool) in enumerate(zip(model.layers, cache.pages,
                                                 cache.index_pages)):
        packed, keys = cache_entries(layer.attn, layer.attn_norm(x), cos, sin, g, tcfg,
                                     cfg.rms_norm_eps)
        # [R, C, w] is a view of rows of C tokens: scatter_rows puts token (r, t) at slots[r, t]
        pages.append(scatter_rows(pool, packed, slots))
        entries = index_entries(keys, ipool)
        if index_keys == "sharded":
            index_pages.append(shards.write(ipool, slots.reshape(-1),
                                            entries.reshape(r * c, -1), mesh=mesh,
                                            axis=tcfg.axis))
        else:
            index_pages.append(scatter_rows(ipool, entries, slots))
        x, _ = layer(x, cos, sin, spec=model.attention, segment_ids=segment_ids, cache=None,
                     cache_index=None, **model.block_kwargs(i))
    last = model.norm(x).reshape(r * c, -1)[last_index]
    return next_tokens(model, last, sampling, steps), PagedDSACache(tuple(pages),
                                                                   tuple(index_pages))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5,))
def _prefill_chunk(mesh, tcfg, index_keys, graphdef, state, cache: PagedDSACache, tokens,
                   page_table, start, n_valid, sampling: Sampling, steps):
    """As steps.prefill_chunk (padding queries past n_valid write where the sequence has not
    reached, past every valid query's causal limit, or into the scratch page)."""
    model = merge(graphdef, state)
    view = DSATPLACache(cache.pages, cache.index_pages, page_table)
    hidden, new = prefill_forward(model, tokens, view, start, mesh=mesh, tcfg=tcfg,
                                  index_keys=index_keys)
    last = jnp.take_along_axis(hidden, (n_valid - 1)[:, None, None], axis=1)[:, 0]
    return next_tokens(model, last, sampling, steps), PagedDSACache(new.pages,
                                                                   new.index_pages)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5,))
def _decode(mesh, tcfg, index_keys, graphdef, state, cache: PagedDSACache, tokens, page_table,
            index, sampling: Sampling, steps):
    model = merge(graphdef, state)
    view = DSATPLACache(cache.pages, cache.index_pages, page_table)
    logits, new = decode_step(model, tokens[:, None], view, index, mesh=mesh, tcfg=tcfg,
                              index_keys=index_keys)
    return sample(logits, sampling.seeds, steps, sampling.temperature, sampling.top_p,
                  sampling.top_k), PagedDSACache(new.pages, new.index_pages)


class DSATPLASteps:
    """The engine's three steps bound to a mesh, a TPLAConfig and the index-key layout."""

    def __init__(self, mesh: Mesh, tcfg: TPLAConfig, index_keys: str = "replicated"):
        self.prefill_packed = functools.partial(_prefill_packed, mesh, tcfg, index_keys)
        self.prefill_chunk = functools.partial(_prefill_chunk, mesh, tcfg, index_keys)
        self.decode = functools.partial(_decode, mesh, tcfg, index_keys)


def setup(model, spec: dict, num_pages: int, page_size: int):
    """(folded model, DSATPLASteps, pool) for EngineConfig.tpla = spec and a DSA model; the
    settings are checked as `tpla_steps.prepare` checks them, plus the DSA-only
    `index_keys` ("replicated", default, or "sharded": see the module docstring)."""
    spec = dict(spec)
    index_keys = spec.pop("index_keys", "replicated")
    folded, mesh, tcfg = tpla_steps.prepare(model, spec)
    pool = make_cache(model.config, num_pages, page_size, model.dtype, mesh, tcfg,
                      index_keys=index_keys, **model.cache_options)
    return folded, DSATPLASteps(mesh, tcfg, index_keys), pool
