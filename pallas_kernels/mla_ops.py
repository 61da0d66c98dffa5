"""`mla_decode`: absorbed MLA decode attention over a paged latent cache, one entry point.

    out_latent, lse = mla_decode(q_latent, q_pe, cache, page_table, lengths, sm_scale)

Shapes: q_latent [B, H, Dc] (the query with W_UK absorbed, Dc = kv_lora_rank = 512 for
DeepSeek), q_pe [B, H, Dr] (roped, Dr = 64), cache [num_pages, page, Dc + Dr] (page = 64 tokens:
normalized latent | roped shared key), page_table int32 [B, P], lengths int32 [B]. Returns
out_latent float32 [B, H, Dc] (W_UV is applied by the caller) and lse float32 [B, H].
`sm_scale` must be passed explicitly: DeepSeek's is qk_head_dim^-0.5 * mscale^2 (never
(Dc + Dr)^-0.5).

Backends (one resolver, :func:`mla_decode_backend`; "auto" takes the first that runs the call):

    mosaic_gpu   Hopper, bf16/f16 cache, pages of 64 tokens, dims within shared memory (wgmma +
                 TMA, two consumer warpgroups)
    triton       NVIDIA GPUs, bf16/f16 caches (float32 caches: the reference was 7.6x faster
                 at 16 heads on an H100, and the float32 tiles do not fit at 128)
    mosaic_tpu   TPUs
    reference    pure jnp, gathers the whole cache: CPUs, float32 caches

On the H100 at batch 64 x 32K the Mosaic GPU kernel reads the cache at 94-96% of copy bandwidth
with 16 heads (Triton: 84%) and 82-84% with 128 (Triton: 35%), docs/performance.md. Kernels
split the KV sequence into `num_splits` chunks (flash-decoding) and merge them with their LSEs.
Tuning knobs go through `config` (mosaic_gpu: `MLADecodeMosaicConfig`; triton: a dict of
block_h, block_n, num_warps, num_stages, f32_dot).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import backends
from pallas_kernels.gpu import mla_decode_mosaic as mosaic
from pallas_kernels.gpu.mla_decode_triton import mla_decode_triton
from pallas_kernels.gpu import mosaic_common
from pallas_kernels.mla_reference import combine_splits, mla_decode_reference
from pallas_kernels.tpu.mla_decode_tpu import mla_decode_tpu


@dataclasses.dataclass(frozen=True)
class MLADecodeCall:
    """What the MLA decode backends look at (arrays for shapes and dtypes)."""

    q_latent: Any
    cache: Any
    config: Any = None
    interpret: bool = False


def _mosaic_refusal(call: MLADecodeCall) -> str | None:
    if not (call.interpret or mosaic_common.is_hopper()):
        return "needs a Hopper (sm90) GPU"
    config = call.config if isinstance(call.config, mosaic.MLADecodeMosaicConfig) else \
        mosaic.MLADecodeMosaicConfig()
    return mosaic.unsupported(call.q_latent, call.cache, config)


def _triton_refusal(call: MLADecodeCall) -> str | None:
    if call.cache.dtype == jnp.float32 and not call.interpret:
        return "float32 caches: its tiles overflow shared memory at 128 heads (use reference)"
    return None


BACKENDS = (
    backends.Backend("mosaic_gpu", ("gpu",), _mosaic_refusal),
    backends.Backend("triton", ("gpu",), _triton_refusal),
    backends.Backend("mosaic_tpu", ("tpu",)),
    backends.Backend("reference"),
)
IMPLS = ("auto",) + tuple(b.name for b in BACKENDS)


def mla_decode_backend(q_latent: jax.Array, cache: jax.Array, *, impl: str = "auto",
                       interpret: Any = False, config: Any = None) -> str:
    """The implementation :func:`mla_decode` runs for these inputs (see module)."""
    return backends.resolve("mla_decode", BACKENDS, impl,
                            MLADecodeCall(q_latent, cache, config, bool(interpret)),
                            interpret=bool(interpret))


def mla_decode(q_latent: jax.Array, q_pe: jax.Array, cache: jax.Array, page_table: jax.Array,
               lengths: jax.Array, sm_scale: float, *, impl: str = "auto",
               num_splits: int | None = None, interpret: Any = False, config: Any = None
               ) -> tuple[jax.Array, jax.Array]:
    """Absorbed MLA decode; see the module docstring. ``config``: the knobs of the backend
    that runs (mosaic_gpu: ``MLADecodeMosaicConfig``; triton: a dict of keyword arguments)."""
    name = mla_decode_backend(q_latent, cache, impl=impl, interpret=interpret, config=config)
    if name == "reference":
        return mla_decode_reference(q_latent, q_pe, cache, page_table, lengths, sm_scale)
    if name == "mosaic_gpu":
        config = config or mosaic.MLADecodeMosaicConfig()
        if not isinstance(config, mosaic.MLADecodeMosaicConfig):
            raise ValueError(f"mla_decode: mosaic_gpu takes an MLADecodeMosaicConfig, got "
                             f"{type(config).__name__}")
        if num_splits is not None:
            config = dataclasses.replace(config, num_splits=num_splits)
        return mosaic.mla_decode_mosaic(q_latent, q_pe, cache, page_table, lengths,
                                        sm_scale=sm_scale, config=config, interpret=interpret)
    if name == "triton":
        if config is not None and not isinstance(config, dict):
            raise ValueError(f"mla_decode: triton takes a dict of keyword arguments, got "
                             f"{type(config).__name__}")
        return mla_decode_triton(q_latent, q_pe, cache, page_table, lengths, sm_scale=sm_scale,
                                 num_splits=num_splits, interpret=interpret, **(config or {}))
    if config is not None:
        raise ValueError(f"mla_decode: {name} takes no config")
    return mla_decode_tpu(q_latent, q_pe, cache, page_table, lengths, sm_scale=sm_scale,
                          num_splits=num_splits, interpret=interpret)


__all__ = ["BACKENDS", "IMPLS", "MLADecodeCall", "combine_splits", "mla_decode",
           "mla_decode_backend", "mla_decode_reference"]
