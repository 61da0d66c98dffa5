"""The one attention dispatch point. Every model calls `attend`; backends plug in here.

Masking semantics (shared with `pallas_kernels.block_sparse_attention`): query i of batch row b
sits at key index `i + q_offset[b]`. Key j is visible to query i iff
  * not causal, or j <= i + q_offset[b];
  * segment ids are equal (packed inputs: documents never see each other);
  * no sliding window, or i + q_offset[b] - j < window.
A query that sees no key returns 0 (reference backend), never NaN.

Backends (`AttentionSpec.impl`; one resolver, :func:`attention_backend`, says which runs and
why; "auto" takes the first that runs the call: cuDNN first for mask-free calls, the
block-sparse kernel first for masked ones; reasons are logged at debug level):
  * "cudnn": `jax.nn.dot_product_attention` on cuDNN; GPUs, bf16/f16, one head dim <= 128 and a
    multiple of 8. First for mask-free causal prefill (7.7x XLA for SmolLM2 on an H100).
  * "block_sparse": `pallas_kernels.block_sparse_attention` over the blocks the mask leaves
    (`pallas_kernels.layout.structured_layout`: packed rows skip cross-document blocks, chunks
    skip future blocks); its own resolver picks the kernel. First for chunks and packed rows;
    also MLA's Dqk=192 / Dv=128 (the Mosaic kernel takes them natively) and float32 prefills on
    Hopper with head dims <= 128 (three-TF32 Triton dots in O(S) memory, where XLA materializes
    the scores). Needs 64+ queries; no sliding windows; no gradients.
  * "xla": `jax.nn.dot_product_attention` on XLA; anywhere: what CPUs and TPUs run, while its
    float32 scores [B, Hq, Sq, Sk] (which it materializes) take at most `XLA_SCORES_LIMIT`
    bytes; longer calls there run "block_sparse" (O(S) memory: a loop over key blocks on
    CPUs, the Mosaic kernel on TPUs), so a long prompt is slow rather than out of memory.
  * "reference": float32 einsum with a materialized [B, Sq, Sk] mask; only when named.
`AttentionSpec(differentiable=True)` (training) skips backends without gradients.
Sparse prefill: `AttentionSpec(sparse=SparseConfig)` (jaxprefill.sparse): the attention entry
point `jaxprefill.attention.sparse` classifies each call once (whole prompt, chunk at a query
offset, packed row) and runs the layer's policy; models pass `layer=i` (and `lengths` [B],
valid tokens per right-padded row) and never branch on it.
Context parallelism: `AttentionSpec(context=ContextParallel(mesh))` (jaxprefill.parallel)
runs every call as ring attention over the mesh's `sequence` axis (:func:`context_attend`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import SegmentIds, backends, block_sparse_attention
from pallas_kernels.gpu import mosaic_common
from pallas_kernels.layout import structured_layout
from jaxprefill.attention.sparse import LayoutShare, sparse_attend, sparse_call
from jaxprefill.parallel import ContextParallel, ring
from jaxprefill.sparse import SparseConfig

IMPLS = ("auto", "reference", "xla", "cudnn", "block_sparse")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """How to compute attention. Static (hashable): it is part of the jit cache key.

    impl: a backend name or "auto" (module docstring).
    sparse: a SparseConfig (anything `SparseConfig.parse` takes), or None: dense prefill.
    differentiable: the caller takes gradients (training): backends without a backward pass
      are skipped.
    context: a `jaxprefill.parallel.ContextParallel` (ring attention over a mesh axis), or
      None: attention runs where its inputs are (GSPMD decides).
    """

    impl: str = "auto"
    sparse: Any = None
    differentiable: bool = False
    context: Any = None

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"unknown attention impl {self.impl!r}; choose one of {IMPLS}")
        if self.context is not None and not isinstance(self.context, ContextParallel):
            raise ValueError(f"AttentionSpec.context must be a ContextParallel or None, got "
                             f"{type(self.context).__name__}")
        if self.sparse is not None:
            object.__setattr__(self, "sparse", SparseConfig.parse(self.sparse))


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """What the attention backends look at: q [B, Sq, Hq, D], Dv, the mask's structure."""

    q: Any
    dv: int
    simple: bool  # no q_offset, no segment ids, Sq == Sk: no mask array needed
    window: int | None
    differentiable: bool
    sk: int | None = None  # keys per row (None: Sq)

    def scores_bytes(self) -> int:
        """Bytes of the float32 scores [B, Hq, Sq, Sk] a materializing backend holds."""
        b, sq, hq, _ = self.q.shape
        return 4 * b * hq * sq * (sq if self.sk is None else self.sk)


