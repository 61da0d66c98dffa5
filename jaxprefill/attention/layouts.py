"""Block-sparse layouts derived from masking structure (segments, causality, q_offset).

Packed prefill rows (several prompts, segment ids) and chunked prefill (queries at an offset)
are dense attention with structure: whole blocks of the score matrix are masked. Listing only
the blocks that can hold a visible pair lets the block-sparse kernels skip the rest; the kernel
still applies the token-level masks inside the listed blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import BlockSparseLayout

_BIG = 2**30


def _block_range(seg: jax.Array, block: int, pad_value: int) -> tuple[jax.Array, jax.Array]:
    """Min and max segment id per block of seg [B, S] -> ([B, n], [B, n]); padding excluded."""
    b, s = seg.shape
    n = -(-s // block)
    padded = jnp.pad(seg, ((0, 0), (0, n * block - s)), constant_values=pad_value)
    blocks = padded.reshape(b, n, block)
    valid = jnp.arange(n * block).reshape(n, block) < s
    lo = jnp.min(jnp.where(valid, blocks, _BIG), axis=-1)
    hi = jnp.max(jnp.where(valid, blocks, -_BIG), axis=-1)
    return lo, hi


def structured_layout(sq: int, sk: int, batch: int, heads: int = 1, *, block_q: int, block_k: int,
                      causal: bool, q_offset: jax.Array | None,
                      segment_ids: tuple[jax.Array, jax.Array] | None) -> BlockSparseLayout:
    """Layout [B, heads, nq, nk] (the same list for every head) listing every block that may hold a visible (query, key) pair.

    Jit-able (max_nnz = nk is static). Segments: blocks whose id ranges intersect. Causal: key
    block start <= last query index of the block (+ q_offset).
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
