"""DeepSeek-V3.2: MLA + MoE (models/deepseek.py) with DeepSeek sparse attention (DSA).

Each layer's attention gains a lightning indexer that picks, for every query, the
`index_topk` (2,048) earlier tokens it attends to (method: docs/methods/dsa.md). Per token x [E]
with q latent qr = RMSNorm(q_a x) [d_q] (the MLA query's own):

  index queries  q_h = Hadamard(RoPE(wq_b qr)_h)          [Hi, Di]  (64 x 128 in V3.2)
  index key      k   = Hadamard(RoPE(LayerNorm(wk x)))    [Di], one per token, for all heads
  head weights   w_h = (weights_proj x)_h Hi^-1/2 Di^-1/2  (float32)
  score(i, j)    = sum_h w_h(i) relu(q_h(i) . k(j)),  j <= i  ->  top-k per query

RoPE here rotates the first d_r dims in rotate-half (non-interleaved) pairs, unlike the MLA
rope; the Hadamard rotation (orthonormal, so q . k is unchanged in exact arithmetic) spreads
outliers before an FP8 rounding. Attention then runs over the selected tokens only, in the
absorbed form over the latent (`pallas_kernels.dsa_ops.sparse_mla`, d_qk 576 / d_v 512).
When a call has at most `index_topk` keys (short prompts, short caches) the top-k is every
allowed key and the dense MLA paths run instead: the same result, cheaper.

Cache: `DSACache` keeps the MLA latent pages and, beside them, one index-key page pool per layer
[num_pages, page, Di] under the same page table. With `DSAOptions(fp8=True)` the index keys are
stored as the FP8 indexer reads them: uint8 rows [num_pages, page, Di + 4] of float8 e4m3 values
and one float32 scale per key (`pack_index_keys`; 132 bytes a token at Di = 128 against 256 in
bf16), and the selection is the one FP8 scoring gives on the unquantized keys.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxprefill.attention import AttentionSpec, attend
from jaxprefill.config import MLAConfig, check_keys
from jaxprefill.models.deepseek import (PAGE_SIZE, DeepSeek, MLAttention, gather_latent,
                                        write_latent)
from jaxprefill.models.layers import apply_rope_pairs, dense, hadamard, param
from pallas_kernels import mla_decode
from pallas_kernels.dsa_ops import INDEX_IMPLS, SPARSE_IMPLS, index_topk, sparse_mla
from pallas_kernels.dsa_reference import quantize_e4m3


@dataclasses.dataclass(frozen=True)
class DSAOptions:
    """How a DeepSeek-V3.2 model runs its sparse attention (static: part of the jit key).

    index_impl / sparse_impl: `pallas_kernels.dsa_ops` backends of the indexer's top-k and of
      the sparse attention ("auto", "xla", "triton", "mosaic_tpu", "reference").
    fp8: score the indexer in float8 e4m3 (per-128 scales), as DeepSeek's kernels do, and
      keep the index keys of the model's caches in FP8 (`pack_index_keys`: about half the
      bytes of bf16 keys).
    """

    index_impl: str = "auto"
    sparse_impl: str = "auto"
    fp8: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("index_impl", INDEX_IMPLS), ("sparse_impl", SPARSE_IMPLS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"dsa {name} must be one of {allowed}, got "
                                 f"{getattr(self, name)!r}")
        if not isinstance(self.fp8, bool):
            raise ValueError(f"dsa fp8 must be true or false, got {self.fp8!r}")

    @classmethod
    def parse(cls, value: "DSAOptions | dict | None") -> "DSAOptions":
        """DSAOptions | None (the defaults) | a mapping of its fields."""
        if value is None or isinstance(value, DSAOptions):
            return value or cls()
        if not isinstance(value, dict):
            raise ValueError(f"dsa options must be a mapping, got {type(value).__name__}")
        check_keys(value, cls, "dsa options")
        return cls(**value)


@struct.dataclass
class DSACache:
    """Paged cache of a DeepSeek-V3.2 model: `pages[l]` [num_pages, page, d_c + d_r] (the MLA
    latent, as `MLACache`) and `index_pages[l]` [num_pages, page, Di] (the indexer's keys; FP8
    rows uint8 [num_pages, page, Di + 4] with `index_fp8`, `pack_index_keys`), both addressed by
    `page_table` int32 [B, P]."""

    pages: tuple[jax.Array, ...]
    index_pages: tuple[jax.Array, ...]
    page_table: jax.Array

    @classmethod
    def zeros(cls, cfg: MLAConfig, batch: int, length: int, dtype=jnp.float32,
              page_size: int = PAGE_SIZE, *, index_fp8: bool = False) -> "DSACache":
        """Capacity >= `length` tokens per row; row b owns pages b*P .. b*P+P-1."""
        p = -(-length // page_size)
        table = jnp.arange(batch * p, dtype=jnp.int32).reshape(batch, p)
        lat = (batch * p, page_size, cfg.latent_dim)
        return cls(tuple(jnp.zeros(lat, dtype) for _ in range(cfg.num_layers)),
                   tuple(index_pool(cfg, batch * p, page_size, dtype, index_fp8)
                         for _ in range(cfg.num_layers)), table)

    @property
    def page_size(self) -> int:
        return self.pages[0].shape[1]


def index_pool(cfg: MLAConfig, num_pages: int, page_size: int, dtype, fp8: bool) -> jax.Array:
    """One layer's zeroed index-key pages: [num_pages, page, Di] in dtype, or the FP8 rows
    uint8 [num_pages, page, Di + 4] (`pack_index_keys`)."""
    if fp8:
        return jnp.zeros((num_pages, page_size, cfg.index_head_dim + 4), jnp.uint8)
    return jnp.zeros((num_pages, page_size, cfg.index_head_dim), dtype)


def pack_index_keys(k: jax.Array) -> jax.Array:
    """Index keys [..., Di] -> FP8 cache rows uint8 [..., Di + 4]: the float8 e4m3 values, then
    the key's float32 scale, as bytes (`quantize_e4m3`: one scale per key, amax / 448)."""
    k8, scale = quantize_e4m3(k)
    return jnp.concatenate([jax.lax.bitcast_convert_type(k8, jnp.uint8),
                            jax.lax.bitcast_convert_type(scale, jnp.uint8)], axis=-1)


