"""DeepSeek-V2 / V3 / Kimi-K2 decoder: MLA attention + DeepSeekMoE, as a Flax NNX module.

Read top to bottom: MLACache -> MLAttention -> Block -> DeepSeek. Same protocol as `Llama`
(`forward(tokens, positions, segment_ids, cache, cache_index)`, `logits`), so
`jaxprefill.generate` drives it; `model.cache_class` is the paged latent cache.

MLA (method: docs/methods/mla.md). Per token x [E]:
  q = q_b(norm(q_a x)) (or q_proj x)            -> per head [q_nope (d_n) | q_pe (d_r)]
  [c_raw | k_pe_raw] = kv_a x;  c = norm(c_raw)   -> the cached latent (d_c) + shared key (d_r)
  k_nope_h = W_UK,h c, v_h = W_UV,h c             (kv_b, [d_c, H, d_n + d_v])
RoPE (YaRN, interleaved pairs) on q_pe and k_pe only; softmax scale tau = qk_head_dim^-0.5 m^2.

Two computation paths:
  * prefill ("decompressed"): per-head K [B,T,H,d_n+d_r] and V [B,T,H,d_v] through `attend`
    (Dqk != Dv); only the 576-wide latent [c | k_pe] is written to the cache.
  * decode ("absorbed", S == 1 with a cache): q_latent_h = W_UK,h^T q_nope_h, attention over
    the latent pages with `pallas_kernels.mla_ops.mla_decode`, output W_UV,h applied after.

Parameter layout: q_a [E, d_q], q_b [d_q, H, d_n+d_r] (or q [E, H, d_n+d_r]),
kv_a [E, d_c+d_r], kv_b [d_c, H, d_n+d_v], o [H, d_v, E]; experts [N, E, F] / [N, F, E].
Shapes: B batch, S new tokens, T cache length, E hidden, H heads, N experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxprefill.attention import AttentionSpec, LayoutShare, attend
from jaxprefill.config import MLAConfig
from jaxprefill.models.layers import (RMSNorm, SwiGLU, apply_rope_pairs, dense, param,
                                      rope_cos_sin_half, rope_inv_freq)
from jaxprefill.models.moe import MoE
from pallas_kernels import mla_decode

PAGE_SIZE = 64


@struct.dataclass
class MLACache:
    """Paged latent cache: per layer `pages[l]` [num_pages, page, d_c + d_r] holding
    [normalized latent | roped shared key] of each token; `page_table` int32 [B, P] (shared by
    all layers): token t of row b lives at pages[l][page_table[b, t // page], t % page].
    Never holds decompressed per-head K/V (576 values/token/layer for DeepSeek-V3)."""

    pages: tuple[jax.Array, ...]
    page_table: jax.Array

    @classmethod
    def zeros(cls, cfg: MLAConfig, batch: int, length: int, dtype=jnp.float32,
              page_size: int = PAGE_SIZE) -> "MLACache":
        """Capacity >= `length` tokens per row; row b owns pages b*P .. b*P+P-1."""
        p = -(-length // page_size)
        shape = (batch * p, page_size, cfg.latent_dim)
        table = jnp.arange(batch * p, dtype=jnp.int32).reshape(batch, p)
        return cls(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)), table)

    @property
    def page_size(self) -> int:
        return self.pages[0].shape[1]


def write_latent(pages: jax.Array, page_table: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """pages with new [B, S, D] written at token slots start[b] .. start[b]+S-1 of each row."""
    ps = pages.shape[1]
    pos = start[:, None].astype(jnp.int32) + jnp.arange(new.shape[1], dtype=jnp.int32)[None]
    page = jnp.take_along_axis(page_table, pos // ps, axis=1)
    return pages.at[page, pos % ps].set(new.astype(pages.dtype))


def gather_latent(pages: jax.Array, page_table: jax.Array) -> jax.Array:
    """Contiguous latent [B, P*page, D] of every row (for decompressed attention)."""
    b = page_table.shape[0]
    return jnp.take(pages, page_table, axis=0).reshape(b, -1, pages.shape[-1])


class MLAttention(nnx.Module):
    def __init__(self, cfg: MLAConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        e, h = cfg.hidden_size, cfg.num_heads
        dc, dr, dqk = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_head_dim
        if cfg.q_lora_rank:
            self.q_a = param(rngs, (e, cfg.q_lora_rank), ("embed", "q_lora"), param_dtype)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, param_dtype=param_dtype)
            self.q_b = param(rngs, (cfg.q_lora_rank, h, dqk), ("q_lora", "heads", "head_dim"),
                             param_dtype)
        else:
            self.q = param(rngs, (e, h, dqk), ("embed", "heads", "head_dim"), param_dtype)
        self.kv_a = param(rngs, (e, dc + dr), ("embed", "kv_lora"), param_dtype)
        self.kv_norm = RMSNorm(dc, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.kv_b = param(rngs, (dc, h, cfg.qk_nope_head_dim + cfg.v_head_dim),
                          ("kv_lora", "heads", "head_dim"), param_dtype)
        self.o = param(rngs, (h, cfg.v_head_dim, e), ("heads", "head_dim", "embed"), param_dtype)
        if cfg.attention_bias:
            if cfg.q_lora_rank:
                self.q_a_bias = param(None, (cfg.q_lora_rank,), ("q_lora",), param_dtype, init="zeros")
            self.kv_a_bias = param(None, (dc + dr,), ("kv_lora",), param_dtype, init="zeros")
            self.o_bias = param(None, (e,), ("embed",), param_dtype, init="zeros")
        self.cfg = cfg

    # -- pieces (also used by TPLA) --------------------------------------------------------------

    def queries(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, S, E] -> q_nope [B, S, H, d_n], q_pe [B, S, H, d_r] (roped)."""
        cfg, dt = self.cfg, x.dtype
        if cfg.q_lora_rank:
            qa = dense("...e,er->...r", x, self.q_a)
            if cfg.attention_bias:
                qa = qa + self.q_a_bias[...].astype(dt)
            q = dense("bsr,rhd->bshd", self.q_a_norm(qa), self.q_b)
        else:
            q = dense("bse,ehd->bshd", x, self.q)
        q_nope, q_pe = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
        return q_nope, apply_rope_pairs(q_pe, cos, sin, interleaved=cfg.rope_interleave)

    def latent(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x [B, S, E] -> cache entries [B, S, d_c + d_r] = [RMSNorm(c) | roped k_pe]."""
        cfg, dt = self.cfg, x.dtype
        kv = dense("...e,ec->...c", x, self.kv_a)
        if cfg.attention_bias:
            kv = kv + self.kv_a_bias[...].astype(dt)
        c, k_pe = kv[..., :cfg.kv_lora_rank], kv[..., cfg.kv_lora_rank:]
        k_pe = apply_rope_pairs(k_pe[:, :, None, :], cos, sin, interleaved=cfg.rope_interleave)[:, :, 0]
        return jnp.concatenate([self.kv_norm(c), k_pe], axis=-1)

    def decompress(self, lat: jax.Array) -> tuple[jax.Array, jax.Array]:
        """latent [B, T, d_c + d_r] -> K [B, T, H, d_n + d_r], V [B, T, H, d_v]."""
        cfg = self.cfg
        c, k_pe = lat[..., :cfg.kv_lora_rank], lat[..., cfg.kv_lora_rank:]
        kv = dense("btc,chd->bthd", c, self.kv_b)
        k_nope, v = kv[..., :cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]
        k_pe = jnp.broadcast_to(k_pe[:, :, None, :], k_nope.shape[:3] + (cfg.qk_rope_head_dim,))
        return jnp.concatenate([k_nope, k_pe], axis=-1), v

    def out_proj(self, o: jax.Array) -> jax.Array:
        """o [B, S, H, d_v] -> [B, S, E]."""
        y = dense("bshd,hde->bse", o, self.o)
        return y + self.o_bias[...].astype(o.dtype) if self.cfg.attention_bias else y

    def absorb_query(self, q_nope: jax.Array) -> jax.Array:
        """q_nope [B, S, H, d_n] -> q_latent [B, S, H, d_c] = W_UK,h^T q_nope_h."""
        w_uk = self.kv_b[...][..., :self.cfg.qk_nope_head_dim].astype(q_nope.dtype)
        return jnp.einsum("bshn,chn->bshc", q_nope, w_uk)

    def absorb_output(self, o_lat: jax.Array) -> jax.Array:
        """o_latent [B, S, H, d_c] -> [B, S, H, d_v] = W_UV,h o_latent_h."""
        w_uv = self.kv_b[...][..., self.cfg.qk_nope_head_dim:].astype(o_lat.dtype)
        return jnp.einsum("bshc,chv->bshv", o_lat, w_uv)

    # -- forward ---------------------------------------------------------------------------------

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, *, spec: AttentionSpec,
                 segment_ids: jax.Array | None, cache: tuple[jax.Array, jax.Array] | None,
                 cache_index: jax.Array | None, absorb: bool = True, decode_impl: str = "auto",
                 layer: int | None = None, lengths: jax.Array | None = None,
                 share: LayoutShare | None = None):
        """x [B, S, E] -> ([B, S, E], updated latent pages or None). cache = (pages, page_table).

        `layer`, `lengths` [B] (valid tokens per row; with a cache_index, valid queries of the
        chunk) and `share` (the forward's layouts, for layers that share one) feed sparse
        prefill (AttentionSpec.sparse) of the decompressed attention."""
        cfg, dt = self.cfg, x.dtype
        q_nope, q_pe = self.queries(x, cos, sin)
        lat = self.latent(x, cos, sin)
        tau = cfg.softmax_scale
        if cache is None or cache_index is None:
            # prefill / training: decompressed MHA within this chunk (Dqk = d_n + d_r, Dv = d_v)
            k, v = self.decompress(lat)
            q = jnp.concatenate([q_nope, q_pe], axis=-1)
            segs = None if segment_ids is None else (segment_ids, segment_ids)
            o = attend(q, k, v, causal=True, segment_ids=segs, sm_scale=tau, spec=spec,
                       layer=layer, lengths=lengths, share=share)
            pages = None
            if cache is not None:
                if spec.context is not None:  # lat is in ring order; the cache is natural
                    lat = spec.context.natural(lat)
                pages = write_latent(cache[0], cache[1], lat, jnp.zeros((x.shape[0],), jnp.int32))
            return self.out_proj(o), pages
        pages, table = cache
        pages = write_latent(pages, table, lat, cache_index)
        if absorb and x.shape[1] == 1:
            q_lat = self.absorb_query(q_nope)[:, 0]
            o_lat, _ = mla_decode(q_lat, q_pe[:, 0].astype(q_lat.dtype), pages, table,
                                  cache_index + 1, tau, impl=decode_impl)
            o = self.absorb_output(o_lat.astype(dt)[:, None])
        else:  # chunk continuation (or absorb=False): decompress the whole cached latent
            k, v = self.decompress(gather_latent(pages, table).astype(dt))
            q = jnp.concatenate([q_nope, q_pe], axis=-1)
            o = attend(q, k, v, causal=True, q_offset=cache_index, sm_scale=tau, spec=spec,
                       layer=layer, lengths=lengths, share=share)
        return self.out_proj(o), pages


class Block(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); mlp is MoE or dense SwiGLU."""

    def __init__(self, cfg: MLAConfig, layer: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 attention: type = MLAttention):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attn = attention(cfg, rngs=rngs, param_dtype=param_dtype)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        if cfg.is_moe_layer(layer):
            self.mlp = MoE(cfg, rngs=rngs, param_dtype=param_dtype)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=False, rngs=rngs,
                              param_dtype=param_dtype)

    def __call__(self, x, cos, sin, **attn_kwargs):
        h, cache = self.attn(self.attn_norm(x), cos, sin, **attn_kwargs)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache


class DeepSeek(nnx.Module):
    """The decoder. `model(tokens)` -> logits; `forward(...)` for caches (see `Llama.forward`).

    absorb: decode single tokens in the absorbed form (False: decompress the cached latent).
    decode_impl: `mla_decode` implementation ("auto", "reference", "triton", "mosaic_gpu",
      "mosaic_tpu").
    """

    cache_class = MLACache
    attention_module = MLAttention  # DeepSeek-V3.2 (models/dsa.py) adds the indexer to it

    def __init__(self, cfg: MLAConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, attention: AttentionSpec = AttentionSpec(),
                 absorb: bool = True, decode_impl: str = "auto"):
        self.config = cfg
        self.dtype = dtype
        self.attention = attention
        self.absorb = absorb
        self.decode_impl = decode_impl
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype)
        self.layers = nnx.List([Block(cfg, i, rngs=rngs, param_dtype=param_dtype,
                                      attention=self.attention_module)
                                for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                 param_dtype)
        inv_freq, scale = rope_inv_freq(cfg.rope, cfg.qk_rope_head_dim)
        self.rope = (tuple(float(f) for f in inv_freq), scale)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens int32 [B, S] -> logits float32 [B, S, V]."""
        hidden, _ = self.forward(tokens, positions, segment_ids)
        return self.logits(hidden)

    def rope_tables(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Per-pair cos, sin [B, S, d_r / 2] for positions [B, S]."""
        inv_freq, scale = self.rope
        return rope_cos_sin_half(positions, jnp.asarray(inv_freq), scale)

    def block_kwargs(self, i: int) -> dict:
        """Layer i's call arguments besides inputs, cache and lengths (the training step's
        remat path calls the layers with them too)."""
        return {"absorb": self.absorb, "decode_impl": self.decode_impl, "layer": i}

    def forward(self, tokens: jax.Array, positions: jax.Array | None = None,
                segment_ids: jax.Array | None = None, cache: MLACache | None = None,
                cache_index: jax.Array | None = None, lengths: jax.Array | None = None
                ) -> tuple[jax.Array, MLACache | None]:
        """Hidden states [B, S, E] after the final norm, and the updated cache (as `Llama`;
        `lengths` [B] is read by sparse prefill only; context parallelism as in `Llama`)."""
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
        cos, sin = self.rope_tables(positions)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        share = LayoutShare() if self.attention.sparse is not None else None
        new_pages = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.pages[i], cache.page_table)
            x, pages = layer(x, cos, sin, spec=self.attention, segment_ids=segment_ids,
                             cache=layer_cache, cache_index=cache_index, lengths=lengths,
                             share=share, **self.block_kwargs(i))
            new_pages.append(pages)
        x = self.norm(x)
        if ring is not None:
            x = ring.exit(x, s)
        if cache is not None:
            cache = MLACache(tuple(new_pages), cache.page_table)
        return x, cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., E] -> float32 logits [..., V]."""
        if self.config.tie_word_embeddings:
            w = self.embed[...].astype(hidden.dtype).T
        else:
            w = self.lm_head[...].astype(hidden.dtype)
        return (hidden @ w).astype(jnp.float32)
