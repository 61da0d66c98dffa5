"""Layouts of a policy for the three shapes of a prefill call, and the call's description.

`jaxprefill.attention.sparse` classifies each attention call once into a :class:`Prefill`;
:meth:`jaxprefill.sparse.Policy.attend` then builds the layout for its kind:

* ``"prompt"``: a whole causal prompt (queries == keys, right padding): ``policy.build``.
* ``"chunk"`` (chunked prefill, CompactAttention idea): the queries of one chunk sit at key
  indices ``q_offset[b] + i`` and attend to the cached prefix plus the chunk (keys ``[B, Sk]``,
  the whole cache view). The policy builds its layout for the sequence truncated at the chunk's
  end: the chunk's queries are placed at their positions of a ``[B, Sk]`` query tensor (the
  prefix's queries are not cached, so those rows are zeros) with ``lengths = q_offset + valid
  queries``. The chunk's query block i then takes the union of the global query-block rows it
  overlaps (one row when the chunk starts on a block boundary, as in the engine; two
  otherwise), per layout head. Static policies (streaming) therefore give the chunk exactly the
  rows of the whole-prompt layout; row-local estimators (xattention) too; last-query estimators
  (minference, flexprefill) estimate from the chunk's last queries. Policies with
  ``rows_exact`` compute only those rows (``Policy.build_rows``: an [nq + 1, n] estimate
  instead of [n, n]) with the same result; the others build the whole truncated prompt.
* ``"packed"`` (prepacked rows): a row holding a single document that starts at token 0 (right
  padding, segment id 0) gets the policy's layout for that document (``lengths`` = its
  length); a row holding several documents (short prompts packed together) stays dense: the
  structured layout of its segments.

Rows shorter than ``min_length`` get the dense causal layout (the policy's own rule). Layout
column lists (``col_idx``/``col_cnt``, when a policy emits them) are kept for aligned chunk
rows; a union of two rows drops that row's columns to the blocks holding them (a superset).

Functions here take the policy as an argument (anything with ``build``, ``build_rows``,
``block_size`` and ``rows_exact``), so this module needs nothing from ``base``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import BlockSparseLayout
from pallas_kernels.layout import block_mask_to_layout_arrays, structured_layout

KINDS = ("prompt", "chunk", "packed")


@dataclasses.dataclass(frozen=True)
class Prefill:
    """One attention call of a prefill, as the sparse entry point classified it.

    kind: "prompt" | "chunk" | "packed" (module docstring).
    layer: the calling layer's index.
    sm_scale: logit scale.
    min_length: rows (prompt, truncated chunk view, packed document) shorter than this are dense.
    kernel: the block-sparse implementation ("auto" or a backend name of
      ``pallas_kernels.block_sparse_attention``).
    kernel_config: that kernel's tuning knobs (``BlockSparseMosaicConfig`` with kernel
      "mosaic_gpu"), or None for its defaults.
    lengths: int32 [B]; prompt: valid tokens per right-padded row; chunk: valid queries of each
      row's chunk; packed: unused.
    q_offset: int32 [B], chunk only: key index of each row's first query.
    segment_ids: int32 [B, S], packed only (0 = padding).
    """

    kind: str
    layer: int
    sm_scale: float
    min_length: int = 0
    kernel: str = "auto"
    kernel_config: Any = None
    lengths: Any = None
    q_offset: Any = None
    segment_ids: Any = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"prefill kind must be one of {KINDS}, got {self.kind!r}")


def layout_for(policy: Any, q: jax.Array, k: jax.Array, call: Prefill) -> BlockSparseLayout:
    """The policy's layout for ``call``: q [B, Sq, Hq, D], k [B, Sk, Hkv, D]."""
    if call.kind == "prompt":
        return prompt_layout(policy, q, k, call.lengths, call.min_length, call.layer)
    if call.kind == "chunk":
        return chunk_layout(policy, q, k, call.q_offset, call.lengths, call.min_length,
                            call.layer)
    return packed_layout(policy, q, k, call.segment_ids, call.min_length, call.layer)


# ---------------------------------------------------------------------------- chunked prefill

