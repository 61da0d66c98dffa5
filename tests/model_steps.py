"""A jitted cached forward of any model, shared by the cache tests (Llama-style, MLA, DSA)."""

import jax
from flax import nnx


def cached_step(model):
    """Jitted (tokens [B, S], cache, cache_index [B] or None) -> (float32 logits [B, S, V],
    cache): `model.forward` over a cache (a prefill from 0 when cache_index is None)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens, cache, index):
        m = nnx.merge(graphdef, state)
        h, cache = m.forward(tokens, cache=cache, cache_index=index)
        return m.logits(h), cache

    return lambda tokens, cache, index: run(state, tokens, cache, index)
