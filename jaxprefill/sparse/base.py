"""Shared substrate of every sparse prefill policy: block geometry, forced blocks, layout output.

A policy turns one layer's (q [B, S, Hq, D], k [B, S, Hkv, D]) into a
:class:`pallas_kernels.BlockSparseLayout`. Subclasses only implement :meth:`Policy.select`,
returning a bool block mask [B, Hq, nq, nk] (or [B, Hkv, nq, nk]); :meth:`Policy.build` then
applies the rules every policy shares, so no policy can forget them:

* the sink block (key block 0) and the diagonal block are always listed (the diagonal holds
  each query's own key, the sink holds the attention sinks every head uses);
* the query blocks holding a row's last ``n_last`` queries list every causal block (a dense
  tail, as TriangleMix's: the last token's output gives the first generated token, so it
  sees the whole prompt at every layer; a needle the estimate ranks low in the question's
  block-pooled scores is still read where the answer is made). In chunked prefill the tail is
  each chunk's last queries (a chunk does not know whether it ends the prompt);
* only causal blocks are listed (key block <= query block);
* batch rows have their own lengths (``lengths [B]``, right padding): the estimators read only a
  row's valid tokens, so a row gets the same layout in any batch; query blocks that lie wholly in
  the padding list just their diagonal (their outputs are discarded, so make them cheap);
* rows shorter than ``min_length`` get the dense causal layout (sparse prefill loses to dense
  below a few thousand tokens: estimation costs more than it saves);
* ``heads="kv"`` ORs the masks of the query heads of each GQA group into one list per KV head
  (CompactAttention's intra-group union: the GPU kernel then reads each K/V block once for the
  whole group);
* ``max_nnz`` caps the static list length (memory of the layout); when a row lists more blocks,
  the forced blocks are kept first, then the blocks nearest the diagonal.

**Row-restricted layouts** (:meth:`Policy.build_rows`, chunked prefill): the geometry then holds
a window of ``nr`` query-block rows ``[row0[b], row0[b] + nr)`` (``Geometry.row0``); ``select``
returns [B, H, nr, n] and ``finish`` applies the same rules to those rows only, so a chunk pays
for its own rows instead of the whole prefix's [n, n] block matrix. Queries before the window
count as zero queries (the prefix queries of a chunk are not cached; the whole-prefix path put
zeros there too), and the window must reach each row's last valid query.

**The interface** (what the attention entry point calls; defaults here, so a policy overrides
only what it changes):

* :meth:`Policy.build` (whole prompt) / :meth:`Policy.build_rows` (a window of rows) -> layout;
* :meth:`Policy.kernel_options` -> extra kernel arguments for its layouts (BLASST's threshold);
* :meth:`Policy.attend` -> the attention output of one classified call
  (:class:`jaxprefill.sparse.prefill.Prefill`): by default, build the layout of the call's
  kind and run the block-sparse kernel; policies that reorder keys (PBS) override it;
* ``kinds``: the call kinds the policy takes (others stay dense).

**Estimation** (:class:`Estimation`, a field of every policy, so part of the jit key): which
implementation runs the estimation kernels (``pallas_kernels.estimation``), in interpret mode
or not, and whether selections use the threshold searches of :mod:`jaxprefill.sparse.select`
or the sort-based references of :mod:`jaxprefill.sparse.estimators` (A/B measurement).

Everything is jit-able: shapes depend only on static sizes and the policy's static parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from pallas_kernels import BlockSparseLayout, block_sparse_attention
from pallas_kernels.layout import block_mask_to_layout_arrays

from jaxprefill.sparse import select
from jaxprefill.sparse.columns import attach_columns, top_columns
from jaxprefill.sparse.estimation import Estimation
from jaxprefill.sparse.geometry import Geometry, make_geometry, make_row_geometry  # noqa: F401
from jaxprefill.sparse.prefill import KINDS, Prefill, layout_for
from jaxprefill.sparse.recall_guard import guard_heads


@dataclasses.dataclass(frozen=True)
class Policy:
    """Base of all policies. Frozen and hashable: policies live in the model's static graph.

    Common parameters:
      block_size: tokens per query and key block (the kernel's block_q = block_k).
      heads: "q" one list per query head (the papers), "kv" one per KV head (group union).
      max_nnz: static cap on blocks per list; None = no cap (n blocks).
      estimation: how the estimation runs (:class:`Estimation`; a name or a dict in configs).
      n_last: the query blocks holding each row's last n_last queries are dense (module
        docstring; a ``max_nnz`` cap applies to them like to any row); 0 gives the method's
        own layout. 0 here and for streaming; 128 for trianglemix (its paper) and the estimator
        policies (minference, flexprefill, xattention, proxyattn, pbs: the row that makes the
        first answer token then reads the whole prompt at every layer).
      key_columns: number of single keys each query head adds to every query block of a row
        (the layout's column path, token level): the keys with the most attention from the
        row's last 64 queries (:mod:`jaxprefill.sparse.columns`). 0 (default) adds none. For
        layers where a few keys hold most of the attention and block-pooled estimates miss
        them. Not for policies with their own layout step (``takes_key_columns`` False:
        MInference's vertical lines are the same thing, PBS permutes keys).
      share_layers: consecutive layers that share one layout (default 1: every layer builds
        its own). With k > 1 the layers i of a group (equal i // k, this policy's layers
        only) run the layout the group's first layer built from its own q and k, so only
        that layer pays for estimation (:meth:`SparseConfig.layout_source`); query head h of a
        later layer reads the blocks head h of the first one chose. Inside one model forward
        only (``jaxprefill.attention.LayoutShare``); off by default, as no evaluation has
        shown it keeps accuracy.
    """

    name: ClassVar[str] = "base"
    # True when select (and layout) handle a row window exactly (build_rows == rows of build);
    # a policy that leaves it False is built over the whole prefix by chunked prefill.
    rows_exact: ClassVar[bool] = False
    # The call kinds (jaxprefill.sparse.prefill.KINDS) the policy takes; others stay dense.
    kinds: ClassVar[tuple[str, ...]] = KINDS
    # False for policies whose own layout step ignores key_columns (they refuse the parameter)
    takes_key_columns: ClassVar[bool] = True
    block_size: int = 128
    heads: str = "q"
    max_nnz: int | None = None
    estimation: Estimation = Estimation()
    # Recall guard (jaxprefill.sparse.recall_guard): heads whose exact attention recall on
    # recall_probes query-block rows is below recall_target get their dense causal rows.
    recall_target: float | None = None
    recall_probes: int = 2
    n_last: int = 0
    key_columns: int = 0
    share_layers: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "estimation", Estimation.parse(self.estimation))
        if not isinstance(self.share_layers, int) or self.share_layers < 1:
            raise ValueError(f"{self.name}: share_layers must be an integer >= 1 (layers), got "
                             f"{self.share_layers!r}")
        if not isinstance(self.key_columns, int) or self.key_columns < 0:
            raise ValueError(f"{self.name}: key_columns must be an integer >= 0 (keys), got "
                             f"{self.key_columns!r}")
        if self.key_columns and not self.takes_key_columns:
            raise ValueError(f"{self.name}: key_columns is not a parameter of this policy")
        if not isinstance(self.n_last, int) or self.n_last < 0:
            raise ValueError(f"{self.name}: n_last must be an integer >= 0 (queries), got "
                             f"{self.n_last!r}")
        if self.recall_target is not None:
            if not 0 < self.recall_target <= 1:
                raise ValueError(f"{self.name}: recall_target must be in (0, 1], got "
                                 f"{self.recall_target}")
            if self.recall_probes < 1:
                raise ValueError(f"{self.name}: recall_probes must be >= 1, got "
                                 f"{self.recall_probes}")
            if self.max_nnz is not None:
                raise ValueError(f"{self.name}: recall_target needs max_nnz unset (a capped "
                                 f"list cannot hold a dense head's rows)")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"{self.name}: block_size must be a power of two >= 16, "
                             f"got {self.block_size}")
        if self.heads not in ("q", "kv"):
            raise ValueError(f"{self.name}: heads must be 'q' or 'kv', got {self.heads!r}")
        if self.max_nnz is not None and self.max_nnz < 2:
            raise ValueError(f"{self.name}: max_nnz must be >= 2 (sink + diagonal)")

    # ------------------------------------------------------------------------------ interface
    def select(self, q: jax.Array, k: jax.Array, geo: Geometry, layer: int) -> jax.Array:
        """bool [B, Hq or Hkv, nq, n]: blocks the method picks (forced/causal rules added later).

        nq = geo.nq: n, or the window's nr rows when ``geo.row0`` is set (then q holds the
        window's queries, [B, nr * block, Hq, D]: see :meth:`build_rows`).
        """
        raise NotImplementedError

    def build(self, q: jax.Array, k: jax.Array, *, layer: int = 0,
              lengths: jax.Array | None = None, min_length: int = 0) -> BlockSparseLayout:
        """Layout for one layer's prefill.

        Args:
          q: [B, S, Hq, D]; k: [B, S, Hkv, D] (post-RoPE, the tensors attention will use).
          layer: layer index (for per-layer / per-head configurations).
          lengths: int32 [B] valid tokens per row (right padding); default all S.
          min_length: rows shorter than this get the dense causal layout.
        Returns:
          BlockSparseLayout [B, Hq or Hkv, n, max_nnz] with block_q = block_k = block_size.
        """
        geo = make_geometry(q, k, self.block_size, lengths, self.estimation)
        return self.layout(q, k, geo, layer, min_length)

    def build_rows(self, q_rows: jax.Array, k: jax.Array, *, row0: jax.Array, layer: int = 0,
                   lengths: jax.Array | None = None, min_length: int = 0) -> BlockSparseLayout:
        """Rows [row0, row0 + nr) of :meth:`build`'s layout, estimated from those rows only.

        Equals ``build(q_full, k, ...)`` restricted to the window, where q_full holds q_rows at
        positions [row0 * block, ...) and zeros elsewhere (chunked prefill: the prefix queries
        are not cached), provided the window reaches each row's last valid query
        (``lengths <= (row0 + nr) * block``). Only for policies with ``rows_exact``.

        Args:
          q_rows: [B, Sr, Hq, D], query t at position row0[b] * block + t; nr = ceil(Sr / block).
          k: [B, S, Hkv, D] all keys; row0: int32 [B] first query-block row (traced allowed).
          layer, lengths, min_length: as in :meth:`build` (lengths count from position 0).
        Returns:
          BlockSparseLayout [B, H, nr, max_nnz]; rows past n - 1 are empty.
        """
        if not self.rows_exact:
            raise NotImplementedError(f"{self.name}: no row-restricted layout")
        nr = -(-q_rows.shape[1] // self.block_size)
        q_rows = jnp.pad(q_rows, ((0, 0), (0, nr * self.block_size - q_rows.shape[1]),
                                  (0, 0), (0, 0)))
        geo = make_row_geometry(q_rows, k, self.block_size, row0, lengths, self.estimation)
        return self.layout(q_rows, k, geo, layer, min_length)

    def layout(self, q: jax.Array, k: jax.Array, geo: Geometry, layer: int,
               min_length: int) -> BlockSparseLayout:
        """select + finish over geo's rows, plus the key columns (policies with extra layout
        parts override this)."""
        layout = self.finish(self.select(q, k, geo, layer), geo, min_length, q, k)
        if self.key_columns:
            layout = attach_columns(layout, top_columns(q, k, geo, self.key_columns), geo)
        return layout

    @property
    def has_columns(self) -> bool:
        """Whether this policy's layouts carry key columns (measured at token level)."""
        return self.key_columns > 0

    def block_mask(self, q: jax.Array, k: jax.Array, *, layer: int = 0,
                   lengths: jax.Array | None = None, min_length: int = 0) -> jax.Array:
        """bool [B, H, n, n] of :meth:`build` (tests, measurement)."""
        return self.build(q, k, layer=layer, lengths=lengths, min_length=min_length).to_block_mask()

    def layer_key(self, layer: int) -> int:
        """A layer whose layout computation equals ``layer``'s (callers that jit one layout per
        layer compile once per key). Layer-independent policies return 0."""
        return 0

    def kernel_options(self, seq_len: int) -> dict[str, Any]:
        """Extra ``block_sparse_attention`` arguments for a prefill of ``seq_len`` keys."""
        return {}

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, call: Prefill,
               layout: BlockSparseLayout | None = None) -> jax.Array:
        """Causal attention [B, Sq, Hq, Dv] over this policy's layout for ``call``.

        q [B, Sq, Hq, D], k [B, Sk, Hkv, D], v [B, Sk, Hkv, Dv]; ``call.kind`` in ``kinds``.
        ``layout``: one an earlier layer built for the same call (``share_layers``); None
        builds this call's.
        """
        if layout is None:
            layout = layout_for(self, q, k, call)
        return block_sparse_attention(q, k, v, layout, causal=True, sm_scale=call.sm_scale,
                                      q_offset=call.q_offset, segment_ids=call.segment_ids,
                                      impl=call.kernel, config=call.kernel_config,
                                      **self.kernel_options(k.shape[1]))

    # ------------------------------------------------------------------------------- shared
    def finish(self, mask: jax.Array, geo: Geometry, min_length: int,
               q: jax.Array | None = None, k: jax.Array | None = None) -> BlockSparseLayout:
        """Applies the shared rules (module docstring) to mask [B, H, nq, n] and converts it to
        a layout [B, H', nq, cap]. Every rule is row-local, so a row window gets its rows,
        except the recall guard (``recall_target``, needs q and k), which decides per head
        from probe rows of the window."""
        causal, forced = geo.causal(), geo.forced()
        mask = (mask | forced | geo.tail_rows(self.n_last)[:, None, :, None]) & causal
        if self.recall_target is not None:
            if q is None or k is None:
                raise ValueError(f"{self.name}: the recall guard needs q and k in finish()")
            mask = guard_heads(mask, causal, q, k, geo, self.recall_target, self.recall_probes)
        if min_length > 0:
            short = (geo.lengths < min_length)[:, None, None, None]
            mask = jnp.where(short, causal, mask)
        if self.heads == "kv" and mask.shape[1] == geo.Hq:
            mask = mask.reshape(geo.B, geo.Hkv, geo.G, geo.nq, geo.n).any(axis=2)
        # Query blocks in the padding: diagonal only (kernels need a non-empty, cheap row).
        pad_rows = geo.query_rows()[:, None, :, None] >= geo.row_blocks()[:, None, None, None]
        mask = jnp.where(pad_rows, geo.diagonal(), mask)
        cap = geo.n if self.max_nnz is None else min(self.max_nnz, geo.n)
        if cap < geo.n:
            mask = cap_blocks(mask, forced, cap)
        if geo.estimation.sort:
            kv_idx, kv_cnt = block_mask_to_layout_arrays(mask, cap)
        else:  # same arrays: prefix count + scatter instead of a sort of every row
            kv_idx, kv_cnt = select.mask_to_lists(mask, cap)
        return BlockSparseLayout(kv_idx, kv_cnt, geo.block, geo.block, geo.n)


