"""Public entry point: :func:`block_sparse_attention`, dispatching on ``impl``."""

from __future__ import annotations

from typing import Any

import jax

from pallas_kernels.layout import BlockSparseLayout

IMPLS = ("auto", "reference", "xla", "pallas_tpu", "pallas_gpu", "pallas_mosaic")


def default_impl(backend: str | None = None) -> str:
    """``gpu -> pallas_gpu``, ``tpu -> pallas_tpu``, anything else -> ``xla``."""
    backend = backend or jax.default_backend()
    return {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend, "xla")


def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layout: BlockSparseLayout,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    q_offset: Any = None,
    segment_ids: Any = None,
    return_lse: bool = False,
    blasst_threshold: float | None = None,
    impl: str = "auto",
    interpret: Any = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Flash attention that visits, per query block, only the key blocks listed in ``layout``.

    Token (i, j) of query head h is attended iff key block ``j // block_k`` is listed for query
    block ``i // block_q`` in the layout row of h (row h if the layout has Hq heads, row
    ``h // (Hq // Hkv)`` if it has Hkv heads), and ``(not causal or j <= i + q_offset[b])``, and
    the segment ids of i and j are equal. Rows that attend to nothing give 0 and lse ``-inf``.
    If the layout has columns (``col_idx``/``col_cnt``), query block i also attends to its
    listed key positions (same causal and segment masks).

    Args:
        q: ``[B, Sq, Hq, Dqk]``. k: ``[B, Sk, Hkv, Dqk]``. v: ``[B, Sk, Hkv, Dv]``
            (``Hq % Hkv == 0``; ``Dv`` may differ from ``Dqk``; lengths need not be block
            multiples).
        layout: :class:`BlockSparseLayout` with ``nq = ceil(Sq / block_q)``,
            ``nk = ceil(Sk / block_k)``, heads ``Hq`` or ``Hkv``, batch ``B`` or 1.
        causal: apply ``j <= i + q_offset`` inside the listed blocks.
        sm_scale: logit scale, default ``Dqk ** -0.5``.
        q_offset: int32 scalar or ``[B]``: absolute position of query 0 (``Sk - Sq`` for
            chunked prefill). Default 0.
        segment_ids: ``SegmentIds(q [B, Sq], kv [B, Sk])`` int32, or one ``[B, S]`` array when
            ``Sq == Sk``. Default: no segment mask.
        return_lse: also return the natural-log logsumexp ``[B, Hq, Sq]`` float32.
        blasst_threshold: BLASST's lambda in [0, 1] (None = off): a query row drops a key tile
            (listed block or column chunk) whose max logit is below its running max by more
            than ``ln(lambda)``; exact semantics in :mod:`pallas_kernels.reference`.
        impl: ``"reference"`` (dense jnp, tests only), ``"xla"`` (block gather, CPU path),
            ``"pallas_tpu"``, ``"pallas_gpu"`` (Pallas Triton lowering), ``"pallas_mosaic"``
            (Pallas Mosaic GPU, Hopper only: bf16/f16, ``block_q % 128 == 0``, ``block_k`` 64
            or 128, no columns or BLASST) or ``"auto"`` (``pallas_mosaic`` on Hopper when it
            takes the inputs, else ``pallas_gpu``, on GPUs).
        interpret: for the Pallas impls: ``True`` or (TPU) a ``pltpu.InterpretParams`` to run
            the kernel in interpret mode on any backend.

    Returns:
        ``out [B, Sq, Hq, Dv]`` in ``q.dtype`` (and ``lse`` if ``return_lse``).
    """
    if impl == "auto":
        impl = default_impl()
        if impl == "pallas_gpu" and blasst_threshold is None and not interpret:
            # Hopper: the Mosaic GPU kernel (wgmma/TMA) when it takes the inputs; measured
            # 1.6-1.7x the Triton kernel at full density on an H100 (docs/performance.md).
            from pallas_kernels.gpu import block_sparse_mosaic as mosaic
            if mosaic.is_hopper() and mosaic.supports(q, k, v, layout):
                impl = "pallas_mosaic"
    kw = dict(causal=causal, sm_scale=sm_scale, q_offset=q_offset, segment_ids=segment_ids,
              blasst_threshold=blasst_threshold)
    if impl == "reference":
        from pallas_kernels.reference import block_sparse_attention_reference as fn
    elif impl == "xla":
        from pallas_kernels.xla.block_sparse_xla import block_sparse_attention_xla as fn
    elif impl == "pallas_tpu":
        from pallas_kernels.tpu.block_sparse_tpu import block_sparse_attention_tpu as fn
        kw["interpret"] = interpret
    elif impl == "pallas_gpu":
        from pallas_kernels.gpu.block_sparse_triton import block_sparse_attention_triton as fn
        kw["interpret"] = interpret
    elif impl == "pallas_mosaic":
        from pallas_kernels.gpu.block_sparse_mosaic import block_sparse_attention_mosaic as fn
        if kw.pop("blasst_threshold", None) is not None:
            raise ValueError("impl='pallas_mosaic' does not support blasst_threshold yet; "
                             "use 'pallas_gpu'")
        if interpret:
            kw["interpret"] = interpret
    else:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    out, lse = fn(q, k, v, layout, **kw)
    return (out, lse) if return_lse else out
