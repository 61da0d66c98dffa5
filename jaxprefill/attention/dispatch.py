"""The one attention dispatch point. Every model calls `attend`; backends plug in here.

Masking semantics (shared with `pallas_kernels.block_sparse_attention`): query i of batch row b
sits at key index `i + q_offset[b]`. Key j is visible to query i iff
  * not causal, or j <= i + q_offset[b];
  * segment ids are equal (packed inputs: documents never see each other);
  * no sliding window, or i + q_offset[b] - j < window.
A query that sees no key returns 0 (reference backend), never NaN.

Backends (`AttentionSpec.impl`):
  * "reference": float32 einsum with a materialized [B, Sq, Sk] mask. Tests and debugging.
  * "xla" / "cudnn": `jax.nn.dot_product_attention` with that implementation.
  * "block_sparse": `pallas_kernels.block_sparse_attention` over the blocks the mask leaves
    (packed rows skip cross-document blocks, chunks skip future blocks).
  * "auto": on GPUs cuDNN for plain causal prefill and block_sparse for packed rows / chunks,
    MLA's Dqk != Dv and float32 prefills on Hopper (see `auto_impl`); XLA otherwise.
Sparse prefill: `AttentionSpec(sparse=SparseConfig)` (jaxprefill.sparse) routes plain causal
self-attention prefills (no q_offset, no segment ids, no window, Sq == Sk >= min_length) of the
layers its rules cover through the block-sparse kernel with the layer's policy layout. Models
pass `layer=i` (and `lengths` [B], valid tokens per right-padded row) and never branch on it.
Chunked prefills (q_offset, Sq > 1) and prepacked rows (segment ids) use the policy too:
`jaxprefill.attention.sparse_chunks`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

IMPLS = ("auto", "reference", "xla", "cudnn", "block_sparse")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """How to compute attention. Static (hashable): it is part of the jit cache key."""

    impl: str = "auto"
    sparse: Any = None  # jaxprefill.sparse.SparseConfig, or None (dense prefill)

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"unknown attention impl {self.impl!r}; choose one of {IMPLS}")
        if self.sparse is not None:
            from jaxprefill.sparse import SparseConfig

            object.__setattr__(self, "sparse", SparseConfig.parse(self.sparse))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
           q_offset: jax.Array | None = None, segment_ids: tuple[jax.Array, jax.Array] | None = None,
           window: int | None = None, sm_scale: float | None = None,
           spec: AttentionSpec = AttentionSpec(), layer: int | None = None,
           lengths: jax.Array | None = None) -> jax.Array:
    """Scaled dot-product attention with GQA.

    Args:
      q: [B, Sq, Hq, D]; k: [B, Sk, Hkv, D]; v: [B, Sk, Hkv, Dv], Hq a multiple of Hkv.
      causal: mask keys after the query (by index, shifted by q_offset).
      q_offset: int32 [B], key index of each row's first query (decode / chunked prefill).
      segment_ids: (q_seg [B, Sq], kv_seg [B, Sk]) int32; attend only within equal ids.
      window: sliding window length (Mistral), or None.
      sm_scale: logit scale, default 1/sqrt(D) (D = q's head dim).
      layer: the calling layer's index (selects the sparse prefill policy; None = dense).
      lengths: int32 [B] valid tokens per right-padded row (sparse estimation ignores padding);
        with q_offset, the valid queries of each row's chunk.
    Dv may differ from D (MLA: 192 / 128); non-reference backends pad to max(D, Dv) and slice.
    Returns:
      [B, Sq, Hq, Dv] in q's dtype.
    """
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    policy = sparse_policy(spec, layer, q, k, causal, q_offset, segment_ids, window)
    if policy is not None:
        return sparse_prefill(q, k, v, policy, spec.sparse, layer, lengths, sm_scale)
    if spec.sparse is not None and layer is not None and (q_offset is not None
                                                          or segment_ids is not None):
        # chunked prefill / prepacked rows (the batch engine): see attention/sparse_chunks.py
        from jaxprefill.attention.sparse_chunks import maybe_attend

        out = maybe_attend(q, k, v, spec.sparse, layer, causal, q_offset, segment_ids, window,
                           lengths, sm_scale)
        if out is not None:
            return out
    if spec.impl == "reference":
        mask = build_mask(q.shape[1], k.shape[1], q.shape[0], causal, q_offset, segment_ids, window)
        return reference_attention(q, k, v, mask, sm_scale)

    simple = q_offset is None and segment_ids is None and q.shape[1] == k.shape[1]
    implementation = spec.impl if spec.impl != "auto" else auto_impl(q, simple, v.shape[-1])
    if implementation == "block_sparse" and window is not None and spec.impl == "auto":
        implementation = "xla"  # the structured layouts do not model windows yet
    if implementation == "block_sparse":
        return structured_block_sparse(q, k, v, causal, q_offset, segment_ids, window, sm_scale)
    dv = v.shape[-1]  # the block-sparse kernel takes Dv != Dqk natively; jax.nn does not
    if dv != q.shape[-1]:
        # jax.nn.dot_product_attention needs one head dim for q, k and v (MLA prefill has
        # Dqk=192, Dv=128): zero-pad the smaller side (zeros change neither logits nor outputs),
        # then slice the output back to Dv.
        d = max(dv, q.shape[-1])
        q, k, v = (_pad_last(t, d) for t in (q, k, v))
        out = attend(q, k, v, causal=causal, q_offset=q_offset, segment_ids=segment_ids,
                     window=window, sm_scale=sm_scale, spec=spec)
        return out[..., :dv]
    if simple:  # plain (windowed) causal self-attention: no mask array, fastest kernels
        local = (window - 1, 0) if (window is not None and causal) else None
        if window is not None and not causal:
            local = (window - 1, window - 1)
        return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=causal,
                                            local_window_size=local, implementation=implementation)
    mask = build_mask(q.shape[1], k.shape[1], q.shape[0], causal, q_offset, segment_ids, window)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=sm_scale,
                                        implementation=implementation)


def sparse_policy(spec: AttentionSpec, layer, q, k, causal, q_offset, segment_ids, window):
    """The sparse prefill policy for this call, or None when attention stays dense.

    Only plain causal self-attention prefills qualify: decode and chunked prefill (q_offset),
    packed rows (segment ids) and sliding windows stay dense; so does a prefill shorter than
    min_length (static: the padded length).
    """
    cfg = spec.sparse
    if cfg is None or layer is None or not causal or q_offset is not None:
        return None
    if segment_ids is not None or window is not None or q.shape[1] != k.shape[1]:
        return None
    if q.shape[1] < max(cfg.min_length, 1) or q.shape[-1] != k.shape[-1]:
        return None
    return cfg.policy_for(layer)


def sparse_prefill(q, k, v, policy, cfg, layer: int, lengths, sm_scale: float) -> jax.Array:
    """Causal attention over the blocks ``policy`` selects for this layer."""
    from pallas_kernels import block_sparse_attention

    if hasattr(policy, "attend"):  # policies that reorder K/V (pbs) make their own kernel call
        return policy.attend(q, k, v, layer=layer, lengths=lengths, min_length=cfg.min_length,
                             sm_scale=sm_scale, impl=cfg.kernel)
    layout = policy.build(q, k, layer=layer, lengths=lengths, min_length=cfg.min_length)
    from jaxprefill.attention.sparse_chunks import kernel_impl

    impl = kernel_impl(cfg, q)
    # Kernel options of the policy (BLASST's threshold); impls without the column path get the
    # columns rounded up to blocks; impls without BLASST (the Mosaic GPU kernel) hand over to
    # the Triton kernel.
    opts = policy.kernel_options(q.shape[1]) if hasattr(policy, "kernel_options") else {}
    if layout.has_columns and impl not in _FULL_IMPLS:
        layout = layout.round_columns_to_blocks()
    if opts.get("blasst_threshold") is not None and impl not in _FULL_IMPLS:
        impl = "pallas_gpu"
    return block_sparse_attention(q, k, v, layout, causal=True, sm_scale=sm_scale, impl=impl,
                                  **opts)


# block_sparse_attention impls with the column path and BLASST.
# "auto" resolves to the Triton kernel whenever the layout has columns or BLASST is on.
_FULL_IMPLS = ("auto", "reference", "xla", "pallas_tpu", "pallas_gpu")


def auto_impl(q: jax.Array, simple: bool, dv: int | None = None) -> str:
    """Backend for impl="auto" (q [B, Sq, H, Dqk], Dv = dv): XLA off GPUs.

    jax.nn.dot_product_attention(implementation=None) always picks XLA (measured 7.7x slower
    than cuDNN for SmolLM2 prefill on an H100), so we choose: cuDNN for the mask-free causal
    path with one head dim (a multiple of 8, <= 128); the block-sparse Pallas kernel (Mosaic GPU
    on Hopper, else Triton) for packed rows and chunks of 64+ queries (it skips masked blocks) and
    for prefills whose head dims cuDNN does not take as they are (MLA's Dqk=192 / Dv=128: jax.nn
    needs V padded to Dqk, and > 128 fell to XLA; the Mosaic kernel takes 192/128 natively, 665
    TFLOP/s at 16 heads x 32K on an H100, docs/performance.md); XLA for decode and the rest.

    float32 on Hopper: cuDNN takes 16-bit inputs only, and XLA's path materializes the
    [B, H, Sq, Sk] scores (a float32 SmolLM2 batch of 40 x 8K ran out of memory) and multiplies
    in TF32 (4e-4 relative error). So prefills of 64+ queries with head dims <= 128 go to the
    block-sparse Triton kernel, whose three-TF32 dots keep float32 accuracy (6e-7) in O(S)
    memory: 2.5x XLA's speed at head dim 64, equal at 128 (H100, docs/performance.md, eighth
    session). Larger head dims (MLA's 192) and other GPUs stay on XLA: the kernel's float32
    tiles were measured to fit shared memory only there.
    """
    if jax.default_backend() != "gpu":
        return "xla"
    d = q.shape[-1]
    if q.dtype == jnp.float32:
        from pallas_kernels.gpu import block_sparse_mosaic as mosaic

        fits = max(d, dv or d) <= 128 and q.shape[1] >= 64
        return "block_sparse" if fits and mosaic.is_hopper() else "xla"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return "xla"
    one_dim = (dv is None or dv == d) and d % 8 == 0 and d <= 128
    if simple and one_dim:
        return "cudnn"
    return "block_sparse" if q.shape[1] >= 64 else "xla"


def structured_block_sparse(q, k, v, causal, q_offset, segment_ids, window, sm_scale):
    """attend() through the block-sparse kernel with a layout derived from the mask structure."""
    from pallas_kernels import SegmentIds, block_sparse_attention

    from jaxprefill.attention.layouts import structured_layout

    if window is not None:
        raise NotImplementedError("sliding windows on the block-sparse path: use impl='xla'")
    block_q = 128 if q.shape[1] >= 128 else 64
    layout = structured_layout(q.shape[1], k.shape[1], q.shape[0], k.shape[2], block_q=block_q,
                               block_k=128,
                               causal=causal, q_offset=q_offset, segment_ids=segment_ids)
    segs = None if segment_ids is None else SegmentIds(*segment_ids)
    return block_sparse_attention(q, k, v, layout, causal=causal, sm_scale=sm_scale,
                                  q_offset=q_offset, segment_ids=segs)


def _pad_last(x: jax.Array, d: int) -> jax.Array:
    pad = d - x.shape[-1]
    return x if pad == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


def build_mask(sq: int, sk: int, batch: int, causal: bool, q_offset: jax.Array | None,
               segment_ids: tuple[jax.Array, jax.Array] | None, window: int | None) -> jax.Array:
    """bool [B, Sq, Sk]: True where query i may attend key j (see module docstring)."""
    q_idx = jnp.arange(sq)[None, :, None]
    if q_offset is not None:
        q_idx = q_idx + jnp.asarray(q_offset, jnp.int32).reshape(-1, 1, 1)
    k_idx = jnp.arange(sk)[None, None, :]
    mask = jnp.ones((batch, sq, sk), bool)
    if causal:
        mask &= k_idx <= q_idx
    if window is not None:
        mask &= (q_idx - k_idx < window) & (k_idx - q_idx < (1 if causal else window))
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids
        mask &= q_seg[:, :, None] == kv_seg[:, None, :]
    return mask


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                        sm_scale: float) -> jax.Array:
    """Pure-jnp float32 attention. mask bool [B, Sq, Sk]; fully masked rows give 0."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, sq, hkv, hq // hkv, d)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)) * sm_scale
    m = mask[:, None, None]
    logits = jnp.where(m, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(m, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32))
    return out.reshape(b, sq, hq, v.shape[-1]).astype(q.dtype)
