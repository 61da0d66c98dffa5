"""Block-sparse attention layout: which key/value blocks each query block visits.

A :class:`BlockSparseLayout` is the one data structure every block-sparse kernel of this package
reads. For each (batch b, layout head h, query block i) it lists the key/value blocks to visit:

- ``kv_idx``: int32 ``[B, H, nq, max_nnz]``: block indices in ``[0, nk)``, sorted ascending in
  the first ``kv_cnt`` positions. Positions ``>= kv_cnt`` are padding and repeat the last valid
  index (0 for an empty row), so a kernel that fetches ``kv_idx[..., t]`` at a padded step
  re-fetches the block it already holds (TPU pipelines then issue no DMA).
- ``kv_cnt``: int32 ``[B, H, nq]``: number of valid entries per row, in ``[0, max_nnz]``.
- static: ``block_q``, ``block_k`` (tokens per block) and ``num_kv_blocks`` (``nk``).

Optional column path (both ``None`` or both set): single key columns a query block also attends
to, for patterns whose "vertical lines" would waste most of a block (MInference):

- ``col_idx``: int32 ``[B, H, nq, max_cols]``: key TOKEN positions in ``[0, Sk)``, sorted
  ascending in the first ``col_cnt`` entries; padding repeats the last valid entry (0 for an
  empty row).
- ``col_cnt``: int32 ``[B, H, nq]``: valid entries per row.

Query block i attends to (its listed key blocks) UNION (its listed key columns); causal and
segment masks apply to columns too. Columns never lie inside one of the row's listed blocks
(kernels rely on it; :func:`pallas_kernels.layout_columns.with_columns` drops such
columns). Kernels gather
the listed K/V columns and process them in chunks of ``block_k`` after the listed blocks.

``H`` is either the number of query heads (one list per query head) or the number of KV heads
(one list shared by the query heads of a GQA group, which lets GPU kernels pack the group).
``B`` may be 1 to share one layout across the batch.

The layout is a pytree (arrays are leaves, block sizes are static metadata), so it passes through
``jax.jit``; ``max_nnz`` is part of the array shape and therefore static.

Constructors: :meth:`BlockSparseLayout.from_block_mask` (host numpy, or device ``jax.Array``
inside ``jit``), :meth:`dense`, :meth:`dense_causal`, :meth:`streaming`. Host constructors run in
NumPy; :func:`block_mask_to_layout_arrays` is the jit-able device version. Columns are added with
:func:`pallas_kernels.layout_columns.with_columns` (jit-able).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class BlockSparseLayout:
    """Per-row lists of key/value blocks (see module docstring).

    Attributes:
        kv_idx: int32 ``[B, H, nq, max_nnz]`` sorted block indices, padded with the last valid one.
        kv_cnt: int32 ``[B, H, nq]`` valid entries per row.
        block_q: query tokens per block (static).
        block_k: key tokens per block (static).
        num_kv_blocks: ``nk``, number of key blocks of the sequence (static).
        col_idx: optional int32 ``[B, H, nq, max_cols]`` sorted key positions (column path).
        col_cnt: optional int32 ``[B, H, nq]`` valid columns per row.
    """

    kv_idx: Any
    kv_cnt: Any
    block_q: int
    block_k: int
    num_kv_blocks: int
    col_idx: Any = None
    col_cnt: Any = None

    def __post_init__(self) -> None:
        if (self.col_idx is None) != (self.col_cnt is None):
            raise ValueError("col_idx and col_cnt must both be set or both be None")
        if self.col_idx is None or not hasattr(self.kv_cnt, "shape"):
            return  # (pytree unflattening may pass placeholders instead of arrays)
        if not hasattr(self.col_idx, "shape") or not hasattr(self.col_cnt, "shape"):
            return
        if (tuple(self.col_cnt.shape) != tuple(self.kv_cnt.shape)
                or tuple(self.col_idx.shape[:-1]) != tuple(self.kv_cnt.shape)
                or len(self.col_idx.shape) != 4):
            raise ValueError(
                f"columns must be col_idx [B, H, nq, max_cols] and col_cnt [B, H, nq] matching "
                f"kv_cnt {tuple(self.kv_cnt.shape)}; got {tuple(self.col_idx.shape)}, "
                f"{tuple(self.col_cnt.shape)}")

    # ----------------------------------------------------------------------------- shape helpers
    @property
    def batch(self) -> int:
        return self.kv_idx.shape[0]

    @property
    def num_heads(self) -> int:
        return self.kv_idx.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_idx.shape[2]

    @property
    def max_nnz(self) -> int:
        return self.kv_idx.shape[3]

    @property
    def has_columns(self) -> bool:
        return self.col_idx is not None

    @property
    def max_cols(self) -> int:
        """Static column-list length (0 without columns)."""
        return 0 if self.col_idx is None else self.col_idx.shape[3]

    def column_chunks(self) -> int:
        """Static number of ``block_k`` column chunks a kernel walks per row (0: no columns)."""
        return cdiv(self.max_cols, self.block_k)

    # ------------------------------------------------------------------------------ constructors
    @classmethod
    def from_block_mask(
        cls,
        mask: Any,
        block_q: int,
        block_k: int,
        max_nnz: int | None = None,
    ) -> "BlockSparseLayout":
        """Builds a layout from a boolean block mask ``[B, H, nq, nk]``.

        Args:
            mask: bool ``[B, H, nq, nk]``; ``mask[b, h, i, j]`` lists key block j for query block
                i. A NumPy array is processed on the host; a ``jax.Array`` (also a tracer inside
                ``jit``) on the device with :func:`block_mask_to_layout_arrays`.
            block_q, block_k: tokens per query / key block.
            max_nnz: static list length. Defaults to the largest row count (at least 1); needed
                when ``mask`` is traced. Host masks with a row longer than ``max_nnz`` raise;
                device masks keep the ``max_nnz`` lowest block indices of such rows (a silent
                truncation: size ``max_nnz`` to the policy's budget).
        """
        if mask.ndim != 4:
            raise ValueError(f"block mask must be [B, H, nq, nk], got shape {mask.shape}")
        nk = int(mask.shape[-1])
        if isinstance(mask, jax.Array):
            if max_nnz is None:
                if isinstance(mask, jax.core.Tracer):
                    raise ValueError("a traced block mask needs a static max_nnz")
                max_nnz = max(1, int(jnp.max(jnp.sum(mask, axis=-1))))
            kv_idx, kv_cnt = block_mask_to_layout_arrays(mask, max_nnz)
            return cls(kv_idx, kv_cnt, int(block_q), int(block_k), nk)
        m = np.asarray(mask).astype(bool)
        counts = m.sum(-1)
        need = max(1, int(counts.max(initial=0)))
        if max_nnz is None:
            max_nnz = need
        elif max_nnz < need:
            raise ValueError(f"max_nnz={max_nnz} but a row of the block mask lists {need} blocks")
        kv_idx, kv_cnt = _host_layout_arrays(m, max_nnz)
        return cls(jnp.asarray(kv_idx), jnp.asarray(kv_cnt), int(block_q), int(block_k), nk)

    @classmethod
    def dense(
        cls, batch: int, heads: int, seq_q: int, seq_k: int, block_q: int, block_k: int
    ) -> "BlockSparseLayout":
        """Every key block for every query block (non-causal full attention)."""
        nq, nk = cdiv(seq_q, block_q), cdiv(seq_k, block_k)
        return cls.from_block_mask(np.ones((batch, heads, nq, nk), bool), block_q, block_k)

    @classmethod
    def dense_causal(
        cls,
        batch: int,
        heads: int,
        seq_q: int,
        seq_k: int,
        block_q: int,
        block_k: int,
        q_offset: int = 0,
    ) -> "BlockSparseLayout":
        """All blocks holding at least one causal pair ``j <= i + q_offset``.

        Use ``q_offset = seq_k - seq_q`` when the queries are the last ``seq_q`` positions
        (chunked prefill).
        """
        mask = causal_block_mask(seq_q, seq_k, block_q, block_k, q_offset)
        mask = np.broadcast_to(mask, (batch, heads) + mask.shape)
        return cls.from_block_mask(mask, block_q, block_k)

    @classmethod
    def streaming(
        cls,
        sink_blocks: int,
        local_blocks: int,
        batch: int,
        heads: int,
        seq_q: int,
        seq_k: int,
        block_q: int,
        block_k: int,
        q_offset: int = 0,
    ) -> "BlockSparseLayout":
        """A-shape / streaming layout: the first ``sink_blocks`` key blocks plus the
        ``local_blocks`` key blocks ending at the block that holds the row's last causal key.
        """
        mask = streaming_block_mask(
            sink_blocks, local_blocks, seq_q, seq_k, block_q, block_k, q_offset
        )
        mask = np.broadcast_to(mask, (batch, heads) + mask.shape)
        return cls.from_block_mask(mask, block_q, block_k)

    # ----------------------------------------------------------------------------- conversions
    def to_block_mask(self) -> jax.Array:
        """Dense bool ``[B, H, nq, nk]`` mask of the listed blocks (jit-able; columns are not
        included: see :meth:`column_mask`)."""
        return scatter_rows(self.kv_idx, self.kv_cnt, self.num_kv_blocks)

    def column_mask(self, seq_k: int) -> jax.Array:
        """bool ``[B, H, nq, seq_k]``: the listed key columns of each row (all False without
        columns). Jit-able; memory grows as nq x Sk (tests, references)."""
        if self.col_idx is None:
            return jnp.zeros(tuple(self.kv_cnt.shape) + (seq_k,), bool)
        return scatter_rows(self.col_idx, self.col_cnt, seq_k)

    def without_columns(self) -> "BlockSparseLayout":
        return dataclasses.replace(self, col_idx=None, col_cnt=None)

    def round_columns_to_blocks(self, max_nnz: int | None = None) -> "BlockSparseLayout":
        """A column-free layout that also lists the block of every column (a superset of the
        keys: for kernels without the column path). Jit-able; ``max_nnz`` defaults to ``nk``."""
        if self.col_idx is None:
            return self
        nk = self.num_kv_blocks
        mask = self.to_block_mask() | scatter_rows(self.col_idx // self.block_k, self.col_cnt, nk)
        kv_idx, kv_cnt = block_mask_to_layout_arrays(mask, nk if max_nnz is None else max_nnz)
        return BlockSparseLayout(kv_idx, kv_cnt, self.block_q, self.block_k, nk)

    def broadcast_batch(self, batch: int) -> "BlockSparseLayout":
        """Returns the layout with its batch axis broadcast from 1 to ``batch``."""
        if self.batch == batch:
            return self
        if self.batch != 1:
            raise ValueError(f"layout batch {self.batch} does not match {batch}")
        shape = (batch,) + tuple(self.kv_idx.shape[1:])
        cols = {}
        if self.col_idx is not None:
            cshape = (batch,) + tuple(self.col_idx.shape[1:])
            cols = dict(col_idx=jnp.broadcast_to(self.col_idx, cshape),
                        col_cnt=jnp.broadcast_to(self.col_cnt, shape[:-1]))
        return dataclasses.replace(
            self,
            kv_idx=jnp.broadcast_to(self.kv_idx, shape),
            kv_cnt=jnp.broadcast_to(self.kv_cnt, shape[:-1]),
            **cols,
        )

    def computed_blocks(self) -> float:
        """Blocks a kernel computes (host-side): listed blocks plus ``ceil(col_cnt / block_k)``
        column chunks per row (a chunk costs one block's FLOPs)."""
        n = float(np.asarray(self.kv_cnt, np.float64).sum())
        if self.col_cnt is not None:
            cc = np.asarray(self.col_cnt, np.int64)
            n += float(((cc + self.block_k - 1) // self.block_k).sum())
        return n

    def density(self) -> float:
        """Computed blocks (:meth:`computed_blocks`) / all blocks (host-side, for reporting)."""
        total = self.batch * self.num_heads * self.num_q_blocks * self.num_kv_blocks
        return self.computed_blocks() / max(total, 1)


jax.tree_util.register_dataclass(
    BlockSparseLayout,
    data_fields=["kv_idx", "kv_cnt", "col_idx", "col_cnt"],
    meta_fields=["block_q", "block_k", "num_kv_blocks"],
)


# --------------------------------------------------------------------------------- host helpers
def scatter_rows(idx: jax.Array, cnt: jax.Array, size: int) -> jax.Array:
    """bool ``[..., size]``: True at the first ``cnt`` entries of each row of ``idx [..., L]``
    (jit-able; a scatter, O(rows x (L + size)) memory)."""
    lead = tuple(idx.shape[:-1])
    n_list = idx.shape[-1]
    rows = int(np.prod(lead)) if lead else 1
    valid = jnp.arange(n_list, dtype=jnp.int32) < jnp.asarray(cnt)[..., None]
    tgt = jnp.where(valid, jnp.clip(idx, 0, size - 1), size).reshape(rows, n_list)
    out = jnp.zeros((rows, size + 1), bool)
    out = out.at[jnp.arange(rows)[:, None], tgt].set(True)  # invalid -> dropped slot `size`
    return out[:, :size].reshape(lead + (size,))


def _host_layout_arrays(mask: np.ndarray, max_nnz: int) -> tuple[np.ndarray, np.ndarray]:
    """NumPy: bool ``[..., nk]`` -> (kv_idx ``[..., max_nnz]``, kv_cnt ``[...]``) int32."""
    nk = mask.shape[-1]
    cnt = mask.sum(-1).astype(np.int32)
    # Stable sort of "not listed" puts listed blocks first, in ascending order.
    order = np.argsort(~mask, axis=-1, kind="stable").astype(np.int32)
    if max_nnz > nk:
        order = np.concatenate(
            [order, np.zeros(order.shape[:-1] + (max_nnz - nk,), np.int32)], axis=-1
        )
    order = order[..., :max_nnz]
    last = np.take_along_axis(order, np.maximum(cnt - 1, 0)[..., None], axis=-1)
    last = np.where(cnt[..., None] > 0, last, 0)
    t = np.arange(max_nnz)
    kv_idx = np.where(t < cnt[..., None], order, last).astype(np.int32)
    return kv_idx, cnt


def block_mask_to_layout_arrays(mask: jax.Array, max_nnz: int) -> tuple[jax.Array, jax.Array]:
    """Device (jit-able): bool ``[..., nk]`` -> (kv_idx ``[..., max_nnz]``, kv_cnt ``[...]``).

    Rows with more than ``max_nnz`` listed blocks keep their ``max_nnz`` lowest indices.
    """
    nk = mask.shape[-1]
    ar = jnp.arange(nk, dtype=jnp.int32)
    keyed = jnp.where(mask, ar, jnp.int32(nk))
    srt = jnp.sort(keyed, axis=-1)
    if max_nnz > nk:
        srt = jnp.concatenate(
            [srt, jnp.full(srt.shape[:-1] + (max_nnz - nk,), nk, jnp.int32)], axis=-1
        )
    srt = srt[..., :max_nnz]
    cnt = jnp.minimum(jnp.sum(mask, axis=-1, dtype=jnp.int32), max_nnz)
    last = jnp.take_along_axis(srt, jnp.maximum(cnt - 1, 0)[..., None], axis=-1)
    last = jnp.where(cnt[..., None] > 0, last, 0)
    t = jnp.arange(max_nnz, dtype=jnp.int32)
    kv_idx = jnp.where(t < cnt[..., None], srt, last).astype(jnp.int32)
    return kv_idx, cnt.astype(jnp.int32)


def causal_block_mask(
    seq_q: int, seq_k: int, block_q: int, block_k: int, q_offset: int = 0
) -> np.ndarray:
    """bool ``[nq, nk]``: block (i, j) holds a pair with key <= query + q_offset."""
    nq, nk = cdiv(seq_q, block_q), cdiv(seq_k, block_k)
    last_q = np.minimum((np.arange(nq) + 1) * block_q, seq_q) - 1 + q_offset  # row's max position
    first_k = np.arange(nk) * block_k
    return first_k[None, :] <= last_q[:, None]


def streaming_block_mask(
    sink_blocks: int,
    local_blocks: int,
    seq_q: int,
    seq_k: int,
    block_q: int,
    block_k: int,
    q_offset: int = 0,
) -> np.ndarray:
    """bool ``[nq, nk]``: sink blocks plus ``local_blocks`` blocks ending at the diagonal."""
    nq, nk = cdiv(seq_q, block_q), cdiv(seq_k, block_k)
    last_q = np.minimum((np.arange(nq) + 1) * block_q, seq_q) - 1 + q_offset
    diag = np.clip(last_q // block_k, -1, nk - 1)  # last key block with a causal pair
    j = np.arange(nk)[None, :]
    sink = j < sink_blocks
    local = (j <= diag[:, None]) & (j > diag[:, None] - local_blocks)
    return (sink & (j <= diag[:, None])) | local


_SEG_BIG = 2**30


def _block_range(seg: jax.Array, block: int, pad_value: int) -> tuple[jax.Array, jax.Array]:
    """Min and max segment id per block of seg [B, S] -> ([B, n], [B, n]); padding excluded."""
    b, s = seg.shape
    n = -(-s // block)
    padded = jnp.pad(seg, ((0, 0), (0, n * block - s)), constant_values=pad_value)
    blocks = padded.reshape(b, n, block)
    valid = jnp.arange(n * block).reshape(n, block) < s
    lo = jnp.min(jnp.where(valid, blocks, _SEG_BIG), axis=-1)
    hi = jnp.max(jnp.where(valid, blocks, -_SEG_BIG), axis=-1)
    return lo, hi


def structured_layout(sq: int, sk: int, batch: int, heads: int = 1, *, block_q: int, block_k: int,
                      causal: bool, q_offset: jax.Array | None,
                      segment_ids: tuple[jax.Array, jax.Array] | None) -> BlockSparseLayout:
    """Layout [B, heads, nq, nk] (the same list for every head) of every block that may hold a
    visible (query, key) pair: the masking structure of dense attention as a layout.

    Packed prefill rows (several prompts, segment ids) and chunked prefill (queries at an offset)
    are dense attention with structure: whole blocks of the score matrix are masked. Listing only
    the blocks that can hold a visible pair lets the kernels skip the rest (they still apply the
    token-level masks inside the listed blocks). Jit-able (max_nnz = nk is static). Segments:
    blocks whose id ranges intersect. Causal: key block start <= last query index of the block
    (+ q_offset). segment_ids: (q [B, Sq], kv [B, Sk]) int32 or None.
    """
    nq, nk = -(-sq // block_q), -(-sk // block_k)
    mask = jnp.ones((batch, nq, nk), bool)
    if causal:
        last_q = jnp.minimum((jnp.arange(nq) + 1) * block_q, sq) - 1
        off = jnp.zeros((batch,), jnp.int32) if q_offset is None else jnp.broadcast_to(
            jnp.asarray(q_offset, jnp.int32), (batch,))
        first_k = jnp.arange(nk) * block_k
        mask &= first_k[None, None, :] <= (last_q[None, :, None] + off[:, None, None])
    if segment_ids is not None:
        q_lo, q_hi = _block_range(segment_ids[0], block_q, 0)
        k_lo, k_hi = _block_range(segment_ids[1], block_k, 0)
        mask &= (jnp.maximum(q_lo[:, :, None], k_lo[:, None, :])
                 <= jnp.minimum(q_hi[:, :, None], k_hi[:, None, :]))
    mask = jnp.broadcast_to(mask[:, None], (batch, heads, nq, nk))
    return BlockSparseLayout.from_block_mask(mask, block_q, block_k, max_nnz=nk)


def random_block_mask(
    rng: np.random.Generator,
    batch: int,
    heads: int,
    seq_q: int,
    seq_k: int,
    block_q: int,
    block_k: int,
    density: float,
    causal: bool = True,
    q_offset: int = 0,
    sink_blocks: int = 1,
) -> np.ndarray:
    """Random bool ``[B, H, nq, nk]`` with ``density`` of the (causal) blocks of each row,
    always including the first ``sink_blocks`` and the diagonal block (benchmarks and tests)."""
    nq, nk = cdiv(seq_q, block_q), cdiv(seq_k, block_k)
    allowed = causal_block_mask(seq_q, seq_k, block_q, block_k, q_offset) if causal else (
        np.ones((nq, nk), bool))
    n_allowed = allowed.sum(-1)
    diag = np.where(n_allowed > 0, n_allowed - 1, -1) if causal else np.full(nq, nk - 1)
    scores = rng.random((batch, heads, nq, nk))
    scores = np.where(allowed, scores, 2.0)
    j = np.arange(nk)
    forced = (j[None, :] < sink_blocks) | (j[None, :] == diag[:, None])
    scores = np.where(forced & allowed, -1.0, scores)
    want = np.maximum(np.ceil(density * n_allowed).astype(int), np.minimum(n_allowed, 1))
    ranks = np.argsort(np.argsort(scores, axis=-1, kind="stable"), axis=-1, kind="stable")
    forced_cnt = (forced & allowed).sum(-1)
    want = np.maximum(want, forced_cnt)
    return (ranks < want[:, None]) & allowed


def block_flops(layout: BlockSparseLayout, num_q_heads: int, head_dim_qk: int,
                head_dim_v: int) -> float:
    """FLOPs of the listed blocks and column chunks (2 matmuls of full blocks), for throughput
    reporting."""
    cnt = layout.computed_blocks()
    per_row_head = num_q_heads // layout.num_heads
    return 2.0 * cnt * per_row_head * layout.block_q * layout.block_k * (head_dim_qk + head_dim_v)


__all__ = [
    "BlockSparseLayout",
    "block_mask_to_layout_arrays",
    "causal_block_mask",
    "streaming_block_mask",
    "random_block_mask",
    "block_flops",
    "cdiv",
    "scatter_rows",
]
