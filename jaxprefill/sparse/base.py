"""Shared substrate of every sparse prefill policy: block geometry, forced blocks, layout output.

A policy turns one layer's (q [B, S, Hq, D], k [B, S, Hkv, D]) into a
:class:`pallas_kernels.BlockSparseLayout`. Subclasses only implement :meth:`Policy.select`,
returning a bool block mask [B, Hq, nq, nk] (or [B, Hkv, nq, nk]); :meth:`Policy.build` then
applies the rules every policy shares, so no policy can forget them:

* the sink block (key block 0) and the diagonal block are always listed (the diagonal holds
  each query's own key, the sink holds the attention sinks every head uses);
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

Everything is jit-able: shapes depend only on static sizes and the policy's static parameters.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from pallas_kernels import BlockSparseLayout
from pallas_kernels.layout import block_mask_to_layout_arrays

from jaxprefill.sparse import select


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static sizes plus per-row lengths of one prefill. Blocks are square (block x block)."""

    B: int
    S: int
    Hq: int
    Hkv: int
    D: int
    block: int
    lengths: jax.Array  # int32 [B], valid tokens per row (1..S)

    @property
    def G(self) -> int:
        return self.Hq // self.Hkv

    @property
    def n(self) -> int:
        """Number of query blocks == number of key blocks."""
        return -(-self.S // self.block)

    @property
    def scale(self) -> float:
        return self.D ** -0.5

    def row_blocks(self) -> jax.Array:
        """int32 [B]: blocks holding at least one valid token of each row."""
        return (self.lengths + self.block - 1) // self.block

    def causal(self) -> jax.Array:
        """bool [B, 1, n, n]: block (i, j) holds a visible valid pair (j <= i, both valid)."""
        i = jnp.arange(self.n)[:, None]
        j = jnp.arange(self.n)[None, :]
        nb = self.row_blocks()[:, None, None, None]
        return ((j <= i) & (i < nb))

    def forced(self) -> jax.Array:
        """bool [1, 1, n, n]: the sink block and the diagonal."""
        i = jnp.arange(self.n)[:, None]
        j = jnp.arange(self.n)[None, :]
        return ((j == 0) | (j == i))[None, None]

    def valid_tokens(self) -> jax.Array:
        """bool [B, S]: token t of row b is real (not right padding)."""
        return jnp.arange(self.S)[None, :] < self.lengths[:, None]


def make_geometry(q: jax.Array, k: jax.Array, block: int,
                  lengths: jax.Array | None) -> Geometry:
    if q.ndim != 4 or k.ndim != 4 or q.shape[1] != k.shape[1]:
        raise ValueError(f"sparse prefill needs q [B,S,Hq,D], k [B,S,Hkv,D]: {q.shape}, {k.shape}")
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    if lengths is None:
        lengths = jnp.full((B,), S, jnp.int32)
    lengths = jnp.clip(jnp.asarray(lengths, jnp.int32).reshape(B), 1, S)
    return Geometry(B, S, Hq, Hkv, D, int(block), lengths)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Base of all policies. Frozen and hashable: policies live in the model's static graph.

    Common parameters:
      block_size: tokens per query and key block (the kernel's block_q = block_k).
      heads: "q" one list per query head (the papers), "kv" one per KV head (group union).
      max_nnz: static cap on blocks per list; None = no cap (n blocks).
    """

    name: ClassVar[str] = "base"
    block_size: int = 128
    heads: str = "q"
    max_nnz: int | None = None

    def __post_init__(self) -> None:
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"{self.name}: block_size must be a power of two >= 16, "
                             f"got {self.block_size}")
        if self.heads not in ("q", "kv"):
            raise ValueError(f"{self.name}: heads must be 'q' or 'kv', got {self.heads!r}")
        if self.max_nnz is not None and self.max_nnz < 2:
            raise ValueError(f"{self.name}: max_nnz must be >= 2 (sink + diagonal)")

    # ------------------------------------------------------------------------------ interface
    def select(self, q: jax.Array, k: jax.Array, geo: Geometry, layer: int) -> jax.Array:
        """bool [B, Hq or Hkv, n, n]: blocks the method picks (forced/causal rules added later)."""
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
        geo = make_geometry(q, k, self.block_size, lengths)
        mask = self.select(q, k, geo, layer)
        return self.finish(mask, geo, min_length)

    def block_mask(self, q: jax.Array, k: jax.Array, *, layer: int = 0,
                   lengths: jax.Array | None = None, min_length: int = 0) -> jax.Array:
        """bool [B, H, n, n] of :meth:`build` (tests, measurement)."""
        return self.build(q, k, layer=layer, lengths=lengths, min_length=min_length).to_block_mask()

    def layer_key(self, layer: int) -> int:
        """A layer whose layout computation equals ``layer``'s (callers that jit one layout per
        layer compile once per key). Layer-independent policies return 0."""
        return 0

    # ------------------------------------------------------------------------------- shared
    def finish(self, mask: jax.Array, geo: Geometry, min_length: int) -> BlockSparseLayout:
        """Applies the shared rules (module docstring) and converts to a layout."""
        causal, forced = geo.causal(), geo.forced()
        mask = (mask | forced) & causal
        if min_length > 0:
            short = (geo.lengths < min_length)[:, None, None, None]
            mask = jnp.where(short, causal, mask)
        if self.heads == "kv" and mask.shape[1] == geo.Hq:
            mask = mask.reshape(geo.B, geo.Hkv, geo.G, geo.n, geo.n).any(axis=2)
        # Query blocks in the padding: diagonal only (kernels need a non-empty, cheap row).
        pad_rows = jnp.arange(geo.n)[None, None, :, None] >= geo.row_blocks()[:, None, None, None]
        mask = jnp.where(pad_rows, jnp.eye(geo.n, dtype=bool)[None, None], mask)
        cap = geo.n if self.max_nnz is None else min(self.max_nnz, geo.n)
        if cap < geo.n:
            mask = cap_blocks(mask, forced, cap)
        if select.use_sort():
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
    """Broadcasts a bool [n, n] block pattern to [B, heads, n, n]."""
    return jnp.broadcast_to(jnp.asarray(mask)[None, None], (geo.B, heads, geo.n, geo.n))


__all__ = ["Geometry", "Policy", "make_geometry", "cap_blocks", "static_mask"]
