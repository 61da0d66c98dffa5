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
  threshold, FlexPrefill / ProxyAttn / PBS gamma, FlexPrefill's budget count), searched on
  registers after one read (rows of up to 16384 entries) or, for wider rows, by one program per
  row re-reading it from L2, 2 bits per pass. Optionally weighted: each entry ordered by its
  value but counting its own mass (FlexPrefill's chunk rows: the uniform prefix rows).
- :func:`top_positions`: the positions of each long row's few largest entries (the key columns:
  64 of 32K keys per head), exact, by the DSA indexer's top-k (:mod:`pallas_kernels._dsa_common`:
  a k-th order key search per segment of 8192 on registers, then a tournament over the
  segments' winners).

Backends (one resolver, :func:`estimation_backend`, per op and shape; "auto" takes the first
that runs the call):

    triton       NVIDIA GPUs, within each kernel's shapes (below)
    mosaic_tpu   TPUs, same shapes; opt-in only: verified in TPU interpret mode, never timed on
                 a TPU against XLA
    xla          the caller's XLA estimators (``jaxprefill.sparse.estimators``, which fuse the
                 same reductions with their own): CPUs, TPUs, shapes the kernels do not take
    reference    the float32 references below (last_query_sums, mass_cut; small inputs only)

Kernel shapes: last_query_sums takes R >= 16 last queries, R a power of two; pooled_block_scores
square cells of r rows, r a power of two ("auto" sends cells above 64 rows to XLA); mass_cut rows
of at most ``MAX_COLUMNS`` entries (GPU: 2^20, ``mass_cut_wide_triton``; TPU: 32768), weighted
on GPUs only (TPU: XLA); top_positions any row (GPU; TPU: segments of at most 32768, the
k-th key search its kernel, the compaction XLA's). "auto" keeps top_positions on XLA's
two-level ``lax.top_k`` until the kernel is timed against it on a GPU.
A named kernel backend runs every op whose shapes it takes and the XLA path runs the others
(:func:`estimation_backend`); the kernel entry points below are strict.
``interpret=True`` runs a kernel in interpret mode on any device (tests). The TPU kernels in
interpret mode run Python callbacks that need the GIL: eager JAX ops dispatched while one is in
flight can fill the CPU client's queue and wait there holding the GIL (a deadlock seen under
pytest-xdist), so wait for a TPU-interpret result before dispatching more work.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _dsa_common, backends
from pallas_kernels.gpu import dsa_index_triton, mass_cut_triton, mass_cut_wide_triton
from pallas_kernels.gpu.last_query_stats_triton import last_query_sums_triton
from pallas_kernels.gpu.mass_cut_triton import mass_cut_triton as _mass_cut_triton
from pallas_kernels.gpu.mass_cut_wide_triton import mass_cut_wide_triton as _mass_cut_wide
from pallas_kernels.gpu.pooled_scores_triton import pooled_block_scores_triton
from pallas_kernels.tpu import dsa_index_tpu, mass_cut_tpu
from pallas_kernels.tpu.last_query_stats_tpu import last_query_sums_tpu
from pallas_kernels.tpu.mass_cut_tpu import mass_cut_tpu as _mass_cut_tpu
from pallas_kernels.tpu.pooled_scores_tpu import pooled_block_scores_tpu

OPS = ("last_query_sums", "pooled_block_scores", "mass_cut", "top_positions")


@dataclasses.dataclass(frozen=True)
class EstimationCall:
    """What the estimation backends look at: the op and the sizes its kernels depend on
    (rows: R last queries, or the rows of a mass cut or top_positions; cell: r rows per pooled
    cell, square; columns: m per row; weighted: a mass cut with a weight per entry)."""

    op: str
    rows: int | None = None
    cell: int | None = None
    columns: int | None = None
    weighted: bool = False


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _kernel_shapes(max_columns: int, weights: bool = True):
    def refusal(call: EstimationCall) -> str | None:
        if call.op == "mass_cut" and call.weighted and not weights:
            return "its mass cut takes no weights (weighted cuts run on XLA)"
        if call.op == "last_query_sums" and not (call.rows >= 16 and _pow2(call.rows)):
            return f"its tile takes R >= 16 last queries, a power of two (got {call.rows})"
        if call.op == "pooled_block_scores" and not (call.cell and _pow2(call.cell)):
            return f"it takes square cells, r a power of two (got {call.cell})"
        if call.op == "mass_cut" and call.columns > max_columns:
            return f"rows of {call.columns} entries exceed its {max_columns}"
        return None
    return refusal


