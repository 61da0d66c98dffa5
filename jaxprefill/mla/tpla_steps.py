"""TPLA decode in the engine for MLA models: the latent pool sharded over a `tensor` mesh axis.

`EngineConfig(tpla={"tensor": g, "transform": ..., "rope": ..., "logit_scale": ...})` runs:
  * the model through `jaxprefill.mla.tpla.reparameterize` (kv norm weight and the rotation
    folded; exact MLA);
  * a page pool per layer [num_pages, page, g*w] (`tpla.pack_latent` layout, sharded over the
    last axis: each device holds 1/g of every token's latent, plus its RoPE part);
  * prefill as exact MLA (packed rows and chunks; a chunk attends over the prefix decompressed
    from the pool, which holds the exact latent because the engine requires norm="global");
  * decode with `tpla_model.tpla_decode_step`: per-shard `mla_decode` over the pages + psum.
g = 1 is MLA. The three steps have `jaxprefill.infer.steps`' signatures once bound to
(mesh, tcfg). DeepSeek-V3.2 (DSA) models take `dsa_tpla_steps`, which reuses this module's
pool, `unpack_latent` and `prepare`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxprefill.attention import attend
from jaxprefill.decoding import Sampling, next_tokens, sample
from jaxprefill.graph import merge
from jaxprefill.mla.tpla import TPLAConfig, pack_latent, reparameterize, rope_pair_order
from jaxprefill.mla.tpla_model import TPLACache, raw_latent, tpla_decode_step
from jaxprefill.models.deepseek import gather_latent, write_latent
from jaxprefill.scatter import distinct_drops
from jaxprefill.sharding import make_mesh


@struct.dataclass
class PagedTPLACache:
    pages: tuple[jax.Array, ...]  # per layer [num_pages, page, g*w], sharded over the last axis

    @property
    def page_size(self) -> int:
        return self.pages[0].shape[1]

    @property
    def num_pages(self) -> int:
        return self.pages[0].shape[0]


def make_cache(cfg, num_pages: int, page_size: int, dtype, mesh, tcfg: TPLAConfig
               ) -> PagedTPLACache:
    g = mesh.shape[tcfg.axis]
    dr = cfg.qk_rope_head_dim
    w = cfg.kv_lora_rank // g + (dr if tcfg.rope == "replicated" else dr // g)
    sharding = NamedSharding(mesh, P(None, None, tcfg.axis))
    return PagedTPLACache(tuple(jax.device_put(jnp.zeros((num_pages, page_size, g * w), dtype),
                                               sharding) for _ in range(cfg.num_layers)))


def unpack_latent(packed: jax.Array, cfg, g: int, tcfg: TPLAConfig) -> jax.Array:
    """[..., g*w] pool entries -> the MLA latent [..., d_c + d_r] (exact for norm="global")."""
    dc, dr = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    parts = packed.reshape(*packed.shape[:-1], g, -1)
    lat = parts[..., : dc // g].reshape(*packed.shape[:-1], dc)
    if tcfg.rope == "replicated":
        rope = parts[..., 0, dc // g:]
    else:  # shard i holds rotation pairs i*dr/(2g)..: undo the permutation
        rope = parts[..., dc // g:].reshape(*packed.shape[:-1], dr)
        rope = rope[..., np.argsort(rope_pair_order(dr, g))]
    return jnp.concatenate([lat, rope], axis=-1)



@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(4,))
def _prefill_packed(mesh, tcfg, graphdef, state, cache: PagedTPLACache, tokens, positions,
                    segment_ids, slots, last_index, sampling, steps):
    model = merge(graphdef, state)
    cfg, g = model.config, mesh.shape[tcfg.axis]
    r, c = tokens.shape
    cos, sin = model.rope_tables(positions)
    x = jnp.take(model.embed[...], tokens, axis=0).astype(model.dtype)
    pages = []
    for i, (layer, pool) in enumerate(zip(model.layers, cache.pages)):
        packed = pack_latent(*raw_latent(layer.attn, layer.attn_norm(x), cos, sin), g, tcfg,
                             cfg.rms_norm_eps)
        flat = pool.reshape(-1, pool.shape[-1])
        idx = distinct_drops(slots.reshape(-1), flat.shape[0])
        flat = flat.at[idx].set(packed.reshape(r * c, -1).astype(pool.dtype), mode="drop",
                                unique_indices=True)
        pages.append(flat.reshape(pool.shape))
        x, _ = layer(x, cos, sin, spec=model.attention, segment_ids=segment_ids, cache=None,
                     cache_index=None, layer=i)
    last = model.norm(x).reshape(r * c, -1)[last_index]
    return next_tokens(model, last, sampling, steps), PagedTPLACache(tuple(pages))


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(4,))
def _prefill_chunk(mesh, tcfg, graphdef, state, cache: PagedTPLACache, tokens, page_table,
                   start, n_valid, sampling, steps):
    model = merge(graphdef, state)
    cfg, g = model.config, mesh.shape[tcfg.axis]
    r, c = tokens.shape
    positions = start[:, None] + jnp.arange(c, dtype=jnp.int32)[None]
    cos, sin = model.rope_tables(positions)
    x = jnp.take(model.embed[...], tokens, axis=0).astype(model.dtype)
    pages = []
    for i, (layer, pool) in enumerate(zip(model.layers, cache.pages)):
        attn = layer.attn
        h = layer.attn_norm(x)
        packed = pack_latent(*raw_latent(attn, h, cos, sin), g, tcfg, cfg.rms_norm_eps)
        pool = write_latent(pool, page_table, packed, start)
        pages.append(pool)
        # exact MLA over the prefix + chunk, decompressed from the pool
        lat = unpack_latent(gather_latent(pool, page_table), cfg, g, tcfg).astype(x.dtype)
        k, v = attn.decompress(lat)
        q = jnp.concatenate(attn.queries(h, cos, sin), axis=-1)
        o = attend(q, k, v, causal=True, q_offset=start, sm_scale=cfg.softmax_scale,
                   spec=model.attention, layer=i, lengths=n_valid)
        x = x + attn.out_proj(o)
        x = x + layer.mlp(layer.mlp_norm(x))
    hidden = model.norm(x)
    last = jnp.take_along_axis(hidden, (n_valid - 1)[:, None, None], axis=1)[:, 0]
    return next_tokens(model, last, sampling, steps), PagedTPLACache(tuple(pages))


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(4,))
def _decode(mesh, tcfg, graphdef, state, cache: PagedTPLACache, tokens, page_table, index,
            sampling, steps):
    model = merge(graphdef, state)
    logits, new = tpla_decode_step(model, tokens[:, None], TPLACache(cache.pages, page_table),
                                   index, mesh=mesh, tcfg=tcfg, impl=model.decode_impl)
    return sample(logits, sampling.seeds, steps, sampling.temperature, sampling.top_p,
                  sampling.top_k), PagedTPLACache(new.pages)


class TPLASteps:
    """The engine's three steps bound to a mesh and a TPLAConfig."""

    def __init__(self, mesh, tcfg: TPLAConfig):
        self.prefill_packed = functools.partial(_prefill_packed, mesh, tcfg)
        self.prefill_chunk = functools.partial(_prefill_chunk, mesh, tcfg)
        self.decode = functools.partial(_decode, mesh, tcfg)


