"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2) as a Flax NNX module.

Read top to bottom: Attention -> Block -> Llama. Family differences are config fields
(biases, q/k norm, RoPE scaling, sliding window). All attention goes through
`jaxprefill.attention.attend`.

Parameter layout (JAX-friendly, not HF's): q kernel [E, Hq, D], k/v [E, Hkv, D], o [Hq, D, E],
MLP [E, F] / [F, E], embedding [V, E], lm_head [E, V]. `jaxprefill.loading.hf` converts.

Shapes: B batch, S tokens, E hidden, H heads, D head dim, V vocab, T cache length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxprefill.attention import AttentionSpec, LayoutShare, attend
from jaxprefill.config import ModelConfig
from jaxprefill.models.layers import (RMSNorm, SwiGLU, apply_rope, dense, param, rope_cos_sin,
                                      rope_inv_freq)


@struct.dataclass
class KVCache:
    """Contiguous cache, one [B, T, Hkv, D] array per layer for k and v (tuples of length L).

    Slot t of row b holds key index t. Per-layer arrays (not one stacked array) let a donated
    cache be updated in place without restacking every step.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
        return cls(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)))


def write_rows(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """cache [B, T, H, D] with new [B, S, H, D] written at per-row offsets start [B]."""
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n, s, axis=0))(
        cache, new.astype(cache.dtype), start)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        e, hq, hkv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q = param(rngs, (e, hq, d), ("embed", "heads", "head_dim"), param_dtype)
        self.k = param(rngs, (e, hkv, d), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.v = param(rngs, (e, hkv, d), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.o = param(rngs, (hq, d, e), ("heads", "head_dim", "embed"), param_dtype)
        if cfg.qkv_bias:
            self.q_bias = param(None, (hq, d), ("heads", "head_dim"), param_dtype, init="zeros")
            self.k_bias = param(None, (hkv, d), ("kv_heads", "head_dim"), param_dtype, init="zeros")
            self.v_bias = param(None, (hkv, d), ("kv_heads", "head_dim"), param_dtype, init="zeros")
        if cfg.o_bias:
            self.o_bias = param(None, (e,), ("embed",), param_dtype, init="zeros")
        if cfg.qk_norm:  # Qwen3: RMSNorm over head_dim before RoPE
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.cfg = cfg

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, *, spec: AttentionSpec,
                 segment_ids: jax.Array | None, cache: tuple[jax.Array, jax.Array] | None,
                 cache_index: jax.Array | None, layer: int | None = None,
                 lengths: jax.Array | None = None, share: LayoutShare | None = None):
        """x [B, S, E] -> ([B, S, E], updated (k, v) cache or None).

        `layer`, `lengths` [B] (valid tokens per row) and `share` (the forward's layouts, for
        layers that share one) feed sparse prefill (AttentionSpec.sparse).
        """
        q, k, v = self.project(x, cos, sin)
        if cache is None or cache_index is None:
            # Self-attention within this chunk: training, packed rows, or a fresh prefill that
            # fills cache slots 0..S-1 (the fast causal path: no mask array, cuDNN on GPU).
            segs = None if segment_ids is None else (segment_ids, segment_ids)
            out = attend(q, k, v, causal=True, segment_ids=segs, window=self.cfg.sliding_window,
                         spec=spec, layer=layer, lengths=lengths, share=share)
            if cache is not None:
                if spec.context is not None:  # k, v are in ring order; the cache is natural
                    k, v = spec.context.natural(k), spec.context.natural(v)
                start = jnp.zeros((x.shape[0],), jnp.int32)
                cache = (write_rows(cache[0], k, start), write_rows(cache[1], v, start))
        else:  # continue rows: write this chunk at cache_index, attend over the whole cache
            dt = x.dtype
            k_cache = write_rows(cache[0], k, cache_index)
            v_cache = write_rows(cache[1], v, cache_index)
            out = attend(q, k_cache.astype(dt), v_cache.astype(dt), causal=True, q_offset=cache_index,
                         window=self.cfg.sliding_window, spec=spec, layer=layer, lengths=lengths,
                         share=share)
            cache = (k_cache, v_cache)
        y = dense("bshd,hde->bse", out, self.o)
        if self.cfg.o_bias:
            y = y + self.o_bias[...].astype(x.dtype)
        return y, cache

    def project(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """x [B, S, E] -> q [B, S, Hq, D], k, v [B, S, Hkv, D] (post-RoPE)."""
        cfg, dt = self.cfg, x.dtype
        q = dense("bse,ehd->bshd", x, self.q)
        k = dense("bse,ehd->bshd", x, self.k)
        v = dense("bse,ehd->bshd", x, self.v)
        if cfg.qkv_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attn = Attention(cfg, rngs=rngs, param_dtype=param_dtype)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias, rngs=rngs,
                          param_dtype=param_dtype)

    def __call__(self, x, cos, sin, **attn_kwargs):
        h, cache = self.attn(self.attn_norm(x), cos, sin, **attn_kwargs)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache


class Llama(nnx.Module):
    """The decoder. `model(tokens)` -> logits; `model.forward(...)` for caches and packing."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, attention: AttentionSpec = AttentionSpec()):
        self.config = cfg
        self.dtype = dtype  # compute dtype
        self.attention = attention
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype)
        self.layers = nnx.List([Block(cfg, rngs=rngs, param_dtype=param_dtype)
                                for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                 param_dtype)
        inv_freq, scale = rope_inv_freq(cfg.rope, cfg.head_dim)
        self.rope = (tuple(float(f) for f in inv_freq), scale)  # static: not a parameter

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens int32 [B, S] -> logits [B, S, V] (float32). Packed rows: pass per-document
        `positions` and `segment_ids` [B, S]."""
        hidden, _ = self.forward(tokens, positions, segment_ids)
        return self.logits(hidden)

    def block_kwargs(self, i: int) -> dict:
        """Layer i's call arguments besides inputs, cache and lengths (the training step's
        remat path calls the layers with them too)."""
        return {"layer": i}

    def forward(self, tokens: jax.Array, positions: jax.Array | None = None,
                segment_ids: jax.Array | None = None, cache: KVCache | None = None,
                cache_index: jax.Array | None = None,
                lengths: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """Hidden states [B, S, E] after the final norm, and the updated cache.

        With a cache and `cache_index` [B], the S new tokens of row b are written at slots
        cache_index[b]..+S-1 and attend to every earlier slot of that row (positions default to
        those slot indices). With a cache and no `cache_index`, this is a fresh prefill: tokens
        fill slots 0..S-1 and attend only to each other (segment ids allowed). `lengths` [B]:
        valid tokens per right-padded row, read by sparse prefill estimation only.
        With a context-parallel attention spec, a fresh prefill runs in ring order over a padded
        length (`jaxprefill.parallel.context`); outputs and cache come back in natural order.
        """
        b, s = tokens.shape
        ring = self.attention.context if cache_index is None else None
        if ring is not None:
            tokens, positions, segment_ids, lengths = ring.enter(tokens, positions, segment_ids,
                                                                 lengths)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            if cache_index is not None:
                positions = positions + cache_index[:, None]
        if cache_index is not None and segment_ids is not None:
            raise ValueError("segment_ids when continuing a cached row is not supported: "
                             "use one sequence per cache row")
        inv_freq, scale = self.rope
        cos, sin = rope_cos_sin(positions, jnp.asarray(inv_freq), scale)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        share = LayoutShare() if self.attention.sparse is not None else None
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            x, layer_cache = layer(x, cos, sin, spec=self.attention, segment_ids=segment_ids,
                                   cache=layer_cache, cache_index=cache_index,
                                   lengths=lengths, share=share, **self.block_kwargs(i))
            if cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])
        x = self.norm(x)
        if ring is not None:
            x = ring.exit(x, s)
        if cache is not None:
            cache = KVCache(tuple(new_k), tuple(new_v))
        return x, cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., E] -> float32 logits [..., V]."""
        if self.config.tie_word_embeddings:
            w = self.embed[...].astype(hidden.dtype).T
        else:
            w = self.lm_head[...].astype(hidden.dtype)
        return (hidden @ w).astype(jnp.float32)