# The wide mass-cut kernel runs one program per row, so a call is as slow as its longest row.
# Measured on an H100 (scripts/benchmarks/bench_threshold_search_gpu.py, 2026-12-08) against
# XLA's radix passes: 18 rows of 32768 (FlexPrefill's budgets at 32K) 0.096 ms vs 0.161; 9 rows
# of 65536 (its query-aware rows at 32K) 0.132 vs 0.103; weighted, 32 rows of 132096 (its chunk
# rows at 128K) 0.636 vs 0.521. "auto" sends it rows of at most this many entries.
WIDE_CUT_AUTO_COLUMNS = 32768
# It also re-reads its rows once per pass and counts on L2 to serve them; past this many bytes
# of rows per call (about 80% of an H100's 50 MB L2) the passes would stream from HBM.
WIDE_CUT_L2_BYTES = 40 << 20


def _large_cells(call: EstimationCall) -> str | None:
    # One tile holds whole cells: cells above 64 rows leave a tile one or two cells wide, and the
    # XLA estimator has been the path for them since the kernel was introduced.
    if call.op == "pooled_block_scores" and call.cell and call.cell > 64:
        return f"cells of {call.cell} rows (> 64) are estimated by XLA"
    return None


def _gpu_preferences(call: EstimationCall) -> str | None:
    if call.op == "top_positions":
        return "not yet timed against XLA's two-level lax.top_k on a GPU (opt-in)"
    if call.op == "mass_cut" and call.columns > WIDE_CUT_AUTO_COLUMNS:
        return (f"rows of {call.columns} entries (> {WIDE_CUT_AUTO_COLUMNS}): XLA's passes beat "
                f"one program per row there (H100)")
    if call.op == "mass_cut" and call.rows and call.columns > mass_cut_triton.MAX_COLUMNS:
        entry = 8 if call.weighted else 4  # bytes re-read per entry and pass: s (and weight)
        size = call.rows * call.columns * entry
        if size > WIDE_CUT_L2_BYTES:
            what = "weighted entries" if call.weighted else "entries"
            return (f"{call.rows} rows of {call.columns} {what} ({size / 2**20:.1f} MiB) exceed"
                    f" the {WIDE_CUT_L2_BYTES >> 20} MiB the wide kernel keeps in L2")
    return _large_cells(call)


def _reference_refusal(call: EstimationCall) -> str | None:
    if call.op == "pooled_block_scores":
        return "no reference of its own: the XLA estimator is the reference"
    return None


BACKENDS = (
    backends.Backend("triton", ("gpu",), _kernel_shapes(mass_cut_wide_triton.MAX_COLUMNS),
                     prefer_not=_gpu_preferences),
    backends.Backend("mosaic_tpu", ("tpu",),
                     _kernel_shapes(mass_cut_tpu.MAX_COLUMNS, weights=False),
                     prefer_not=_large_cells, auto=False, auto_note="opt-in: verified in TPU interpret mode only"),
    backends.Backend("xla"),
    backends.Backend("reference", (), _reference_refusal, auto=False,
                     auto_note="tests only (float32, materializes the scores)"),
)
IMPLS = ("auto",) + tuple(b.name for b in BACKENDS)


def estimation_backend(op: str, *, impl: str = "auto", interpret: bool = False,
                       rows: int | None = None, cell: int | None = None,
                       columns: int | None = None, weighted: bool = False,
                       strict: bool = False) -> str:
    """The implementation of estimation op ``op`` for these sizes (see module). "xla" means
    the caller's XLA path (``jaxprefill.sparse.estimators``). ``weighted``: a mass cut with a
    weight per entry (:func:`mass_cut`), which the TPU kernel does not take.

    A named kernel backend runs on its device (or in interpret mode) or raises; an op whose
    shapes its kernel does not take runs on "xla" instead (logged at debug level): a policy's
    estimation is several ops, and one shape outside a kernel must not stop the others. With
    ``strict`` that op raises too.
    """
    if op not in OPS:
        raise ValueError(f"unknown estimation op {op!r}; one of {OPS}")
    call = EstimationCall(op, rows, cell, columns, weighted)
    named = {b.name: b for b in BACKENDS}.get(impl)
    if named is not None and named.name != "xla" and not strict:
        on_device = interpret or not named.platforms or backends.platform() in named.platforms
        if on_device and named.why_not(call) is not None:
            backends.log.debug("%s: %s does not take %s; xla runs it", op, named.name, call)
            return "xla"
    return backends.resolve(op, BACKENDS, impl, call, interpret=interpret)