# Off GPUs, XLA's attention materializes its float32 scores; a call whose scores would exceed
# this runs the block-sparse kernel instead (a 32K-token row of 9 heads needs 38.7 GB of them).
XLA_SCORES_LIMIT = 1 << 30


def _cudnn_refusal(call: AttentionCall) -> str | None:
    d = call.q.shape[-1]
    if call.q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"takes bf16/f16 inputs, not {call.q.dtype}"
    if call.dv != d or d % 8 or d > 128:
        return f"needs one head dim, a multiple of 8 and <= 128 (got Dqk={d}, Dv={call.dv})"
    return None


def _cudnn_not_preferred(call: AttentionCall) -> str | None:
    if not call.simple and not call.differentiable:
        return "masked calls run on the block-sparse kernel (it skips masked blocks) or XLA"
    return None


def _block_sparse_refusal(call: AttentionCall) -> str | None:
    if call.window is not None:
        return "the structured layouts do not model sliding windows"
    if call.differentiable:
        return "no backward pass"
    if call.q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        return f"takes bf16/f16/f32 inputs, not {call.q.dtype}"
    return None


def _block_sparse_not_preferred(call: AttentionCall) -> str | None:
    if call.q.shape[1] < 64:
        return f"{call.q.shape[1]} queries: decode and short chunks run faster on XLA"
    if backends.platform() != "gpu":
        if call.scores_bytes() > XLA_SCORES_LIMIT:
            return None  # XLA would materialize more than the limit: O(S) memory here
        return (f"off GPUs XLA's fused attention is the fast path while its scores fit "
                f"{XLA_SCORES_LIMIT >> 20} MiB (this call: {call.scores_bytes() >> 20} MiB)")
    wide = max(call.q.shape[-1], call.dv) > 128
    if call.q.dtype == jnp.float32 and (wide or not mosaic_common.is_hopper()):
        return "float32: the kernel's float32 tiles fit Hopper with head dims <= 128 only"
    return None


_CUDNN = backends.Backend("cudnn", ("gpu",), _cudnn_refusal,
                          prefer_not=_cudnn_not_preferred)
# block_sparse runs anywhere when named (the XLA block gather off GPUs).
_BLOCK_SPARSE = backends.Backend("block_sparse", (), _block_sparse_refusal,
                                 prefer_not=_block_sparse_not_preferred)
_XLA = backends.Backend("xla")
_REFERENCE = backends.Backend("reference", auto=False, auto_note="tests only (float32, [B,Sq,Sk])")
# Preference: mask-free prefill -> cuDNN first; masked calls (chunks, packed rows) -> the
# block-sparse kernel first, which skips the masked blocks.
BACKENDS_SIMPLE = (_CUDNN, _BLOCK_SPARSE, _XLA, _REFERENCE)
BACKENDS_MASKED = (_BLOCK_SPARSE, _CUDNN, _XLA, _REFERENCE)


