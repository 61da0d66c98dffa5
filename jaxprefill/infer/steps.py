"""The engine's three jitted steps, pure functions of (graphdef, state, paged cache, batch).

  prefill_packed: rows of several whole prompts (segment ids, restarted positions), fresh.
  prefill_chunk:  rows holding one chunk of one prompt each, attending to its cached prefix
                  (queries start at key index `start`: the dispatch's q_offset).
  decode:         one token per slot.
Each writes the new K/V into the paged cache and samples a next token per finishing sequence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprefill.decoding import Sampling, next_tokens
from jaxprefill.infer.paged_cache import PagedKVCache, gather_view, slot_ids, write_back
from jaxprefill.models import KVCache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(2,))
def prefill_packed(graphdef, state, cache: PagedKVCache, tokens, positions, segment_ids, slots,
                   last_index, sampling: Sampling, steps):
    """tokens/positions/segment_ids/slots int32 [R, C]; segment id 0 = padding.

    slots: flat cache slot of each token (out of range for padding). last_index [N]: flat index
    (r * C + c) of the last prompt token of each sequence finishing here (N static; padding
    entries are ignored by the caller). Returns (next tokens [N], cache).
    """
    model = nnx.merge(graphdef, state)
    r, c = tokens.shape
    view = KVCache.zeros(model.config, r, c, cache.k[0].dtype)
    hidden, view = model.forward(tokens, positions, segment_ids, cache=view)
    cache = write_back(cache, view, jnp.broadcast_to(jnp.arange(c), (r, c)), slots)
    last = hidden.reshape(r * c, -1)[last_index]
    return next_tokens(model, last, sampling, steps), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(2,))
def prefill_chunk(graphdef, state, cache: PagedKVCache, tokens, page_table, start, n_valid,
                  sampling: Sampling, steps):
    """tokens [R, C]: row r holds prompt tokens start[r] .. start[r] + n_valid[r] - 1 of its
    sequence (page_table [R, P]). Returns (next token after each row's last valid token [R],
    cache)."""
    model = nnx.merge(graphdef, state)
    r, c = tokens.shape
    view = gather_view(cache, page_table)
    # lengths: valid queries per row (sparse prefill builds the chunk's layout from them)
    hidden, view = model.forward(tokens, cache=view, cache_index=start, lengths=n_valid)
    pos = start[:, None] + jnp.arange(c)[None, :]
    valid = jnp.arange(c)[None, :] < n_valid[:, None]
    cache = write_back(cache, view, jnp.where(valid, pos, 0),
                       slot_ids(page_table, jnp.where(valid, pos, 0), valid, cache))
    last = jnp.take_along_axis(hidden, (n_valid - 1)[:, None, None], axis=1)[:, 0]
    return next_tokens(model, last, sampling, steps), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(2,))
def decode(graphdef, state, cache: PagedKVCache, tokens, page_table, index, sampling: Sampling,
           steps):
    """tokens [B] at key index `index` [B] of each slot's sequence -> (next tokens [B], cache)."""
    model = nnx.merge(graphdef, state)
    view = gather_view(cache, page_table)
    hidden, view = model.forward(tokens[:, None], cache=view, cache_index=index)
    pos = index[:, None]
    ones = jnp.ones_like(pos, bool)
    cache = write_back(cache, view, pos, slot_ids(page_table, pos, ones, cache))
    return next_tokens(model, hidden[:, 0], sampling, steps), cache
