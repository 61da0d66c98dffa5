"""``pbs``: Permuted Block-Sparse attention (PBS-Attn, arXiv 2510.21270), causal by construction.

PBS reorders the keys inside each segment of ``segment`` tokens so that the keys the last
queries attend to gather into few blocks, then selects blocks of the permuted keys:

1. Key scores per KV head: softmax(Q_last K^T / sqrt(D)) of the row's last ``block_size``
   queries, averaged over those queries and over the GQA group's query heads (the original
   asserts Hq == Hkv and uses each head's own scores; with GQA the KV head's keys are permuted
   once for the whole group, so the group's mean ranks them).
2. Within every *complete* segment (fully inside the row) keys are sorted by descending score
   (stable); the tail segment and the padding stay in place. V is permuted like K.
3. Mean-pooled Q and permuted K per block; per query block a softmax over the allowed blocks
   (segments strictly before the query block's segment, block-causal), kept in descending
   order until ``tau`` of the mass (:func:`estimators.cumulative_keep`); the block holding
   original token 0 (the sink) is forced; every block of the query block's own (diagonal)
   segment is added, causally.
4. (ours, ``last_block_exact``) The row's last query block, whose final token generates, also
   keeps, per query head, the fewest permuted blocks holding ``tau`` of that head's exact
   attention mass over the last block's queries (the scores of step 1, before the group mean):
   the pooled query of step 3 averages 128 queries, and the question's few tokens that look
   for a needle are diluted in it. Free: step 1 computed those scores.

**Causality by construction.** Our kernels test causality on key *positions in the array*,
not on a per-token position array. PBS's permuted keys are therefore used only where
causality cannot matter: a segment strictly before the query block's segment lies entirely
before every query of the block. The diagonal segment is read *unpermuted*. One kernel call
sees K2 = [permuted K ; original K] (each half padded to n blocks) with q_offset = n * block:
listed blocks j < n are permuted off-diagonal blocks (positions < n * block <= every query
position: always visible), blocks n + j are original blocks of the diagonal segment, causally
masked at their true offset. Output equals dense attention restricted to the selected keys
mapped back to original positions (tests/test_sparse_pbs.py).

Defaults from the official code: block 128, segment 256, tau 0.9. tau >= 1 gives dense.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxprefill.sparse import estimators as est
from jaxprefill.sparse import select
from jaxprefill.sparse.base import Geometry, Policy, make_geometry
from jaxprefill.sparse.prefill import Prefill
from pallas_kernels import BlockSparseLayout, block_sparse_attention


@dataclasses.dataclass(frozen=True)
class PBS(Policy):
    """PBS. Params: tau (0.9), segment (256 tokens, a multiple of block_size), last_block_exact
    (False; ours, see the module docstring), block_size (128).

    Use :meth:`attend` (or a SparseConfig through ``attend``): :meth:`build`'s layout indexes
    the doubled key array of :meth:`keys_values`, not the original keys. Whole prompts only:
    a chunk or a packed row would need the permutation of keys it cannot see, so those calls
    stay dense (``kinds``).
    """

    name = "pbs"
    kinds = ("prompt",)
    takes_key_columns = False  # its layout indexes the permuted keys
    tau: float = 0.9
    segment: int = 256
    last_block_exact: bool = False
    n_last: int = 128  # the dense query tail (Policy.n_last); 0 gives the paper's layout

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.tau <= 1:  # a share of the attention mass
            raise ValueError(f"pbs: tau must be in (0, 1], got {self.tau}")
        if self.recall_target is not None:
            raise ValueError("pbs: no recall guard (its blocks are blocks of permuted keys)")
        if self.share_layers != 1:
            raise ValueError("pbs: share_layers must be 1 (each layer's layout is over its own "
                             "key permutation)")
        if self.segment < self.block_size or self.segment % self.block_size:
            raise ValueError(f"pbs: segment {self.segment} must be a positive multiple of "
                             f"block_size {self.block_size}")

    # ------------------------------------------------------------------------- permutation
    def permutation(self, q: jax.Array, k: jax.Array, geo: Geometry) -> jax.Array:
        """int32 [B, Hkv, n * block]: original key index at each permuted position."""
        return self._permutation(self._last_block_scores(q, k, geo), geo)

    @staticmethod
    def _last_block_scores(q: jax.Array, k: jax.Array, geo: Geometry) -> jax.Array:
        """float32 [B, Hq, S]: attention mass per key, summed over the row's last block of
        queries (each query head its own)."""
        return est.last_q_sums(q, k, geo, geo.block, slash=False)[0]

    def _permutation(self, vert: jax.Array, geo: Geometry) -> jax.Array:
        score = vert.reshape(geo.B, geo.Hkv, geo.G, geo.S).sum(axis=2) / (geo.G * geo.block)
        total = geo.n * geo.block
        ns = -(-total // self.segment)
        span = ns * self.segment
        score = jnp.pad(score, ((0, 0), (0, 0), (0, span - geo.S)))
        seg_end = (jnp.arange(ns) + 1) * self.segment  # [ns]
        complete = seg_end[None, :] <= geo.lengths[:, None]  # [B, ns]
        order = jnp.argsort(-score.reshape(geo.B, geo.Hkv, ns, self.segment), axis=-1,
                            stable=True)
        ident = jnp.broadcast_to(jnp.arange(self.segment), order.shape)
        order = jnp.where(complete[:, None, :, None], order, ident)
        perm = order + (jnp.arange(ns) * self.segment)[None, None, :, None]
        return perm.reshape(geo.B, geo.Hkv, span)[..., :total].astype(jnp.int32)

    def keys_values(self, k: jax.Array, v: jax.Array, perm: jax.Array, geo: Geometry):
        """K2, V2 [B, 2 * n * block, Hkv, D]: the permuted keys, then the original keys."""
        total = geo.n * geo.block

        def two(x):
            xp = jnp.pad(x, ((0, 0), (0, total - geo.S), (0, 0), (0, 0)))
            idx = jnp.transpose(perm, (0, 2, 1))[..., None]  # [B, total, Hkv, 1]
            return jnp.concatenate([jnp.take_along_axis(xp, idx, axis=1), xp], axis=1)

        return two(k), two(v)

    # ------------------------------------------------------------------------- selection
    def masks(self, q: jax.Array, k: jax.Array, geo: Geometry,
              min_length: int = 0) -> tuple[jax.Array, jax.Array]:
        """(perm [B, Hkv, n*block], bool [B, H, n, 2n] block mask over K2), H = Hq or Hkv."""
        vert = self._last_block_scores(q, k, geo)
        perm = self._permutation(vert, geo)
        kp = jnp.take_along_axis(est.padded(k, geo), jnp.transpose(perm, (0, 2, 1))[..., None],
                                 axis=1)[:, :geo.S]
        n, blk = geo.n, geo.block
        i = jnp.arange(n)[:, None]
        j = jnp.arange(n)[None, :]
        seg_i, seg_j = i * blk // self.segment, j * blk // self.segment
        causal = geo.causal()  # [B, 1, n, n]
        off = (seg_j < seg_i)[None, None] & causal  # permuted blocks: earlier segments only
        diag = (seg_j == seg_i)[None, None] & causal  # original blocks: own segment, causal
        s = est.grouped_logits(est.pool_blocks(q, geo), est.pool_blocks(kp, geo)) * geo.scale
        s = jnp.where(off, s, -jnp.inf)
        prob = jnp.where(off, jax.nn.softmax(s, axis=-1), 0.0)  # rows without blocks: 0
        pos0 = jnp.argmin(perm, axis=-1)  # permuted position of original token 0 [B, Hkv]
        sink = jnp.repeat(pos0 // blk, geo.G, axis=1)[:, :, None, None] == j[None, None]
        offb = jnp.broadcast_to(off, prob.shape)
        keep = est.cumulative_keep(prob, offb, self.tau, forced=sink & offb, how=geo.estimation)
        if self.last_block_exact:
            keep = keep | self._last_block_selection(vert, perm, off, sink, geo)
        keep = keep | (geo.tail_rows(self.n_last)[:, None, :, None] & offb)  # dense tail
        if min_length > 0:  # short rows: dense causal, all from the original keys
            short = (geo.lengths < min_length)[:, None, None, None]
            keep = keep & ~short
            diag = diag | (causal & short)
        diag = jnp.broadcast_to(diag, keep.shape)
        if self.heads == "kv":
            keep = keep.reshape(geo.B, geo.Hkv, geo.G, n, n).any(axis=2)
            diag = diag.reshape(geo.B, geo.Hkv, geo.G, n, n).any(axis=2)
        pad_rows = jnp.arange(n)[None, None, :, None] >= geo.row_blocks()[:, None, None, None]
        keep = keep & ~pad_rows  # padding query blocks: their own diagonal block only
        diag = jnp.where(pad_rows, jnp.eye(n, dtype=bool)[None, None], diag)
        return perm, jnp.concatenate([keep, diag], axis=-1)

    def _last_block_selection(self, vert: jax.Array, perm: jax.Array, off: jax.Array,
                              sink: jax.Array, geo: Geometry) -> jax.Array:
        """bool [B, Hq, n, n]: in each row's last query block, per query head, the fewest
        permuted off-diagonal-segment blocks (sink forced) holding tau of the head's exact mass
        ``vert`` [B, Hq, S]; False elsewhere."""
        n, blk, total = geo.n, geo.block, geo.n * geo.block
        vp = jnp.pad(vert, ((0, 0), (0, 0), (0, total - geo.S)))
        by_perm = jnp.take_along_axis(vp, jnp.repeat(perm, geo.G, axis=1), axis=-1)
        mass = by_perm.reshape(geo.B, geo.Hq, n, blk).sum(-1)  # [B, Hq, n] permuted blocks
        last = geo.row_blocks() - 1  # [B]
        is_last = jnp.arange(n)[None, :] == last[:, None]  # [B, n]
        allowed = jnp.any(off[:, 0] & is_last[:, :, None], axis=1)[:, None]  # [B, 1, n]
        exact = est.cumulative_keep(mass, jnp.broadcast_to(allowed, mass.shape), self.tau,
                                    forced=sink[:, :, 0] & allowed,  # sink [B, Hq, 1, n]
                                    how=geo.estimation)
        return is_last[:, None, :, None] & exact[:, :, None, :]

    def layout(self, q: jax.Array, k: jax.Array, geo: Geometry, layer: int,
               min_length: int) -> BlockSparseLayout:
        """Layout over K2 (see module docstring): [B, H, n, n] lists of blocks in [0, 2n)."""
        _, mask = self.masks(q, k, geo, min_length)
        kv_idx, kv_cnt = select.mask_to_lists(mask, geo.n)  # <= i + 1 blocks per row
        return BlockSparseLayout(kv_idx, kv_cnt, geo.block, geo.block, 2 * geo.n)

    def block_mask(self, q, k, *, layer: int = 0, lengths=None, min_length: int = 0):
        """bool [B, H, n, 2n] over K2 (permuted blocks, then original blocks)."""
        return self.build(q, k, layer=layer, lengths=lengths, min_length=min_length
                          ).to_block_mask()

    def key_mask(self, q: jax.Array, k: jax.Array, rows: jax.Array, *,
                 lengths: jax.Array | None = None, min_length: int = 0) -> jax.Array:
        """bool [B, H, R, S]: keys (original positions) that query positions ``rows`` [B, R]
        attend to (causal included): what the kernel computes, mapped back."""
        geo = make_geometry(q, k, self.block_size, lengths, self.estimation)
        perm, mask = self.masks(q, k, geo, min_length)
        n, blk, total = geo.n, geo.block, geo.n * geo.block
        row_blk = (rows // blk)[:, None, :, None]  # [B, 1, R, 1]
        m = jnp.take_along_axis(mask, jnp.broadcast_to(row_blk, mask.shape[:2] + (
            rows.shape[1], 2 * n)), axis=2)  # [B, H, R, 2n]
        tok_blk = jnp.arange(total) // blk
        by_perm = m[..., :n][..., tok_blk]  # [B, H, R, total] at permuted positions
        h_kv = jnp.arange(m.shape[1]) * geo.Hkv // m.shape[1]
        dest = perm[:, h_kv]  # [B, H, total] original index of each permuted position
        orig = jnp.zeros(by_perm.shape, bool)
        orig = jax.vmap(jax.vmap(lambda o, d, bp: o.at[:, d].set(bp)))(orig, dest, by_perm)
        orig = orig | m[..., n:][..., tok_blk]
        causal = jnp.arange(total)[None, None, None, :] <= rows[:, None, :, None]
        return (orig & causal)[..., :geo.S]

    # ------------------------------------------------------------------------- attention
    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, call: Prefill,
               layout: BlockSparseLayout | None = None) -> jax.Array:
        """Causal attention [B, S, Hq, Dv] of a whole prompt over the PBS selection (one kernel
        call over K2 = [permuted keys ; original keys]). A shared ``layout`` is refused (PBS
        builds its own over this layer's permutation)."""
        if layout is not None:
            raise ValueError("pbs: a layout from another layer cannot be used (share_layers 1)")
        geo = make_geometry(q, k, self.block_size, call.lengths, self.estimation)
        perm, mask = self.masks(q, k, geo, call.min_length)
        kv_idx, kv_cnt = select.mask_to_lists(mask, geo.n)
        layout = BlockSparseLayout(kv_idx, kv_cnt, geo.block, geo.block, 2 * geo.n)
        k2, v2 = self.keys_values(k, v, perm, geo)
        return block_sparse_attention(q, k2, v2, layout, causal=True, sm_scale=call.sm_scale,
                                      q_offset=geo.n * geo.block, impl=call.kernel,
                                      config=call.kernel_config)
