"""`mla_decode`: absorbed MLA decode attention over a paged latent cache, one entry point.

    out_latent, lse = mla_decode(q_latent, q_pe, cache, page_table, lengths, sm_scale)

Shapes: q_latent [B, H, Dc] (the query with W_UK absorbed, Dc = kv_lora_rank = 512 for
DeepSeek), q_pe [B, H, Dr] (roped, Dr = 64), cache [num_pages, page, Dc + Dr] (page = 64 tokens:
normalized latent | roped shared key), page_table int32 [B, P], lengths int32 [B]. Returns
out_latent float32 [B, H, Dc] (W_UV is applied by the caller) and lse float32 [B, H].
`sm_scale` must be passed explicitly: DeepSeek's is qk_head_dim^-0.5 * mscale^2 (never
(Dc + Dr)^-0.5).

impl: "reference" (pure jnp, gathers the whole cache), "pallas_gpu" (Triton lowering),
"pallas_mosaic" (Mosaic GPU, Hopper: wgmma + TMA, two consumer warpgroups), "pallas_tpu"
(Mosaic TPU), "auto" (on Hopper the Mosaic GPU kernel when it takes the inputs, else Triton on
GPUs, except float32 caches: reference, faster there; Pallas on TPU; reference on CPU). On the
H100 at batch 64 x 32K the Mosaic GPU kernel reads the cache at 94-96% of copy bandwidth with
16 heads (Triton: 84%) and 82-84% with 128 (Triton: 35%), docs/performance.md. Kernels split the KV
sequence into `num_splits` chunks (flash-decoding) and merge them with their LSEs. Tuning knobs
go through `kernel_kwargs` (GPU: block_h, block_n, num_warps, num_stages); the defaults were
measured on the H100 (H=16 is bandwidth-bound, H=128 compute-bound: docs/performance.md).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.mla_reference import combine_splits, mla_decode_reference

IMPLS = ("auto", "reference", "pallas_gpu", "pallas_mosaic", "pallas_tpu")


def default_mla_impl(q_latent: jax.Array | None = None, cache: jax.Array | None = None) -> str:
    """What impl="auto" runs for these inputs on the default device."""
    platform = jax.devices()[0].platform
    if platform in ("gpu", "cuda") and cache is not None and cache.dtype == jnp.float32:
        # H100, 2026-11-24 (scripts/bench_f32_estimation.py): the Triton kernel's float32 tiles
        # do not fit shared memory at 128 heads (DeepSeek's Dc = 512), and at 16 heads XLA's
        # gather + einsum took 0.37 ms against 2.8 ms (three-TF32 dots) and 3.9 ms (exact).
        return "reference"
    if platform in ("gpu", "cuda") and q_latent is not None and cache is not None:
        from pallas_kernels.gpu import mla_decode_mosaic as mosaic
        from pallas_kernels.gpu.block_sparse_mosaic import is_hopper
        if is_hopper() and mosaic.supports(q_latent, cache):
            return "pallas_mosaic"
    return {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform, "reference")


def mla_decode(q_latent: jax.Array, q_pe: jax.Array, cache: jax.Array, page_table: jax.Array,
               lengths: jax.Array, sm_scale: float, *, impl: str = "auto",
               num_splits: int | None = None, interpret: Any = False, **kernel_kwargs
               ) -> tuple[jax.Array, jax.Array]:
    """Absorbed MLA decode; see the module docstring. `kernel_kwargs` go to the kernel."""
    if impl not in IMPLS:
        raise ValueError(f"unknown mla_decode impl {impl!r}; choose one of {IMPLS}")
    if impl == "auto":
        impl = default_mla_impl(q_latent, cache)
    if impl == "reference":
        return mla_decode_reference(q_latent, q_pe, cache, page_table, lengths, sm_scale)
    if impl == "pallas_gpu":
        from pallas_kernels.gpu.mla_decode_triton import mla_decode_triton
        return mla_decode_triton(q_latent, q_pe, cache, page_table, lengths, sm_scale=sm_scale,
                                 num_splits=num_splits, interpret=interpret, **kernel_kwargs)
    if impl == "pallas_mosaic":
        from pallas_kernels.gpu.mla_decode_mosaic import mla_decode_mosaic
        return mla_decode_mosaic(q_latent, q_pe, cache, page_table, lengths, sm_scale=sm_scale,
                                 num_splits=num_splits, interpret=interpret, **kernel_kwargs)
    from pallas_kernels.tpu.mla_decode_tpu import mla_decode_tpu
    return mla_decode_tpu(q_latent, q_pe, cache, page_table, lengths, sm_scale=sm_scale,
                          num_splits=num_splits, interpret=interpret, **kernel_kwargs)


__all__ = ["IMPLS", "combine_splits", "default_mla_impl", "mla_decode", "mla_decode_reference"]