def chunk_layout(policy, q: jax.Array, k: jax.Array, q_offset: jax.Array,
                 q_lengths: jax.Array | None, min_length: int, layer: int = 0
                 ) -> BlockSparseLayout:
    """Layout [B, H, ceil(Sq / block), nnz] of a chunk's queries against the whole cache view.

    Args:
      q: [B, Sq, Hq, D] the chunk's queries, query i at key index q_offset[b] + i.
      k: [B, Sk, Hkv, D] the cache view (prefix + chunk; entries past the chunk are ignored).
      q_offset: int32 [B]; q_offset + Sq <= Sk.
      q_lengths: int32 [B] valid (non-padding) queries per row, default Sq.
      min_length: rows whose prefix + chunk is shorter get the dense causal layout.

    Policies with a row path (``policy.rows_exact``) estimate only the query-block rows the chunk
    touches (:func:`chunk_rows_layout`); the others build the whole truncated prompt's layout
    and keep the chunk's rows (:func:`whole_prefix_layout`). Both give the same layout.

    Keys past the chunk's end are never listed, so the estimation only needs the view's first
    ``max(ends)`` keys: with ``policy.estimation.extent == "bucket"`` it runs on the first of
    :func:`key_extents` that holds them (:func:`by_extent`), so an early chunk of a long view
    estimates over its own prefix, not the whole view.
    """
    build = chunk_rows_layout if getattr(policy, "rows_exact", False) else whole_prefix_layout
    b, sq = q.shape[:2]
    sk = k.shape[1]
    extents = key_extents(max(sq, sk // 8), sk, policy.block_size) if bucketed(policy) else (sk,)
    if len(extents) == 1:
        return build(policy, q, k, q_offset, q_lengths, min_length, layer)
    if q_lengths is None:
        q_lengths = jnp.full((b,), sq, jnp.int32)
    q_lengths = jnp.asarray(q_lengths, jnp.int32)
    if build is chunk_rows_layout:  # windows may reach past the extent: those rows are padding
        need = jnp.max(chunk_ends(q, q_offset, q_lengths))
    else:  # the whole-prefix path places all sq queries, padding ones too
        need = jnp.max(q_offset) + sq

    def build_at(e: int, q, k, o, n):
        return build(policy, q, k[:, :e], o, n, min_length, layer)

    return by_extent(build_at, extents, need, -(-sk // policy.block_size), None,
                     q, k, q_offset, q_lengths)


def prompt_layout(policy, q: jax.Array, k: jax.Array, lengths: jax.Array | None,
                  min_length: int, layer: int = 0) -> BlockSparseLayout:
    """Layout [B, H, n, nnz] of a whole causal prompt: ``policy.build``.

    Rows are right-padded to S; with ``policy.estimation.extent == "bucket"`` the layout is
    built over the first of :func:`key_extents` (from S / 8) that holds the longest row
    (:func:`by_extent`), and the query blocks past it get the diagonal-only rows that padding
    blocks get anyway: a prompt in a wider row estimates over its own length.
    """
    s = q.shape[1]
    extents = key_extents(s // 8, s, policy.block_size) if bucketed(policy) else (s,)
    if lengths is None or len(extents) == 1:
        return policy.build(q, k, layer=layer, lengths=lengths, min_length=min_length)
    lengths = jnp.asarray(lengths, jnp.int32)

    def build_at(e: int, q, k, n):
        return policy.build(q[:, :e], k[:, :e], layer=layer, lengths=jnp.minimum(n, e),
                            min_length=min_length)

    n = -(-s // policy.block_size)
    return by_extent(build_at, extents, jnp.max(lengths), n, n, q, k, lengths)


# ------------------------------------------------------------------------ key extents

def bucketed(policy) -> bool:
    """Whether the policy's estimation runs over bucketed key extents (``Estimation.extent``)."""
    how = getattr(policy, "estimation", None)
    return getattr(how, "extent", "full") == "bucket"


def key_extents(lo: int, sk: int, block: int) -> tuple[int, ...]:
    """Static key extents an estimation over ``sk`` keys may run on: ``block * 2**i`` from the
    first that holds ``lo`` tokens while at most ``sk / 2`` (a smaller extent saves at least
    half the keys; calls sized to their content, as the engine's default bucket makes chunk
    views, get no extra branch), then ``sk``. At most four branches for ``lo >= sk / 8``."""
    e = block
    while e < lo:
        e *= 2
    out = []
    while 2 * e <= sk:
        out.append(e)
        e *= 2
    return (*out, sk)


def by_extent(build_at, extents: tuple[int, ...], need: jax.Array, nk: int, rows: int | None,
              *args) -> BlockSparseLayout:
    """``build_at(e, *args)`` (a layout over the first e keys) for the first extent >= need,
    picked at run time by ``lax.switch`` (only the taken branch runs; each is compiled), then
    widened to ``nk`` key blocks (and ``rows`` query blocks when set) with common list lengths."""
    shapes = [jax.eval_shape(functools.partial(build_at, e), *args) for e in extents]
    nnz = max(s.max_nnz for s in shapes)
    cols = max(s.max_cols for s in shapes)
    branches = [lambda *a, e=e: widen(build_at(e, *a), nk, nnz, cols, rows) for e in extents]
    which = jnp.searchsorted(jnp.asarray(extents[:-1], jnp.int32), need)  # first extent >= need
    return jax.lax.switch(which, branches, *args)


def pad_lists(a: jax.Array, width: int) -> jax.Array:
    """Index lists a [..., m] padded to [..., width] by repeating each list's last entry (what
    the kernels expect past a row's count; zeros for empty lists)."""
    extra = width - a.shape[-1]
    if extra == 0:
        return a
    mode = "edge" if a.shape[-1] else "constant"
    return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, extra)], mode=mode)


def widen(layout: BlockSparseLayout, nk: int, nnz: int, cols: int,
          rows: int | None = None) -> BlockSparseLayout:
    """``layout`` over the first key blocks of ``nk``, with its block lists padded to ``nnz``
    entries and its column lists to ``cols`` (repeating the last entry, as the kernels expect
    past the count); with ``rows``, query blocks appended up to ``rows``, each listing only its
    diagonal block (the rule for query blocks in the padding)."""
    kv_idx, kv_cnt = pad_lists(layout.kv_idx, nnz), layout.kv_cnt
    col_idx, col_cnt = layout.col_idx, layout.col_cnt
    if col_idx is not None:
        col_idx = pad_lists(col_idx, cols)
    extra = 0 if rows is None else rows - layout.num_q_blocks
    if extra > 0:
        b, h = kv_cnt.shape[:2]
        diag = jnp.arange(layout.num_q_blocks, rows, dtype=jnp.int32)
        kv_idx = jnp.concatenate(
            [kv_idx, jnp.broadcast_to(diag[:, None], (b, h, extra, nnz))], axis=2)
        kv_cnt = jnp.concatenate([kv_cnt, jnp.ones((b, h, extra), jnp.int32)], axis=2)
        if col_idx is not None:
            col_idx = jnp.pad(col_idx, ((0, 0), (0, 0), (0, extra), (0, 0)))
            col_cnt = jnp.pad(col_cnt, ((0, 0), (0, 0), (0, extra)))
    out = BlockSparseLayout(kv_idx, kv_cnt, layout.block_q, layout.block_k, nk)
    if col_idx is None:
        return out
    return dataclasses.replace(out, col_idx=col_idx, col_cnt=col_cnt)


def chunk_ends(q: jax.Array, q_offset: jax.Array, q_lengths: jax.Array | None) -> jax.Array:
    """int32 [B]: length of the prompt truncated at the end of each row's chunk."""
    b, sq = q.shape[:2]
    if q_lengths is None:
        q_lengths = jnp.full((b,), sq, jnp.int32)
    return q_offset + jnp.clip(jnp.asarray(q_lengths, jnp.int32), 1, sq)


def whole_prefix_layout(policy, q: jax.Array, k: jax.Array, q_offset: jax.Array,
                        q_lengths: jax.Array | None, min_length: int, layer: int = 0
                        ) -> BlockSparseLayout:
    """:func:`chunk_layout` by the policy's whole-prompt build (an [n, n] block estimate for the
    prompt truncated at the chunk's end, prefix queries zero), then the chunk's rows. The path
    of policies without ``rows_exact``, and the reference of the row path."""
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    ends = chunk_ends(q, q_offset, q_lengths)
    # Queries at their absolute positions; the prefix's queries are unknown (not cached): zeros.
    q_full = jax.vmap(lambda z, x, o: jax.lax.dynamic_update_slice_in_dim(z, x, o, axis=0))(
        jnp.zeros((b, sk, hq, d), q.dtype), q, q_offset)
    full = policy.build(q_full, k, layer=layer, lengths=ends, min_length=min_length)
    return take_rows(full, q_offset, sq)


def chunk_rows_layout(policy, q: jax.Array, k: jax.Array, q_offset: jax.Array,
                      q_lengths: jax.Array | None, min_length: int, layer: int = 0
                      ) -> BlockSparseLayout:
    """:func:`chunk_layout` from the rows the chunk touches only (``policy.build_rows``).

    The window is the nq + 1 query-block rows from q_offset // block (nq = ceil(Sq / block)):
    enough for a chunk that starts inside a block (its blocks straddle two rows each). Its
    queries are those of the whole-prefix path's query tensor (the chunk at its positions,
    zeros before), so the rows equal that path's. A chunk that starts on a block boundary for
    every batch row (the engine's case: chunk sizes are multiples of the block) takes rows
    [0, nq) as they are; otherwise each chunk block takes the union of its two rows, as
    :func:`take_rows` does. q_offset is traced, so a ``lax.cond`` picks at run time: only the
    taken branch runs, the estimation before it is shared.
    """
    b, sq, hq, d = q.shape
    blk = policy.block_size
    nq = -(-sq // blk)
    row0 = q_offset // blk
    shift = q_offset - row0 * blk  # [B] in [0, blk): where the chunk starts in its first block
    width = (nq + 1) * blk
    # Window token t sits at position row0 * blk + t: the chunk's query t - shift, else zero.
    padded = jnp.pad(q, ((0, 0), (blk, width - sq), (0, 0), (0, 0)))
    q_rows = jax.vmap(lambda x, s: jax.lax.dynamic_slice_in_dim(x, blk - s, width, axis=0))(
        padded, shift)
    ends = chunk_ends(q, q_offset, q_lengths)
    rows = policy.build_rows(q_rows, k, row0=row0, layer=layer, lengths=ends,
                             min_length=min_length)
    nnz = min(rows.num_kv_blocks, 2 * rows.max_nnz)  # take_rows' list length (a union of 2)

    def aligned(rows: BlockSparseLayout) -> BlockSparseLayout:
        out = BlockSparseLayout(pad_lists(rows.kv_idx[:, :, :nq], nnz),
                                rows.kv_cnt[:, :, :nq], blk, blk, rows.num_kv_blocks)
        if rows.col_idx is None:
            return out
        return dataclasses.replace(out, col_idx=rows.col_idx[:, :, :nq],
                                   col_cnt=rows.col_cnt[:, :, :nq])

    return jax.lax.cond(jnp.all(shift == 0), aligned, lambda r: take_rows(r, shift, sq), rows)


def take_rows(full: BlockSparseLayout, q_offset: jax.Array, sq: int) -> BlockSparseLayout:
    """Rows of the chunk's query blocks from a whole-sequence layout (block_q == block_k)."""
    blk, n = full.block_q, full.num_q_blocks
    nq = -(-sq // blk)
    first = q_offset[:, None] + jnp.arange(nq, dtype=jnp.int32)[None] * blk  # [B, nq]
    last = jnp.minimum(first + blk, q_offset[:, None] + sq) - 1
    g0 = jnp.clip(first // blk, 0, n - 1)
    g1 = jnp.clip(last // blk, 0, n - 1)
    rows = lambda a, g: jnp.take_along_axis(  # noqa: E731  a [B, H, n, ...] -> [B, H, nq, ...]
        a, g.reshape(g.shape[0], 1, nq, *([1] * (a.ndim - 3))), axis=2)
    idx0, cnt0 = rows(full.kv_idx, g0), rows(full.kv_cnt, g0)
    idx1, cnt1 = rows(full.kv_idx, g1), rows(full.kv_cnt, g1)
    same = (g0 == g1)[:, None, :]  # [B, 1, nq]
    # Union of the two rows' block lists, as a block mask over the nq chunk rows only.
    nk = full.num_kv_blocks
    t = jnp.arange(full.max_nnz)
    mask = _scatter_blocks(jnp.where(t < cnt0[..., None], idx0, nk), nk)
    mask |= _scatter_blocks(jnp.where((t < cnt1[..., None]) & ~same[..., None], idx1, nk), nk)
    extra = {}
    col_idx = getattr(full, "col_idx", None)
    if col_idx is not None:
        ci0, cc0 = rows(col_idx, g0), rows(full.col_cnt, g0)
        ci1, cc1 = rows(col_idx, g1), rows(full.col_cnt, g1)
        tc = jnp.arange(col_idx.shape[-1])
        # straddling rows: columns become the blocks that hold them
        mask |= _scatter_blocks(jnp.where((tc < cc0[..., None]) & ~same[..., None],
                                          ci0 // full.block_k, nk), nk)
        mask |= _scatter_blocks(jnp.where((tc < cc1[..., None]) & ~same[..., None],
                                          ci1 // full.block_k, nk), nk)
        extra = {"col_idx": ci0, "col_cnt": jnp.where(same, cc0, 0)}
    nnz = min(nk, 2 * full.max_nnz)
    kv_idx, kv_cnt = block_mask_to_layout_arrays(mask, nnz)
    out = BlockSparseLayout(kv_idx, kv_cnt, full.block_q, full.block_k, nk)
    return dataclasses.replace(out, **extra) if extra else out


def _scatter_blocks(idx: jax.Array, nk: int) -> jax.Array:
    """idx int32 [..., m] (nk = none) -> bool [..., nk] with those blocks set."""
    flat = idx.reshape(-1, idx.shape[-1])
    hit = jax.vmap(lambda i: jnp.zeros((nk + 1,), bool).at[i].set(True))(flat)
    return hit[:, :nk].reshape(*idx.shape[:-1], nk)


# ------------------------------------------------------------------------------- packed rows

def packed_layout(policy, q: jax.Array, k: jax.Array, seg: jax.Array, min_length: int,
                  layer: int = 0) -> BlockSparseLayout:
    """Layout [B, H, n, n] for packed rows seg int32 [B, S] (0 = padding).

    A row whose only document starts at token 0 and is contiguous gets the policy's layout of
    that document; other rows get the dense structured layout of their segments.
    """
    b, s = seg.shape
    blk = policy.block_size
    first = seg[:, :1]
    in_first = seg == first
    prefix = jnp.where(jnp.all(in_first, axis=1), s, jnp.argmin(in_first, axis=1)).astype(jnp.int32)
    single = (first[:, 0] > 0) & (jnp.sum(seg > 0, axis=1) == prefix)
    lengths = jnp.where(single, prefix, s)
    sparse = policy.build(q, k, layer=layer, lengths=lengths, min_length=min_length)
    n = sparse.num_kv_blocks
    dense = structured_layout(s, s, b, 1, block_q=blk, block_k=blk, causal=True, q_offset=None,
                              segment_ids=(seg, seg))
    idx = pad_lists(sparse.kv_idx, n)  # the policy may cap its lists
    pick = single[:, None, None]
    kv_idx = jnp.where(pick[..., None], idx, dense.kv_idx)
    kv_cnt = jnp.where(pick, sparse.kv_cnt, dense.kv_cnt)
    out = BlockSparseLayout(kv_idx, kv_cnt, blk, blk, n)
    col_idx = getattr(sparse, "col_idx", None)
    if col_idx is not None:
        out = dataclasses.replace(out, col_idx=col_idx,
                                  col_cnt=jnp.where(pick, sparse.col_cnt, 0))
    return out