def _tpu_interpret(interpret: bool) -> Any:
    """The ``interpret`` argument of the TPU kernels."""
    return pltpu.InterpretParams() if interpret else False


def _kernel_impl(op: str, impl: str, interpret: bool, **sizes: int | bool) -> str:
    """The kernel that runs ``op`` here (entry points below run kernels, not the XLA path)."""
    name = estimation_backend(op, impl=impl, interpret=interpret, strict=True, **sizes)
    if name == "xla":
        raise ValueError(f"{op}: impl {impl!r} resolves to the XLA estimators, which live with "
                         "their callers (jaxprefill.sparse.estimators)")
    return name


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
                    slash: bool = True, impl: str = "auto", interpret: bool = False,
                    **kernel_kwargs) -> tuple[jax.Array, jax.Array | None]:
    """Vertical and slash sums of the causal softmax of each row's last R queries.

    Args:
        q_last: [B, Hq, R, D], the queries at positions lengths - R .. lengths - 1 (rows
            shorter than R: the first queries have negative positions and see nothing).
        k: [B, S, Hkv, D] keys (GQA: query head h reads KV head h // (Hq // Hkv)).
        lengths: int32 [B], valid tokens per row.
        scale: logit scale.
        slash: also compute the diagonal sums.
        impl, interpret: see the module docstring ("xla" is not run here: the XLA form lives
            with the estimators, which fuse it with their own reductions).

    Returns:
        (vert float32 [B, Hq, S], slash float32 [B, Hq, S] or None): vert[j] = sum_r P[r, j];
        slash[o] = sum_r P[r, pos_r - o], o = query position - key position.
    """
    name = _kernel_impl("last_query_sums", impl, interpret, rows=q_last.shape[2])
    if name == "reference":
        vert, sl = last_query_sums_reference(q_last, k, lengths, scale=scale)
        return vert, (sl if slash else None)
    if name == "triton":
        return last_query_sums_triton(q_last, k, lengths, scale=scale, slash=slash,
                                      interpret=interpret, **kernel_kwargs)
    return last_query_sums_tpu(q_last, k, lengths, scale=scale, slash=slash,
                               interpret=_tpu_interpret(interpret), **kernel_kwargs)


def pooled_block_scores(qx: jax.Array, kx: jax.Array, valid_rows: jax.Array,
                        row_start: jax.Array, *, r: int, scale: float, pool: str = "sum",
                        impl: str = "auto", interpret: bool = False,
                        **kernel_kwargs) -> jax.Array:
    """Row softmax of qx.kx^T (causal at row granularity) pooled into r x r cells, one pass.

    qx [B, nq*r, Hq, Dx] (row t has global index row_start[b] + t), kx [B, n*r, Hkv, Dx];
    valid_rows int32 [B]. Returns float32 [B, Hq, nq, n] (sum or max of each cell). Same
    semantics as ``jaxprefill.sparse.estimators.block_softmax_scores`` (the XLA reference).
    """
    name = _kernel_impl("pooled_block_scores", impl, interpret, cell=r)
    if name == "triton":
        return pooled_block_scores_triton(qx, kx, valid_rows, row_start, r=r, scale=scale,
                                          pool=pool, interpret=interpret, **kernel_kwargs)
    return pooled_block_scores_tpu(qx, kx, valid_rows, row_start, r=r, scale=scale, pool=pool,
                                   interpret=_tpu_interpret(interpret), **kernel_kwargs)


def mass_cut_reference(s: jax.Array, base: jax.Array, goal: jax.Array,
                       weight: jax.Array | None = None) -> jax.Array:
    """uint32 [...]: per row of s [..., m] (entries >= 0) the smallest key U (key = the
    order-preserving uint32 of ``jaxprefill.sparse.select.sort_key``: bits + 2^31 for x >= 0)
    with ``base + sum(weight[key(s) > U]) < goal``; 0xFFFFFFFF where none. weight float32
    [..., m] >= 0 is the mass of each entry (None: the entry itself). 31 passes of a row sum."""
    s = s.astype(jnp.float32)
    key = jax.lax.bitcast_convert_type(s, jnp.int32)
    mass = s if weight is None else weight.astype(jnp.float32)

    def bit_step(b, ans):
        bit = 30 - b
        cand = ans | ((jnp.int32(1) << bit) - 1)
        above = jnp.sum(jnp.where(key > cand[..., None], mass, 0.0), axis=-1)
        return jnp.where(base + above < goal, ans, ans | (jnp.int32(1) << bit))

    cut = jax.lax.fori_loop(0, 31, bit_step, jnp.zeros(s.shape[:-1], jnp.int32))
    return jax.lax.bitcast_convert_type(cut, jnp.uint32) | jnp.uint32(0x80000000)


