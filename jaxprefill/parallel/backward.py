"""Gradients through the ring: which step kernels have a backward pass, and the one that needs help.

Training through context parallelism (`AttentionSpec(differentiable=True, context=...)`) needs
every ring step's kernel to be differentiable; ``ppermute``, ``lax.scan``, ``lax.cond``,
``shard_map`` and the online-softmax combine (:func:`jaxprefill.parallel.ring.merge_many`) are.
Of the block-sparse backends only the jnp ones qualify (:data:`DIFFERENTIABLE`):

* "reference": dense float32 masked softmax; plain autodiff (each step materializes its
  ``[B, Hq, S/n, S/n]`` scores and keeps them for the backward pass).
* "xla": the block gather with an online softmax. Its loop runs ``max(kv_cnt)`` times, read from
  the layout; the ring builds its layouts inside the program, so that loop is a ``while_loop``,
  which JAX cannot differentiate in reverse mode. :func:`xla_step` keeps the kernel's forward
  (no ``[Sq, Sk]`` array, only the step's inputs saved) and defines its backward as the vjp of
  the reference backend recomputed from those inputs: the same attention (same layout, masks,
  BLASST rule), so the gradient is that of the forward up to float32 rounding. The backward of
  one step materializes that step's ``[B, Hq, S/n, S/n]`` float32 scores, freed before the next.

The Pallas kernels (triton, mosaic_gpu, mosaic_tpu) have no backward pass.
"""

from __future__ import annotations

from typing import Any

import jax

from pallas_kernels import BlockSparseLayout, block_sparse_attention

DIFFERENTIABLE = ("xla", "reference")


def differentiable_kernel(kernel: str, sparse_kernel: str = "auto") -> str:
    """The ring kernel of a differentiable call: ``kernel`` (`ContextParallel.kernel`) when it is
    named, else the sparse config's kernel when named, else "xla". Raises ValueError (one line)
    for a kernel with no backward pass."""
    name, field = kernel, "ContextParallel.kernel"
    if name == "auto":
        name, field = sparse_kernel, "the sparse config's kernel"
    if name == "auto":
        return "xla"
    if name not in DIFFERENTIABLE:
        raise ValueError(f"context parallelism: {field} is {name!r}, which has no backward pass; "
                         f"training through the ring needs one of {DIFFERENTIABLE} (or 'auto')")
    return name


def xla_step(q: jax.Array, k: jax.Array, v: jax.Array, layout: BlockSparseLayout, *,
             causal: bool, sm_scale: float, q_offset: Any, segment_ids: Any,
             options: dict) -> tuple[jax.Array, jax.Array]:
    """`block_sparse_attention(..., impl="xla", return_lse=True)` with a reverse-mode rule.

    q [B, Sq, Hq, D], k [B, Sk, Hkv, D], v [B, Sk, Hkv, Dv]; ``layout``, ``q_offset`` (int32 [B]
    or None) and ``segment_ids`` (`SegmentIds` or None) get no gradient; ``options`` are extra
    static kernel arguments (BLASST's threshold). Returns (out [B, Sq, Hq, Dv] in q's dtype,
    lse float32 [B, Hq, Sq]); cotangents of both flow back to q, k and v.
    """
    kw = dict(causal=causal, sm_scale=sm_scale, return_lse=True, **options)

    def run(impl, q, k, v, layout, off, segs):
        return block_sparse_attention(q, k, v, layout, q_offset=off, segment_ids=segs,
                                      impl=impl, **kw)

    @jax.custom_vjp
    def step(q, k, v, layout, off, segs):
        return run("xla", q, k, v, layout, off, segs)

    def forward(q, k, v, layout, off, segs):
        return run("xla", q, k, v, layout, off, segs), (q, k, v, layout, off, segs)

    def backward(saved, cotangents):
        q, k, v, layout, off, segs = saved
        _, vjp = jax.vjp(lambda q, k, v: run("reference", q, k, v, layout, off, segs), q, k, v)
        return (*vjp(cotangents), None, None, None)  # integer inputs: no cotangent

    step.defvjp(forward, backward)
    return step(q, k, v, layout, q_offset, segment_ids)


__all__ = ["DIFFERENTIABLE", "differentiable_kernel", "xla_step"]
