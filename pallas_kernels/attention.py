"""Block-sparse attention: :func:`block_sparse_attention` and its one backend resolver.

Which implementation runs a call is decided in one place, :func:`block_sparse_backend`, from
what each backend declares (see :mod:`pallas_kernels.backends`): "auto" takes, in order,

    mosaic_gpu   Hopper, bf16/f16, block_q % 128 == 0, block_k 64 or 128, no BLASST, tiles
                 within shared memory (1.6-1.7x Triton at full density, H100); key columns
                 run outside the kernel (``column_merge``: Triton's column path over the
                 columns alone, merged by logsumexp; 0.85x Triton's fused column path at
                 the 32K SmolLM2 shapes, H100)
    triton       NVIDIA GPUs: everything, float32 with head dims <= 128 (three TF32 products)
    mosaic_tpu   TPUs
    xla          anywhere (block gather); what CPUs run

``reference`` (dense float32 jnp) runs only when named.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import backends, column_merge
from pallas_kernels.gpu import block_sparse_mosaic as mosaic
from pallas_kernels.gpu.block_sparse_triton import block_sparse_attention_triton
from pallas_kernels.gpu import mosaic_common
from pallas_kernels.layout import BlockSparseLayout
from pallas_kernels.reference import block_sparse_attention_reference
from pallas_kernels.tpu.block_sparse_tpu import block_sparse_attention_tpu
from pallas_kernels.xla.block_sparse_xla import block_sparse_attention_xla


@dataclasses.dataclass(frozen=True)
class BlockSparseCall:
    """What the backends of block-sparse attention look at (arrays for shapes and dtypes)."""

    q: Any
    k: Any
    v: Any
    layout: BlockSparseLayout
    blasst: bool = False
    config: Any = None
    interpret: bool = False


def _mosaic_refusal(call: BlockSparseCall) -> str | None:
    if call.blasst:
        return "no BLASST predicate"
    if not (call.interpret or mosaic_common.is_hopper()):
        return "needs a Hopper (sm90) GPU"
    blocks = dataclasses.replace(call.layout, col_idx=None, col_cnt=None)  # columns: merged
    return mosaic.unsupported(call.q, call.k, call.v, blocks,
                              call.config or mosaic.BlockSparseMosaicConfig())


def _triton_refusal(call: BlockSparseCall) -> str | None:
    if call.q.dtype == jnp.float32 and not call.interpret:
        # The float32 tiles (three TF32 operands) were measured to fit shared memory on Hopper
        # with head dims <= 128 only.
        if max(call.q.shape[-1], call.v.shape[-1]) > 128:
            return "float32 tiles of head dims > 128 exceed shared memory"
        if not mosaic_common.is_hopper():
            return "float32 tiles are sized for Hopper's shared memory"
    return None


BACKENDS = (
    backends.Backend("mosaic_gpu", ("gpu",), _mosaic_refusal),
    backends.Backend("triton", ("gpu",), _triton_refusal),
    backends.Backend("mosaic_tpu", ("tpu",)),
    backends.Backend("xla"),
    backends.Backend("reference", auto=False, auto_note="tests only (dense float32)"),
)
IMPLS = ("auto",) + tuple(b.name for b in BACKENDS)

_KERNELS = {
    "mosaic_gpu": mosaic.block_sparse_attention_mosaic,
    "triton": block_sparse_attention_triton,
    "mosaic_tpu": block_sparse_attention_tpu,
    "xla": block_sparse_attention_xla,
    "reference": block_sparse_attention_reference,
}


def block_sparse_backend(q: jax.Array, k: jax.Array, v: jax.Array, layout: BlockSparseLayout, *,
                         impl: str = "auto", blasst_threshold: float | None = None,
                         interpret: Any = False, config: Any = None) -> str:
    """The implementation :func:`block_sparse_attention` runs for this call (see module)."""
    call = BlockSparseCall(q, k, v, layout, blasst_threshold is not None, config,
                           bool(interpret))
    return backends.resolve("block_sparse_attention", BACKENDS, impl, call,
                            interpret=bool(interpret))


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
    config: Any = None,
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
        impl: "auto" or a backend name (module docstring); a named backend that cannot run
            the call raises ``ValueError`` saying why.
        interpret: for the Pallas backends: ``True`` or (TPU) a ``pltpu.InterpretParams`` to
            run the kernel in interpret mode on any device.
        config: the tuning knobs of the backend that runs (``mosaic_gpu``:
            :class:`pallas_kernels.gpu.block_sparse_mosaic.BlockSparseMosaicConfig`).

    Returns:
        ``out [B, Sq, Hq, Dv]`` in ``q.dtype`` (and ``lse`` if ``return_lse``).
    """
    name = block_sparse_backend(q, k, v, layout, impl=impl, blasst_threshold=blasst_threshold,
                                interpret=interpret, config=config)
    kw = dict(causal=causal, sm_scale=sm_scale, q_offset=q_offset, segment_ids=segment_ids)
    if name != "mosaic_gpu":
        kw["blasst_threshold"] = blasst_threshold
    if name in ("triton", "mosaic_tpu") or (name == "mosaic_gpu" and interpret):
        kw["interpret"] = interpret
    if config is not None:
        if name != "mosaic_gpu":
            raise ValueError(f"block_sparse_attention: config is for mosaic_gpu; {name} runs")
        kw["config"] = config
    if name == "mosaic_gpu" and layout.has_columns:  # no column path in the kernel: Triton's
        triton_columns = functools.partial(_KERNELS["triton"], interpret=bool(interpret))
        out, lse = column_merge.with_merged_columns(_KERNELS[name], q, k, v, layout,
                                                    columns=triton_columns,
                                                    columns_prior=True, **kw)
    else:
        out, lse = _KERNELS[name](q, k, v, layout, **kw)
    return (out, lse) if return_lse else out


__all__ = ["BACKENDS", "IMPLS", "BlockSparseCall", "block_sparse_attention",
           "block_sparse_backend"]
