"""The engine's paged cache and steps for DeepSeek-V3.2 (MLA + the DSA indexer).

As `latent_cache` (same page pool, allocator and page tables), with one more pool per layer:
the indexer's keys [num_pages, page_size, index_head_dim] beside the latent pages
[num_pages, page_size, d_c + d_r], under the same page ids, so a page table row addresses both.

  * chunked prefill passes both pools with the chunk rows' page tables: the model writes the
    chunk's latents and index keys at `cache_index`, scores the chunk's index queries against
    every cached key (causal limit start + i) and attends over the selected latent rows;
  * decode: the same for one token per slot (sparse MLA decode over the selected rows);
  * packed prefill rows write into a contiguous view (`DSACache.zeros`; segment ids keep the
    indexer within each prompt), copied to each token's own slot afterwards.
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
from jaxprefill.mla.latent_cache import scatter_rows
from jaxprefill.models.dsa import DSACache, index_pool


@struct.dataclass
class PagedDSACache:
    pages: tuple[jax.Array, ...]        # per layer [num_pages, page_size, d_c + d_r]
    index_pages: tuple[jax.Array, ...]  # per layer [num_pages, page_size, index_head_dim]
    #                                     (FP8 rows: uint8 [..., index_head_dim + 4])

    @classmethod
    def zeros(cls, cfg, num_pages: int, page_size: int, dtype, *,
              index_fp8: bool = False) -> "PagedDSACache":
        lat = (num_pages, page_size, cfg.latent_dim)
        return cls(tuple(jnp.zeros(lat, dtype) for _ in range(cfg.num_layers)),
                   tuple(index_pool(cfg, num_pages, page_size, dtype, index_fp8)
                         for _ in range(cfg.num_layers)))

    @property
    def index_fp8(self) -> bool:
        return self.index_pages[0].dtype == jnp.uint8

    @property
    def page_size(self) -> int:
        return self.pages[0].shape[1]

    @property
    def num_pages(self) -> int:
        return self.pages[0].shape[0]


def _view(cache: PagedDSACache, page_table: jax.Array) -> DSACache:
    return DSACache(cache.pages, cache.index_pages, page_table)



@functools.partial(jax.jit, static_argnums=0, donate_argnums=(2,))
def prefill_packed(graphdef, state, cache: PagedDSACache, tokens, positions, segment_ids,
                   slots, last_index, sampling: Sampling, steps):
    """As steps.prefill_packed: tokens/positions/segment_ids/slots int32 [R, C]."""
    model = merge(graphdef, state)
    r, c = tokens.shape
    view = DSACache.zeros(model.config, r, c, cache.pages[0].dtype, page_size=cache.page_size,
                          index_fp8=cache.index_fp8)
    hidden, view = model.forward(tokens, positions, segment_ids, cache=view)
    cache = PagedDSACache(
        tuple(scatter_rows(p, v, slots) for p, v in zip(cache.pages, view.pages)),
        tuple(scatter_rows(p, v, slots) for p, v in zip(cache.index_pages, view.index_pages)))
    last = hidden.reshape(r * c, -1)[last_index]
    return next_tokens(model, last, sampling, steps), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(2,))
def prefill_chunk(graphdef, state, cache: PagedDSACache, tokens, page_table, start, n_valid,
                  sampling: Sampling, steps):
    """As steps.prefill_chunk. Padding queries past n_valid write into positions the sequence
    has not reached (overwritten before they are read; past every valid query's causal limit,
    so the indexer never selects them) or the scratch page."""
    model = merge(graphdef, state)
    hidden, new = model.forward(tokens, cache=_view(cache, page_table), cache_index=start)
    last = jnp.take_along_axis(hidden, (n_valid - 1)[:, None, None], axis=1)[:, 0]
    return next_tokens(model, last, sampling, steps), PagedDSACache(new.pages, new.index_pages)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(2,))
def decode(graphdef, state, cache: PagedDSACache, tokens, page_table, index,
           sampling: Sampling, steps):
    """As steps.decode: the indexer over the cached keys, sparse MLA over the selected rows."""
    model = merge(graphdef, state)
    hidden, new = model.forward(tokens[:, None], cache=_view(cache, page_table),
                                cache_index=index)
    return next_tokens(model, hidden[:, 0], sampling, steps), PagedDSACache(new.pages,
                                                                          new.index_pages)