def mass_cut(s: jax.Array, base: jax.Array, goal: jax.Array, weight: jax.Array | None = None,
             *, impl: str = "auto", interpret: bool = False) -> jax.Array:
    """Cut of a cumulative-mass selection per row (:func:`mass_cut_reference` semantics): the
    GPU kernel loads rows of up to 16384 entries once and searches on registers; wider rows
    (up to 2^20) stay in L2 and one program per row searches 2 bits per pass over them, where
    XLA reads the whole matrix once per 4-bit pass. s float32 [..., m] >= 0 (the order), base /
    goal float32 [...], weight float32 [..., m] >= 0 (the mass of each entry; None: s itself;
    GPU kernels and the reference only) -> uint32 [...]."""
    m = s.shape[-1]
    name = _kernel_impl("mass_cut", impl, interpret, columns=m, weighted=weight is not None)
    if name == "reference":
        return mass_cut_reference(s, base, goal, weight)
    if name == "triton":
        if m <= mass_cut_triton.MAX_COLUMNS:  # the faster kernel where the rows fit registers
            return _mass_cut_triton(s, base, goal, weight, interpret=interpret)
        return _mass_cut_wide(s, base, goal, weight, interpret=interpret)
    return _mass_cut_tpu(s, base, goal, interpret=_tpu_interpret(interpret))


def top_positions_reference(scores: jax.Array, valid: jax.Array, count: int) -> jax.Array:
    """int32 [..., c], c = min(count, m): positions of the c largest valid entries of each row
    of scores [..., m] (ties: the lower position; -0.0 == 0.0), ascending, -1 after the last
    (rows with fewer valid entries). By one stable sort of the whole row."""
    m = scores.shape[-1]
    c = max(1, min(count, m))
    key = _dsa_common.order_key(scores, jnp.broadcast_to(valid, scores.shape))
    # descending order key, then ascending position: the complement of the unsigned image
    down = ~jax.lax.bitcast_convert_type(key ^ _dsa_common.INVALID, jnp.uint32)
    pos = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), scores.shape)
    down, pos = jax.lax.sort((down, pos), dimension=-1, num_keys=2)
    taken = down[..., :c] != jnp.uint32(0xFFFFFFFF)  # INVALID's image is 0, its complement ~0
    pos = jnp.sort(jnp.where(taken, pos[..., :c], m), axis=-1)
    return jnp.where(pos < m, pos, -1).astype(jnp.int32)


def top_positions(scores: jax.Array, valid: jax.Array, count: int, *, impl: str = "auto",
                  interpret: bool = False) -> jax.Array:
    """:func:`top_positions_reference`'s result on a kernel: the scores become the DSA
    indexer's int32 order keys (``INVALID`` where not ``valid``), and its exact top-k
    (segments of a row searched on registers, then a tournament over their winners) returns
    each row's selection in position order. scores float32 [..., m], valid bool broadcastable
    to it -> int32 [..., min(count, m)]."""
    lead, m = scores.shape[:-1], scores.shape[-1]
    c = max(1, min(count, m))
    name = _kernel_impl("top_positions", impl, interpret, rows=math.prod(lead), columns=m)
    if name == "reference":
        return top_positions_reference(scores, valid, count)
    key = _dsa_common.order_key(scores, jnp.broadcast_to(valid, scores.shape)).reshape(-1, m)
    if name == "triton":
        seg_topk = functools.partial(dsa_index_triton.segment_topk_triton, interpret=interpret)
        width = dsa_index_triton.MAX_COLUMNS
    else:
        seg_topk = _dsa_common.kth_select(functools.partial(
            dsa_index_tpu.kth_key_tpu, interpret=_tpu_interpret(interpret)))
        width = dsa_index_tpu.MAX_COLUMNS
    return _dsa_common.topk_keys(key, c, seg_topk, width).reshape(*lead, c)


__all__ = ["BACKENDS", "IMPLS", "EstimationCall", "estimation_backend", "last_query_sums",
           "last_query_sums_reference", "mass_cut", "mass_cut_reference", "pooled_block_scores",
           "top_positions", "top_positions_reference"]