def prepare(model, spec: dict) -> tuple:
    """(folded model, mesh, TPLAConfig) for EngineConfig.tpla = spec: the settings checked
    against the model and this host (ValueError, one line, naming the setting), the mesh of
    the first `tensor` local devices, the rotation folded into the weights."""
    spec = dict(spec)
    g = int(spec.pop("tensor", 1))
    tcfg = TPLAConfig(**spec)
    if tcfg.norm != "global":
        raise ValueError("the engine's TPLA needs norm='global' (chunked prefill decompresses "
                         "the exact latent from the pool)")
    if tcfg.transform == "pca":
        raise ValueError("transform='pca' needs calibration tokens: reparameterize the model "
                         "with jaxprefill.mla.tpla.reparameterize first and pass transform='none'")
    cfg = model.config
    if cfg.kv_lora_rank % g:  # each device holds one contiguous latent slice
        raise ValueError(f"tpla tensor={g} must divide the model's kv_lora_rank "
                         f"({cfg.kv_lora_rank})")
    if tcfg.rope == "split" and cfg.qk_rope_head_dim % (2 * g):
        raise ValueError(f"tpla rope='split' needs tensor={g} to divide half the model's "
                         f"qk_rope_head_dim ({cfg.qk_rope_head_dim})")
    local = jax.local_devices()
    if g > len(local):
        raise ValueError(f"tpla tensor={g} but this host has only {len(local)} devices")
    mesh = make_mesh(tensor=g, devices=local[:g])
    return reparameterize(model, tcfg.transform), mesh, tcfg


def setup(model, spec: dict, num_pages: int, page_size: int):
    """(folded model, TPLASteps, pool) for EngineConfig.tpla = spec."""
    if "index_keys" in spec:
        raise ValueError("tpla index_keys is a DeepSeek-V3.2 (DSA) setting: this model has no "
                         "indexer")
    folded, mesh, tcfg = prepare(model, spec)
    pool = make_cache(model.config, num_pages, page_size, model.dtype, mesh, tcfg)
    return folded, TPLASteps(mesh, tcfg), pool
