"""Kernels for sparse-prefill estimation: dispatch and pure-jnp references.

The estimators of ``jaxprefill.sparse`` reduce large score matrices (the last queries against
every key; strided or pooled queries against every key) to small summaries. Written in XLA,
those matrices are materialized in float32 and read several times; these kernels reduce them
in registers:

- :func:`last_query_sums`: vertical (per key) and slash (per diagonal) sums of the last R
  queries' causal softmax (MInference, FlexPrefill, ProxyAttn budgets, PBS key scores).
- :func:`pooled_block_scores`: one-pass row softmax of strided / reshaped scores pooled into
  blocks (XAttention's antidiagonal scores, ProxyAttn's proxy heads).
- :func:`mass_cut`: the per-row cut of a cumulative-mass block selection (XAttention's
  threshold, FlexPrefill / ProxyAttn / PBS gamma), searched on registers after one read.

``impl``: "auto" (the Pallas GPU kernel on GPUs, XLA elsewhere: TPUs and CPUs run the XLA
estimators of ``jaxprefill.sparse.estimators``), "pallas_gpu", "interpret" (the GPU kernel in
Pallas interpret mode, any backend), "pallas_tpu" (the Pallas TPU kernels: opt-in, verified in
TPU interpret mode only, no TPU was reachable to time them against XLA), "interpret_tpu" (the
TPU kernels in TPU interpret mode, any backend, for tests: its kernels run Python callbacks that
need the GIL, and eager JAX ops dispatched while one is in flight can fill the CPU client's
queue and wait there holding the GIL, a deadlock seen under pytest-xdist; wait for a
TPU-interpret result before dispatching more work) or "reference" (the float32 references
below, small inputs only).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

IMPLS = ("auto", "pallas_gpu", "interpret", "pallas_tpu", "interpret_tpu", "reference")
GPU_IMPLS = ("pallas_gpu", "interpret")
TPU_IMPLS = ("pallas_tpu", "interpret_tpu")


def _tpu_interpret(impl: str) -> Any:
    """The ``interpret`` argument of the TPU kernels for a TPU impl."""
    if impl == "pallas_tpu":
        return False
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.InterpretParams()


def estimation_impl(impl: str = "auto") -> str:
    """Resolves "auto": "pallas_gpu" on GPU backends, "xla" elsewhere (the caller's XLA path)."""
    if impl not in IMPLS + ("xla",):
        raise ValueError(f"unknown estimation impl {impl!r}; expected one of {IMPLS + ('xla',)}")
    if impl != "auto":
        return impl
    return "pallas_gpu" if jax.default_backend() in ("gpu", "cuda") else "xla"


def last_query_sums_reference(q_last: jax.Array, k: jax.Array, lengths: jax.Array, *,
                              scale: float) -> tuple[jax.Array, jax.Array]:
    """Float32 reference of :func:`last_query_sums`: ([B, Hq, S], [B, Hq, S]).

    P [B, Hq, R, S] is materialized; the slash is a gather along each row's diagonals.
    """
    b, hq, n_rows, d = q_last.shape
    seq, hkv = k.shape[1], k.shape[2]
    kk = jnp.repeat(k.astype(jnp.float32), hq // hkv, axis=2)  # [B, S, Hq, D]
    s = jnp.einsum("bhrd,bshd->bhrs", q_last.astype(jnp.float32), kk,
                   precision=jax.lax.Precision.HIGHEST) * scale
    pos = lengths[:, None] - n_rows + jnp.arange(n_rows)[None, :]  # [B, R]
    ok = jnp.arange(seq)[None, None, :] <= pos[:, :, None]  # [B, R, S]
    s = jnp.where(ok[:, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.where(ok[:, None], jnp.exp(s - jnp.where(m == -jnp.inf, 0.0, m)), 0.0)
    tot = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(tot > 0, tot, 1.0)
    vert = p.sum(axis=2)
    key = pos[:, :, None] - jnp.arange(seq)[None, None, :]  # [B, R, S]: key of offset o
    g = jnp.take_along_axis(p, jnp.clip(key, 0, seq - 1)[:, None], axis=-1)
    slash = jnp.where((key >= 0)[:, None], g, 0.0).sum(axis=2)
    return vert, slash


def last_query_sums(q_last: jax.Array, k: jax.Array, lengths: jax.Array, *, scale: float,
                    slash: bool = True, impl: str = "auto",
                    **kernel_kwargs) -> tuple[jax.Array, jax.Array | None]:
    """Vertical and slash sums of the causal softmax of each row's last R queries.

    Args:
        q_last: [B, Hq, R, D], the queries at positions lengths - R .. lengths - 1 (rows
            shorter than R: the first queries have negative positions and see nothing).
        k: [B, S, Hkv, D] keys (GQA: query head h reads KV head h // (Hq // Hkv)).
        lengths: int32 [B], valid tokens per row.
        scale: logit scale.
        slash: also compute the diagonal sums.
        impl: see the module docstring ("xla" is not accepted here: the XLA form lives with
            the estimators, which fuse it with their own reductions).

    Returns:
        (vert float32 [B, Hq, S], slash float32 [B, Hq, S] or None): vert[j] = sum_r P[r, j];
        slash[o] = sum_r P[r, pos_r - o], o = query position - key position.
    """
    impl = estimation_impl(impl)
    if impl == "reference":
        vert, sl = last_query_sums_reference(q_last, k, lengths, scale=scale)
        return vert, (sl if slash else None)
    if impl in GPU_IMPLS:
        from pallas_kernels.gpu.last_query_stats_triton import last_query_sums_triton
        return last_query_sums_triton(q_last, k, lengths, scale=scale, slash=slash,
                                      interpret=impl == "interpret", **kernel_kwargs)
    if impl in TPU_IMPLS:
        from pallas_kernels.tpu.last_query_stats_tpu import last_query_sums_tpu
        return last_query_sums_tpu(q_last, k, lengths, scale=scale, slash=slash,
                                   interpret=_tpu_interpret(impl), **kernel_kwargs)
    raise ValueError(f"last_query_sums: impl {impl!r} has no kernel on this backend; use the "
                     "XLA estimators (jaxprefill.sparse.estimators.last_q_sums)")


def pooled_block_scores(qx: jax.Array, kx: jax.Array, valid_rows: jax.Array,
                        row_start: jax.Array, *, r: int, scale: float, pool: str = "sum",
                        impl: str = "auto", **kernel_kwargs) -> jax.Array:
    """Row softmax of qx.kx^T (causal at row granularity) pooled into r x r cells, one pass.

    qx [B, nq*r, Hq, Dx] (row t has global index row_start[b] + t), kx [B, n*r, Hkv, Dx];
    valid_rows int32 [B]. Returns float32 [B, Hq, nq, n] (sum or max of each cell). Same
    semantics as ``jaxprefill.sparse.estimators.block_softmax_scores`` (the XLA reference).
    """
    impl = estimation_impl(impl)
    if impl in GPU_IMPLS:
        from pallas_kernels.gpu.pooled_scores_triton import pooled_block_scores_triton
        return pooled_block_scores_triton(qx, kx, valid_rows, row_start, r=r, scale=scale,
                                          pool=pool, interpret=impl == "interpret",
                                          **kernel_kwargs)
    if impl in TPU_IMPLS:
        from pallas_kernels.tpu.pooled_scores_tpu import pooled_block_scores_tpu
        return pooled_block_scores_tpu(qx, kx, valid_rows, row_start, r=r, scale=scale,
                                       pool=pool, interpret=_tpu_interpret(impl),
                                       **kernel_kwargs)
    raise ValueError(f"pooled_block_scores: impl {impl!r} has no kernel here; use the XLA "
                     "estimator (jaxprefill.sparse.estimators.block_softmax_scores)")


def mass_cut_reference(s: jax.Array, base: jax.Array, goal: jax.Array) -> jax.Array:
    """uint32 [...]: per row of s [..., m] (entries >= 0) the smallest key U (key = the
    order-preserving uint32 of ``jaxprefill.sparse.select.sort_key``: bits + 2^31 for x >= 0)
    with ``base + sum(s[key > U]) < goal``; 0xFFFFFFFF where none. 31 passes of a row sum."""
    s = s.astype(jnp.float32)
    key = jax.lax.bitcast_convert_type(s, jnp.int32)

    def bit_step(b, ans):
        bit = 30 - b
        cand = ans | ((jnp.int32(1) << bit) - 1)
        above = jnp.sum(jnp.where(key > cand[..., None], s, 0.0), axis=-1)
        return jnp.where(base + above < goal, ans, ans | (jnp.int32(1) << bit))

    cut = jax.lax.fori_loop(0, 31, bit_step, jnp.zeros(s.shape[:-1], jnp.int32))
    return jax.lax.bitcast_convert_type(cut, jnp.uint32) | jnp.uint32(0x80000000)


def has_mass_cut_kernel(impl: str, m: int) -> bool:
    """Whether :func:`mass_cut` has a kernel for ``impl`` (resolved) and rows of m entries."""
    if impl in GPU_IMPLS:
        from pallas_kernels.gpu.mass_cut_triton import MAX_COLUMNS
    elif impl in TPU_IMPLS:
        from pallas_kernels.tpu.mass_cut_tpu import MAX_COLUMNS
    else:
        return False
    return m <= MAX_COLUMNS


def mass_cut(s: jax.Array, base: jax.Array, goal: jax.Array, *, impl: str = "auto") -> jax.Array:
    """Cut of a cumulative-mass selection per row (:func:`mass_cut_reference` semantics): the
    GPU kernel loads each row once and searches on registers, where XLA reads the whole
    matrix once per bit. s float32 [..., m] >= 0, base / goal float32 [...] -> uint32 [...]."""
    impl = estimation_impl(impl)
    if impl in GPU_IMPLS:
        from pallas_kernels.gpu.mass_cut_triton import mass_cut_triton
        return mass_cut_triton(s, base, goal, interpret=impl == "interpret")
    if impl in TPU_IMPLS:
        from pallas_kernels.tpu.mass_cut_tpu import mass_cut_tpu
        return mass_cut_tpu(s, base, goal, interpret=_tpu_interpret(impl))
    if impl == "reference":
        return mass_cut_reference(s, base, goal)
    raise ValueError(f"mass_cut: impl {impl!r} has no kernel here; use the XLA search "
                     "(jaxprefill.sparse.select.cumulative_keep)")


__all__ = ["IMPLS", "estimation_impl", "last_query_sums", "last_query_sums_reference",
           "has_mass_cut_kernel", "mass_cut", "mass_cut_reference", "pooled_block_scores"]
