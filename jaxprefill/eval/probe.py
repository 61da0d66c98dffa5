"""Per-layer q, k, v of a dense forward pass (the activations sparse policies see)."""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprefill.models.layers import rope_cos_sin


def _embed(model, tokens: jax.Array):
    """The model's input step: embeddings [B, S, E] and RoPE tables for positions 0..S-1."""
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    inv_freq, scale = model.rope
    cos, sin = rope_cos_sin(positions, jnp.asarray(inv_freq), scale)
    return jnp.take(model.embed[...], tokens, axis=0).astype(model.dtype), cos, sin


@functools.partial(jax.jit, static_argnums=0)
def _capture(graphdef, state, tokens):
    model = nnx.merge(graphdef, state)
    x, cos, sin = _embed(model, tokens)
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


@functools.partial(jax.jit, static_argnums=0)
def _embed_step(graphdef, state, tokens):
    return _embed(nnx.merge(graphdef, state), tokens)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _layer_step(graphdef, state, x, cos, sin, spec):
    """One block: its q, k, v (post-RoPE) and its output. Every block of a model has the same
    graphdef, so this compiles once per shape for all layers."""
    layer = nnx.merge(graphdef, state)
    q, k, v = layer.attn.project(layer.attn_norm(x), cos, sin)
    x, _ = layer(x, cos, sin, spec=spec, segment_ids=None, cache=None, cache_index=None)
    return x, q, k, v


def layer_qkv(model, tokens: jax.Array) -> Iterator[tuple[int, jax.Array, jax.Array, jax.Array]]:
    """:func:`capture_qkv` one layer at a time: yields (layer, q, k, v) with q [B, S, Hq, D],
    k / v [B, S, Hkv, D]. Only one layer's activations are alive at a time, so memory does not
    grow with the number of layers (capture_qkv holds all of them: 35 GiB for 20 prompts of 8K
    tokens on SmolLM2-135M in float32)."""
    if getattr(model.attention, "sparse", None) is not None:
        raise ValueError("layer_qkv needs a dense model (AttentionSpec.sparse is set)")
    graphdef, state = nnx.split(model)
    x, cos, sin = _embed_step(graphdef, state, jnp.asarray(tokens, jnp.int32))
    for i, layer in enumerate(model.layers):
        lg, ls = nnx.split(layer)
        x, q, k, v = _layer_step(lg, ls, x, cos, sin, model.attention)
        yield i, q, k, v


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
def _streamed_logprobs(graphdef, state, tokens, stream, qpos, sink, local, block, impl):
    from jaxprefill.sparse.base import make_geometry
    from jaxprefill.sparse.select import mask_to_lists
    from jaxprefill.sparse.streaming import streaming_blocks
    from pallas_kernels import BlockSparseLayout, block_sparse_attention

    model = nnx.merge(graphdef, state)
    x, cos, sin = _embed(model, tokens)
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        q, k, v = attn.project(layer.attn_norm(x), cos, sin)
        geo = make_geometry(q, k, block, None)
        window = streaming_blocks(geo, sink, local)[:, None]  # [1, 1, n, n]
        mask = jnp.where(stream[i][None, :, None, None], window, geo.causal())  # [B, Hkv, n, n]
        kv_idx, kv_cnt = mask_to_lists(mask, geo.n)
        layout = BlockSparseLayout(kv_idx, kv_cnt, block, block, geo.n)
        out = block_sparse_attention(q, k, v, layout, causal=True, impl=impl)
        y = jnp.einsum("bshd,hde->bse", out, attn.o[...].astype(x.dtype))
        if attn.cfg.o_bias:
            y = y + attn.o_bias[...].astype(x.dtype)
        x = x + y
        x = x + layer.mlp(layer.mlp_norm(x))
    hidden = jnp.take_along_axis(x, qpos[..., None], axis=1)  # [B, A, E]
    return jax.nn.log_softmax(model.logits(model.norm(hidden)), axis=-1)


def streamed_heads_logprobs(model, tokens: jax.Array, stream: jax.Array, qpos: jax.Array, *,
                            sink: int, local: int, block: int = 128,
                            impl: str = "auto") -> jax.Array:
    """Next-token log-probabilities with some KV heads streaming (sink + local window blocks,
    as the ``streaming`` policy lays them out) and the others dense, in every layer.

    The selection is data: one compile serves every head selection (the retrieval-head search
    scores many). Args: tokens int32 [B, S] (right padding is harmless: causal); stream bool
    [L, Hkv] (True = streaming); qpos int32 [B, A] the positions to read.
    Returns float32 [B, A, V]: log-softmax of the logits at qpos (predicting qpos + 1).
    """
    if getattr(model.attention, "sparse", None) is not None:
        raise ValueError("streamed_heads_logprobs needs a dense model (AttentionSpec.sparse "
                         "is set)")
    n_layers, hkv = len(model.layers), model.config.num_kv_heads
    if stream.shape != (n_layers, hkv):
        raise ValueError(f"stream must be [layers, kv heads] = {(n_layers, hkv)}, "
                         f"got {tuple(stream.shape)}")
    graphdef, state = nnx.split(model)
    return _streamed_logprobs(graphdef, state, jnp.asarray(tokens, jnp.int32),
                              jnp.asarray(stream, bool), jnp.asarray(qpos, jnp.int32), sink,
                              local, block, impl)