def unpack_index_keys(rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """FP8 cache rows uint8 [..., Di + 4] -> (float8_e4m3fn [..., Di], float32 scales [...])."""
    di = rows.shape[-1] - 4
    return (jax.lax.bitcast_convert_type(rows[..., :di], jnp.float8_e4m3fn),
            jax.lax.bitcast_convert_type(rows[..., di:], jnp.float32))


def index_entries(keys: jax.Array, pool: jax.Array) -> jax.Array:
    """Index keys [..., Di] as `pool` stores them: FP8 rows for a uint8 pool, else as they are
    (the write casts them to the pool's dtype)."""
    return pack_index_keys(keys) if pool.dtype == jnp.uint8 else keys


def page_rows(page_table: jax.Array, idx: jax.Array, page: int) -> jax.Array:
    """Token positions idx [B, S, K] (-1: none) -> rows of the flattened pages
    [num_pages * page, ...] (-1 stays -1)."""
    safe = jnp.maximum(idx, 0)
    b = jnp.arange(page_table.shape[0])[:, None, None]
    rows = page_table[b, safe // page] * page + safe % page
    return jnp.where(idx >= 0, rows, -1)


class LayerNorm(nnx.Module):
    """(x - mean) / std * scale + bias over the last axis, in float32 (torch.nn.LayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6, *, param_dtype=jnp.float32):
        self.scale = param(None, (dim,), ("norm",), param_dtype, init="ones")
        self.bias = param(None, (dim,), ("norm",), param_dtype, init="zeros")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32)
                + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class Indexer(nnx.Module):
    """The lightning indexer's projections (module doc). Parameters: wq_b [d_q, Hi, Di],
    wk [E, Di], k_norm (LayerNorm over Di), weights_proj [E, Hi] (kept in float32, as the
    reference keeps it). Its axes are left unnamed: replicated on every mesh."""

    def __init__(self, cfg: MLAConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        hi, di = cfg.index_n_heads, cfg.index_head_dim
        self.wq_b = param(rngs, (cfg.q_lora_rank, hi, di), ("q_lora", None, None), param_dtype)
        self.wk = param(rngs, (cfg.hidden_size, di), ("embed", None), param_dtype)
        self.k_norm = LayerNorm(di, 1e-6, param_dtype=param_dtype)
        self.weights_proj = param(rngs, (cfg.hidden_size, hi), ("embed", None), jnp.float32)
        self.cfg = cfg

    def _rotate(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """RoPE (rotate-half pairs) on the first d_r dims of x [B, S, H, Di], then Hadamard."""
        dr = self.cfg.qk_rope_head_dim
        x = jnp.concatenate([apply_rope_pairs(x[..., :dr], cos, sin, interleaved=False),
                             x[..., dr:]], axis=-1)
        rot = jnp.asarray(hadamard(self.cfg.index_head_dim), x.dtype)
        return jnp.einsum("bshd,de->bshe", x, rot)

    def keys(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x [B, S, E] -> index keys [B, S, Di] (what the cache keeps)."""
        k = self.k_norm(dense("...e,ed->...d", x, self.wk))
        return self._rotate(k[:, :, None], cos, sin)[:, :, 0]

    def queries(self, qr: jax.Array, x: jax.Array, cos: jax.Array, sin: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
        """q latent qr [B, S, d_q], x [B, S, E] -> (queries [B, S, Hi, Di], head weights
        float32 [B, S, Hi] with both scales folded in: ReLU commutes with a positive scale)."""
        hi, di = self.cfg.index_n_heads, self.cfg.index_head_dim
        q = self._rotate(dense("bsr,rhd->bshd", qr, self.wq_b), cos, sin)
        w = x.astype(jnp.float32) @ self.weights_proj[...].astype(jnp.float32)
        return q, w * (hi ** -0.5 * di ** -0.5)


class DSAttention(MLAttention):
    """MLA whose every query attends to the indexer's top-k tokens (module doc)."""

    def __init__(self, cfg: MLAConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if not cfg.has_indexer:
            raise ValueError(f"DSAttention needs a deepseek_v32 config, got {cfg.model_type!r}")
        super().__init__(cfg, rngs=rngs, param_dtype=param_dtype)
        self.indexer = Indexer(cfg, rngs=rngs, param_dtype=param_dtype)

    def query_latent(self, x: jax.Array) -> jax.Array:
        """x [B, S, E] -> qr = RMSNorm(q_a x) [B, S, d_q], read by the queries and the indexer."""
        qa = dense("...e,er->...r", x, self.q_a)
        if self.cfg.attention_bias:
            qa = qa + self.q_a_bias[...].astype(x.dtype)
        return self.q_a_norm(qa)

    def heads(self, qr: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """qr -> q_nope [B, S, H, d_n], q_pe [B, S, H, d_r] (roped), as `MLAttention.queries`."""
        cfg = self.cfg
        q = dense("bsr,rhd->bshd", qr, self.q_b)
        q_nope, q_pe = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
        return q_nope, apply_rope_pairs(q_pe, cos, sin, interleaved=cfg.rope_interleave)

    def reads_all(self, page_table: jax.Array, page: int) -> bool:
        """Whether a cached call over page_table [B, P] has at most `index_topk` slots, so the
        top-k would select every allowed key and the dense paths run instead (static)."""
        return page_table.shape[1] * page <= self.cfg.index_topk

    def select_cached(self, qr: jax.Array, x: jax.Array, cos: jax.Array, sin: jax.Array,
                      index_pages: jax.Array, page_table: jax.Array, cache_index: jax.Array,
                      dsa: DSAOptions) -> jax.Array:
        """The rows each query attends to: the indexer's top-k of its queries (from qr
        [B, S, d_q], x [B, S, E]) over every cached index key (index_pages [N, page, Di] or
        FP8 rows [N, page, Di + 4] under page_table [B, P]; causal limit cache_index [B] + i),
        as rows of the flattened pages [N * page] (int32 [B, S, K], -1: none)."""
        iq, iw = self.indexer.queries(qr, x, cos, sin)
        cached = gather_latent(index_pages, page_table)  # [B, T, Di] or [B, T, Di + 4]
        if index_pages.dtype == jnp.uint8:  # FP8 keys: scored in FP8 whatever dsa.fp8 says
            k8, scale = unpack_index_keys(cached)
            idx = index_topk(iq, iw, k8, self.cfg.index_topk, q_offset=cache_index,
                             k_scale=scale, impl=dsa.index_impl)
        else:
            idx = index_topk(iq, iw, cached.astype(x.dtype), self.cfg.index_topk,
                             q_offset=cache_index, fp8=dsa.fp8, impl=dsa.index_impl)
        return page_rows(page_table, idx, index_pages.shape[1])

    def _sparse(self, q_nope, q_pe, kv, rows, dsa: DSAOptions) -> jax.Array:
        """Absorbed attention of each query over its kv rows [B, S, K] -> [B, S, E]."""
        q_lat = self.absorb_query(q_nope)
        o_lat, _ = sparse_mla(q_lat, q_pe.astype(q_lat.dtype), kv, rows, self.cfg.softmax_scale,
                              impl=dsa.sparse_impl)
        return self.out_proj(self.absorb_output(o_lat.astype(q_nope.dtype)))

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, *, spec: AttentionSpec,
                 segment_ids: jax.Array | None, cache: tuple | None,
                 cache_index: jax.Array | None, decode_impl: str = "auto",
                 dsa: DSAOptions = DSAOptions()):
        """x [B, S, E] -> ([B, S, E], (latent pages, index pages) or None).

        cache = (latent pages, index pages, page_table). Without cache_index the call is a
        prefill from position 0 (segment_ids: packed rows); with it, a chunk or a decode step
        whose rows continue at cache_index [B]."""
        cfg, b, s = self.cfg, x.shape[0], x.shape[1]
        qr = self.query_latent(x)
        q_nope, q_pe = self.heads(qr, cos, sin)
        lat = self.latent(x, cos, sin)
        ik = self.indexer.keys(x, cos, sin)
        tau, topk = cfg.softmax_scale, cfg.index_topk
        if cache_index is None:
            if s <= topk:  # every allowed key is selected: dense causal MLA
                k, v = self.decompress(lat)
                segs = None if segment_ids is None else (segment_ids, segment_ids)
                o = self.out_proj(attend(jnp.concatenate([q_nope, q_pe], axis=-1), k, v,
                                         causal=True, segment_ids=segs, sm_scale=tau, spec=spec))
            else:
                iq, iw = self.indexer.queries(qr, x, cos, sin)
                segs = None if segment_ids is None else (segment_ids, segment_ids)
                idx = index_topk(iq, iw, ik, topk, segment_ids=segs, fp8=dsa.fp8,
                                 impl=dsa.index_impl)
                base = (jnp.arange(b, dtype=jnp.int32) * s)[:, None, None]
                rows = jnp.where(idx >= 0, idx + base, -1)
                o = self._sparse(q_nope, q_pe, lat.reshape(b * s, -1), rows, dsa)
            if cache is None:
                return o, None
            pages, ipages, table = cache
            start = jnp.zeros((b,), jnp.int32)
            return o, (write_latent(pages, table, lat, start),
                       write_latent(ipages, table, index_entries(ik, ipages), start))
        pages, ipages, table = cache
        pages = write_latent(pages, table, lat, cache_index)
        ipages = write_latent(ipages, table, index_entries(ik, ipages), cache_index)
        if self.reads_all(table, pages.shape[1]):  # short caches: the dense MLA paths
            if s == 1:
                q_lat = self.absorb_query(q_nope)[:, 0]
                o_lat, _ = mla_decode(q_lat, q_pe[:, 0].astype(q_lat.dtype), pages, table,
                                      cache_index + 1, tau, impl=decode_impl)
                o = self.out_proj(self.absorb_output(o_lat.astype(x.dtype)[:, None]))
            else:
                k, v = self.decompress(gather_latent(pages, table).astype(x.dtype))
                o = self.out_proj(attend(jnp.concatenate([q_nope, q_pe], axis=-1), k, v,
                                         causal=True, q_offset=cache_index, sm_scale=tau,
                                         spec=spec))
            return o, (pages, ipages)
        rows = self.select_cached(qr, x, cos, sin, ipages, table, cache_index, dsa)
        o = self._sparse(q_nope, q_pe, pages.reshape(-1, pages.shape[-1]), rows, dsa)
        return o, (pages, ipages)


class DeepSeekV32(DeepSeek):
    """DeepSeek-V3.2 (`model_type` deepseek_v32): `DeepSeek` with `DSAttention` layers and a
    `DSACache`. `dsa` picks the backends of the indexer and of the sparse attention.

    `absorb` is not read (the sparse paths are the absorbed form; caches of at most
    `index_topk` slots decode densely through `decode_impl`). Not wired here: context
    parallelism (AttentionSpec.context) and block-sparse prefill policies
    (AttentionSpec.sparse; DSA selects its own tokens): both raise."""

    cache_class = DSACache
    attention_module = DSAttention

    def __init__(self, cfg: MLAConfig, *, rngs: nnx.Rngs, dsa: DSAOptions = DSAOptions(),
                 **kwargs):
        super().__init__(cfg, rngs=rngs, **kwargs)
        self.dsa = dsa

    @property
    def cache_options(self) -> dict:
        """Keyword arguments of this model's cache constructors (`DSACache.zeros`, the
        engine's pools): FP8 index keys with `dsa.fp8`."""
        return {"index_fp8": self.dsa.fp8}

    def block_kwargs(self, i: int) -> dict:
        """Layer i's call arguments besides inputs and cache (no sparse prefill policy: the
        indexer selects)."""
        return {"decode_impl": self.decode_impl, "dsa": self.dsa}

    def check_attention(self) -> None:
        """Raises for the attention settings DSA does not run (every path that calls the
        layers checks this first)."""
        if self.attention.context is not None:
            raise NotImplementedError("context parallelism is not wired into DeepSeek-V3.2's "
                                      "sparse attention")
        if self.attention.sparse is not None:
            raise ValueError("DeepSeek-V3.2 selects its own tokens (DSA): block-sparse prefill "
                             "policies do not apply")

    def forward(self, tokens: jax.Array, positions: jax.Array | None = None,
                segment_ids: jax.Array | None = None, cache: DSACache | None = None,
                cache_index: jax.Array | None = None, lengths: jax.Array | None = None
                ) -> tuple[jax.Array, DSACache | None]:
        """Hidden states [B, S, E] after the final norm and the updated cache (as
        `DeepSeek.forward`; `lengths` is not read: DSA needs no valid-length hint)."""
        self.check_attention()
        if cache_index is not None and segment_ids is not None:
            raise ValueError("segment_ids when continuing a cached row is not supported: "
                             "use one sequence per cache row")
        b, s = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            if cache_index is not None:
                positions = positions + cache_index[:, None]
        cos, sin = self.rope_tables(positions)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        pages, ipages = [], []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.pages[i], cache.index_pages[i],
                                                      cache.page_table)
            x, new = layer(x, cos, sin, spec=self.attention, segment_ids=segment_ids,
                           cache=layer_cache, cache_index=cache_index, **self.block_kwargs(i))
            if new is not None:
                pages.append(new[0])
                ipages.append(new[1])
        x = self.norm(x)
        if cache is not None:
            cache = DSACache(tuple(pages), tuple(ipages), cache.page_table)
        return x, cache


__all__ = ["DSACache", "DSAOptions", "DSAttention", "DeepSeekV32", "Indexer", "LayerNorm",
           "index_entries", "index_pool", "pack_index_keys", "page_rows", "unpack_index_keys"]
