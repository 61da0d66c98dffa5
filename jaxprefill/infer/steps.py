"""The engine's jitted steps, pure functions of (graph, state, paged cache, batch); graph and
state as `jaxprefill.graph.FlatModel` hands them over (or an NNX GraphDef and State).

  prefill_packed: rows of several whole prompts (segment ids, restarted positions), fresh.
  prefill_single: rows of at most one whole prompt each (from token 0, right padding), fresh:
                  a plain causal prompt forward (no segment ids, `lengths`), so attention takes
                  the mask-free causal kernel and sparse policies the whole-prompt ("prompt")
                  layout. The engine runs it when no row of a prefill batch packs two prompts.
  prefill_chunk:  rows holding one chunk of one prompt each, attending to its cached prefix
                  (queries start at key index `start`: the dispatch's q_offset).
  decode:         one token per slot.
Each writes the new K/V into the paged cache and samples a next token per finishing sequence.
`packed_forward` / `single_forward` are the two fresh prefills up to the last hidden states
(the jitted steps add sampling; tests compare their logits).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxprefill.decoding import Sampling, next_tokens
from jaxprefill.graph import merge
from jaxprefill.infer.paged_cache import (PagedKVCache, gather_view, slot_ids, write_back,
                                         write_pages)
from jaxprefill.models import KVCache


def packed_forward(model, cache: PagedKVCache, tokens, positions, segment_ids, slots,
                   last_index) -> tuple[jax.Array, PagedKVCache]:
    """Packed rows -> (hidden [N, E] of the tokens at flat indices last_index [N], cache).

    tokens/positions/segment_ids/slots int32 [R, C]; segment id 0 = padding. slots: flat cache
    slot of each token (out of range for padding: the write drops it).
    """
    return _fresh_forward(model, cache, tokens, slots, last_index, positions=positions,
                          segment_ids=segment_ids)


def single_forward(model, cache: PagedKVCache, tokens, lengths, slots,
                   last_index) -> tuple[jax.Array, PagedKVCache]:
    """Rows of at most one prompt each -> (hidden [N, E] at flat indices last_index [N], cache).

    tokens/slots int32 [R, C]: row r holds one prompt in tokens 0..lengths[r]-1 (right padding;
    an unused row has length 1 and all its slots out of range). lengths int32 [R] is what a
    causal prompt forward takes (`model.forward(tokens, lengths=...)`): positions 0..C-1, no
    segment ids. Padding keys come after every real query, so the causal mask alone keeps them
    out: the result equals `packed_forward` with one segment per row. With a context setting
    (`AttentionSpec.context`) the forward runs ring attention over its padded length
    (`ContextParallel.padded_length(C)`); the paged cache stays replicated on the ring's mesh.
    """
    return _fresh_forward(model, cache, tokens, slots, last_index, whole_pages=True,
                          lengths=lengths)


def _fresh_forward(model, cache: PagedKVCache, tokens, slots, last_index, whole_pages=False,
                   **forward) -> tuple[jax.Array, PagedKVCache]:
    """A fresh prefill of rows [R, C] into a contiguous view, written to the pages at `slots`.

    `whole_pages`: each row holds one prompt from token 0, so its slots fill whole pages in
    order and the write copies pages (`write_pages`: one index per page) rather than tokens.
    """
    r, c = tokens.shape
    ring = getattr(model.attention, "context", None)
    # a ring prefill writes its padded length (natural order); the first c slots are the row's
    width = c if ring is None else ring.padded_length(c)
    view = KVCache.zeros(model.config, r, width, cache.k[0].dtype)
    hidden, view = model.forward(tokens, cache=view, **forward)
    if whole_pages and c % cache.page_size == 0:
        cache = write_pages(cache, view, slots)
    else:
        cache = write_back(cache, view, jnp.broadcast_to(jnp.arange(c), (r, c)), slots)
    if ring is not None:  # whole on every device, as the engine's other steps read it
        cache = jax.lax.with_sharding_constraint(cache, NamedSharding(ring.mesh, P()))
    return hidden.reshape(r * c, -1)[last_index], cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(2,))
def prefill_packed(graphdef, state, cache: PagedKVCache, tokens, positions, segment_ids, slots,
                   last_index, sampling: Sampling, steps):
    """tokens/positions/segment_ids/slots int32 [R, C] (`packed_forward`). last_index [N]: flat
    index (r * C + c) of the last prompt token of each sequence finishing here (N static;
    padding entries are ignored by the caller). Returns (next tokens [N], cache)."""
    model = merge(graphdef, state)
    last, cache = packed_forward(model, cache, tokens, positions, segment_ids, slots, last_index)
    return next_tokens(model, last, sampling, steps), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(2,))
def prefill_single(graphdef, state, cache: PagedKVCache, tokens, lengths, slots, last_index,
                   sampling: Sampling, steps):
    """As `prefill_packed` for rows of at most one prompt each (`single_forward`): tokens/slots
    [R, C], lengths [R], last_index [N]. Returns (next tokens [N], cache)."""
    model = merge(graphdef, state)
    last, cache = single_forward(model, cache, tokens, lengths, slots, last_index)
    return next_tokens(model, last, sampling, steps), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(2,))
def prefill_chunk(graphdef, state, cache: PagedKVCache, tokens, page_table, start, n_valid,
                  sampling: Sampling, steps):
    """tokens [R, C]: row r holds prompt tokens start[r] .. start[r] + n_valid[r] - 1 of its
    sequence (page_table [R, P]). Returns (next token after each row's last valid token [R],
    cache)."""
    model = merge(graphdef, state)
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
    model = merge(graphdef, state)
    view = gather_view(cache, page_table)
    hidden, view = model.forward(tokens[:, None], cache=view, cache_index=index)
    pos = index[:, None]
    ones = jnp.ones_like(pos, bool)
    cache = write_back(cache, view, pos, slot_ids(page_table, pos, ones, cache))
    return next_tokens(model, hidden[:, 0], sampling, steps), cache
