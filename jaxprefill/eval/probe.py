"""Per-layer q, k, v of a dense forward pass (the activations sparse policies see)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprefill.models.layers import rope_cos_sin


@functools.partial(jax.jit, static_argnums=0)
def _capture(graphdef, state, tokens):
    model = nnx.merge(graphdef, state)
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    inv_freq, scale = model.rope
    cos, sin = rope_cos_sin(positions, jnp.asarray(inv_freq), scale)
    x = jnp.take(model.embed[...], tokens, axis=0).astype(model.dtype)
    qs, ks, vs = [], [], []
    for layer in model.layers:
        # The block's own projection (same code path as the model), then the real block step.
        q, k, v = layer.attn.project(layer.attn_norm(x), cos, sin)
        qs.append(q)
        ks.append(k)
        vs.append(v)
        x, _ = layer(x, cos, sin, spec=model.attention, segment_ids=None, cache=None,
                     cache_index=None)
    return jnp.stack(qs), jnp.stack(ks), jnp.stack(vs)


def capture_qkv(model, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Dense forward of a Llama-family model; per-layer post-RoPE activations.

    Args:
      model: jaxprefill Llama (its AttentionSpec must be dense: sparse would change later layers).
      tokens: int32 [B, S].
    Returns:
      q [L, B, S, Hq, D], k [L, B, S, Hkv, D], v [L, B, S, Hkv, D].
    """
    if getattr(model.attention, "sparse", None) is not None:
        raise ValueError("capture_qkv needs a dense model (AttentionSpec.sparse is set)")
    graphdef, state = nnx.split(model)
    return _capture(graphdef, state, jnp.asarray(tokens, jnp.int32))