def cap_blocks(mask: jax.Array, forced: jax.Array, cap: int) -> jax.Array:
    """Keeps at most ``cap`` blocks per row: forced first, then the nearest to the diagonal."""
    n = mask.shape[-1]
    j = jnp.arange(n, dtype=jnp.int32)
    prio = jnp.where(mask, n + j, 0) + jnp.where(forced & mask, 4 * n, 0)
    _, top = jax.lax.top_k(prio, cap)
    keep = jnp.zeros_like(mask).at[..., 0].set(False)
    keep = jax.vmap(lambda m, t: m.at[t].set(True), in_axes=(0, 0))(
        keep.reshape(-1, n), top.reshape(-1, cap)).reshape(mask.shape)
    return keep & mask


def static_mask(mask, geo: Geometry, heads: int) -> jax.Array:
    """Broadcasts a bool [n, n] block pattern to [B, heads, nq, n] (geo's rows)."""
    rows = jnp.clip(geo.query_rows(), 0, geo.n - 1)  # rows past n - 1 are padding (finish)
    m = jnp.asarray(mask)[rows]  # [1 or B, nq, n]
    return jnp.broadcast_to(m[:, None], (geo.B, heads, geo.nq, geo.n))


__all__ = ["Estimation", "Geometry", "Policy", "make_geometry", "make_row_geometry", "cap_blocks",
           "static_mask"]
