"""Paged latent cache for MLA models (DeepSeek-V2/V3, Kimi-K2) and the engine's MLA steps.

Layout per layer: pages [num_pages, page_size, d_c + d_r] (DeepSeek-V3: 64 x 576) holding each
token's [normalized latent | roped shared key]; never per-head K/V. The page pool and its
allocator are the engine's (page 0 is scratch, see jaxprefill/infer/paged_cache.py): a sequence's page-table row
lists its pages, exactly the `MLACache(pages, page_table)` the model reads and writes, so

  * chunked prefill passes the pool itself with the chunk rows' page tables: the model writes
    the chunk's latents at `cache_index` and attends (decompressed) over the cached prefix;
  * decode passes the pool with the slots' page tables: the absorbed form through
    `pallas_kernels.mla_decode` reads the pages in place (no view copy);
  * packed prefill rows (several prompts, restarted positions) write into a contiguous view
    (`MLACache.zeros`), copied to each token's own slot afterwards (a row's tokens belong to
    different sequences, so one page-table row cannot describe them).
The three steps have the signatures of `jaxprefill.infer.steps`', so the engine calls either
set.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from jaxprefill.decoding import Sampling, next_tokens
from jaxprefill.graph import merge
from jaxprefill.models.deepseek import MLACache
from jaxprefill.scatter import distinct_drops


@struct.dataclass
class PagedLatentCache:
    pages: tuple[jax.Array, ...]  # per layer [num_pages, page_size, d_c + d_r]

    @classmethod
    def zeros(cls, cfg, num_pages: int, page_size: int, dtype) -> "PagedLatentCache":
        shape = (num_pages, page_size, cfg.latent_dim)
        return cls(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)))

    @property
    def page_size(self) -> int:
        return self.pages[0].shape[1]

    @property
    def num_pages(self) -> int:
        return self.pages[0].shape[0]


def _mla_cache(cache: PagedLatentCache, page_table: jax.Array):
    return MLACache(cache.pages, page_table)



def scatter_rows(pool: jax.Array, view: jax.Array, slots: jax.Array) -> jax.Array:
    """Copy packed rows from a contiguous view into their pool slots.

    view [R * P, page, w] (row b owns pages b*P..: token t of row b is flat b*P*page + t);
    slots int32 [R, C] the pool slot of each row token (past the pool: dropped, padding);
    pool [num_pages, page, w]. Returns the updated pool.
    """
    r, c = slots.shape
    rows = view.reshape(r, -1, view.shape[-1])[:, :c].reshape(r * c, -1)
    flat = pool.reshape(-1, pool.shape[-1])
    idx = distinct_drops(slots.reshape(-1), flat.shape[0])
    return flat.at[idx].set(rows.astype(pool.dtype), mode="drop",
                            unique_indices=True).reshape(pool.shape)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(2,))
def prefill_packed(graphdef, state, cache: PagedLatentCache, tokens, positions, segment_ids,
                   slots, last_index, sampling: Sampling, steps):
    """As steps.prefill_packed: tokens/positions/segment_ids/slots int32 [R, C]."""
    model = merge(graphdef, state)
    r, c = tokens.shape
    view = MLACache.zeros(model.config, r, c, cache.pages[0].dtype, page_size=cache.page_size)
    hidden, view = model.forward(tokens, positions, segment_ids, cache=view)
    cache = PagedLatentCache(tuple(scatter_rows(p, v, slots) for p, v in zip(cache.pages,
                                                                           view.pages)))
    last = hidden.reshape(r * c, -1)[last_index]
    return next_tokens(model, last, sampling, steps), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(2,))
def prefill_chunk(graphdef, state, cache: PagedLatentCache, tokens, page_table, start, n_valid,
                  sampling: Sampling, steps):
    """As steps.prefill_chunk. Padding queries past n_valid write latents into positions the
    sequence has not reached (its own pages, overwritten by decode before they are read) or
    the scratch page: page_table must cover start + C."""
    model = merge(graphdef, state)
    # lengths: valid queries per row (sparse prefill builds the chunk's layout from them)
    hidden, new = model.forward(tokens, cache=_mla_cache(cache, page_table), cache_index=start,
                                lengths=n_valid)
    last = jnp.take_along_axis(hidden, (n_valid - 1)[:, None, None], axis=1)[:, 0]
    return next_tokens(model, last, sampling, steps), PagedLatentCache(new.pages)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(2,))
def decode(graphdef, state, cache: PagedLatentCache, tokens, page_table, index,
           sampling: Sampling, steps):
    """As steps.decode: absorbed MLA decode over the pages (model.absorb, model.decode_impl)."""
    model = merge(graphdef, state)
    hidden, new = model.forward(tokens[:, None], cache=_mla_cache(cache, page_table),
                                cache_index=index)
    return next_tokens(model, hidden[:, 0], sampling, steps), PagedLatentCache(new.pages)