def attention_backend(q: jax.Array, dv: int, *, simple: bool, window: int | None = None,
                      impl: str = "auto", differentiable: bool = False,
                      sk: int | None = None) -> str:
    """The backend `attend` runs for q [B, Sq, Hq, D], value head dim ``dv`` and ``sk`` keys
    per row (default Sq)."""
    call = AttentionCall(q, dv, simple, window, differentiable, sk)
    order = BACKENDS_SIMPLE if simple else BACKENDS_MASKED
    return backends.resolve("attend", order, impl, call)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
           q_offset: jax.Array | None = None, segment_ids: tuple[jax.Array, jax.Array] | None = None,
           window: int | None = None, sm_scale: float | None = None,
           spec: AttentionSpec = AttentionSpec(), layer: int | None = None,
           lengths: jax.Array | None = None, share: LayoutShare | None = None) -> jax.Array:
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
      share: the forward's :class:`LayoutShare` (sparse policies with ``share_layers`` > 1
        reuse an earlier layer's layout through it); None: every layer builds its own.
    Dv may differ from D (MLA: 192 / 128); non-reference backends pad to max(D, Dv) and slice.
    Returns:
      [B, Sq, Hq, Dv] in q's dtype.
    """
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    if spec.context is not None:
        return context_attend(q, k, v, spec, causal=causal, q_offset=q_offset,
                              segment_ids=segment_ids, window=window, sm_scale=sm_scale,
                              layer=layer, lengths=lengths)
    call = sparse_call(spec.sparse, layer, q, k, causal=causal, q_offset=q_offset,
                       segment_ids=segment_ids, window=window, lengths=lengths,
                       sm_scale=sm_scale)
    if call is not None:
        return sparse_attend(q, k, v, spec.sparse, call, share)
    simple = q_offset is None and segment_ids is None and q.shape[1] == k.shape[1]
    dv = v.shape[-1]
    implementation = attention_backend(q, dv, simple=simple, window=window, impl=spec.impl,
                                       differentiable=spec.differentiable, sk=k.shape[1])
    if implementation == "reference":
        mask = build_mask(q.shape[1], k.shape[1], q.shape[0], causal, q_offset, segment_ids, window)
        return reference_attention(q, k, v, mask, sm_scale)
    if implementation == "block_sparse":
        return structured_block_sparse(q, k, v, causal, q_offset, segment_ids, sm_scale)
    if dv != q.shape[-1]:
        # jax.nn.dot_product_attention needs one head dim for q, k and v (MLA prefill has
        # Dqk=192, Dv=128): zero-pad the smaller side (zeros change neither logits nor outputs),
        # then slice the output back to Dv.
        d = max(dv, q.shape[-1])
        q, k, v = (_pad_last(t, d) for t in (q, k, v))
    if simple:  # plain (windowed) causal self-attention: no mask array, fastest kernels
        local = (window - 1, 0) if (window is not None and causal) else None
        if window is not None and not causal:
            local = (window - 1, window - 1)
        out = jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=causal,
                                           local_window_size=local, implementation=implementation)
    else:
        mask = build_mask(q.shape[1], k.shape[1], q.shape[0], causal, q_offset, segment_ids,
                          window)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=sm_scale,
                                           implementation=implementation)
    return out[..., :dv]


def context_attend(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec, *,
                   causal: bool, q_offset: jax.Array | None,
                   segment_ids: tuple[jax.Array, jax.Array] | None, window: int | None,
                   sm_scale: float, layer: int | None, lengths: jax.Array | None) -> jax.Array:
    """attend() as ring attention (`spec.context`; see `jaxprefill.parallel.ring`).

    Without q_offset: a prompt or packed rows in ring order (models permute their inputs),
    dense or through the layer's sparse policy. With q_offset: queries against a cache view in
    natural order (chunks over a cached prefix, decode), dense.

    ``spec.differentiable`` (training through the ring; prompts and packed rows, not chunks at a
    q_offset): every step runs a kernel with a backward pass, "xla" or "reference"
    (`jaxprefill.parallel.backward`). `ContextParallel.kernel` "auto" resolves to the sparse
    config's kernel when that names one, else to "xla"; a Pallas kernel named there raises
    ValueError.
    """
    ctx = spec.context
    if window is not None:
        raise ValueError("context parallelism: sliding-window attention is not supported")
    if q_offset is not None:
        if segment_ids is not None:
            raise ValueError("context parallelism: segment ids with a q_offset are not supported")
        if spec.differentiable:
            raise ValueError("context parallelism: gradients through chunks over a cached prefix "
                             "(q_offset) are not supported (whole prompts and packed rows are)")
        if sparse_call(spec.sparse, layer, q, k, causal=causal, q_offset=q_offset,
                       segment_ids=None, window=None, lengths=lengths,
                       sm_scale=sm_scale) is not None:
            raise ValueError("context parallelism: sparse prefill of chunks over a cached prefix "
                             "is not supported (whole prompts and packed rows are)")
        kernel = "auto" if spec.sparse is None else spec.sparse.kernel
        return ring.chunk_attention(ctx, q, k, v, q_offset=q_offset, causal=causal,
                                    sm_scale=sm_scale, kernel=kernel,
                                    differentiable=spec.differentiable)
    call = sparse_call(spec.sparse, layer, q, k, causal=causal, q_offset=None,
                       segment_ids=segment_ids, window=None, lengths=lengths, sm_scale=sm_scale)
    policy = None if call is None else spec.sparse.policy_for(layer)
    if policy is not None and policy.share_layers != 1:
        raise ValueError("context parallelism: share_layers > 1 is not supported (each ring "
                         "step builds its own layout); use share_layers 1")
    return ring.prompt_attention(ctx, q, k, v, causal=causal, segment_ids=segment_ids,
                                 sm_scale=sm_scale, policy=policy, call=call,
                                 differentiable=spec.differentiable)


def structured_block_sparse(q, k, v, causal, q_offset, segment_ids, sm_scale) -> jax.Array:
    """attend() through the block-sparse kernel with a layout derived from the mask structure."""
    block_q = 128 if q.shape[1] >= 128 else 64
    layout = structured_layout(q.shape[1], k.shape[1], q.shape[0], k.shape[2], block_q=block_q,
                               block_k=128, causal=causal, q_offset=q_offset,
                               segment_ids=segment_ids)
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
