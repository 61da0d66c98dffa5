"""Token assignment of context parallelism: which chunks of the sequence each device holds.

The sequence (padded to ``S``) is cut into equal chunks of ``c`` tokens. With ``n`` devices on
the ring axis:

* zigzag (load-balanced causal attention): ``2n`` chunks; device ``i`` holds chunks ``i`` and
  ``2n - 1 - i`` (an early and a late one). Under a causal mask an early chunk sees little and a
  late one sees much, so every device gets the same work: ``(2n - 1 - i) + i + 1 = 2n`` chunk
  pairs of attention each (Striped / zigzag ring attention; the "2R chunks" of
  Yang et al. 2024).
* contiguous: ``n`` chunks; device ``i`` holds chunk ``i``. Device ``n - 1`` does ``n`` times the
  causal work of device 0; for prompts this layout exists as the baseline and for caches
  (a prefix written in natural order).

The *ring order* of a sequence is the device-major concatenation of the chunks each device
holds: ``[chunk 0, chunk 2n-1 | chunk 1, chunk 2n-2 | ...]`` for zigzag. A ``[B, S, ...]``
array in ring order, sharded contiguously over the ring axis, puts each device's own chunks on
it. Models permute tokens, positions and segment ids into ring order once at the start of a
prefill (every layer but attention is token-wise) and restore the natural order of the outputs
once at the end (:func:`from_ring_local`: two collective permutes, no all-gather).

Everything here is static (NumPy over Python ints) except the two array functions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def chunks_per_device(zigzag: bool) -> int:
    """Chunks each device holds: 2 (zigzag) or 1 (contiguous)."""
    return 2 if zigzag else 1


@functools.lru_cache(maxsize=64)
def chunk_table(n: int, zigzag: bool) -> np.ndarray:
    """int32 [n, m]: the global chunk index of each device's local chunk t (ascending in t)."""
    if not zigzag:
        return np.arange(n, dtype=np.int32)[:, None]
    i = np.arange(n, dtype=np.int32)
    return np.stack([i, 2 * n - 1 - i], axis=1)


@functools.lru_cache(maxsize=64)
def ring_permutation(length: int, n: int, zigzag: bool) -> np.ndarray:
    """int32 [length]: natural index of the token at each ring-order position.

    ``x_ring = x[:, perm]``; ``length`` must be a multiple of ``n * m`` (m chunks per device).
    """
    m = chunks_per_device(zigzag)
    if length % (n * m):
        raise ValueError(f"ring order: length {length} is not a multiple of {n * m} chunks")
    c = length // (n * m)
    starts = chunk_table(n, zigzag).reshape(-1) * c  # chunk starts in ring order
    return (starts[:, None] + np.arange(c)[None, :]).reshape(-1).astype(np.int32)


def positions_of_device(length: int, n: int, zigzag: bool, device: jax.Array) -> jax.Array:
    """int32 [length // n]: natural positions of the tokens device ``device`` holds (traced)."""
    m = chunks_per_device(zigzag)
    c = length // (n * m)
    starts = jnp.asarray(chunk_table(n, zigzag))[device] * c  # [m]
    return (starts[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]).reshape(-1)


def to_ring(x: jax.Array, n: int, zigzag: bool, axis: int = 1) -> jax.Array:
    """x in natural order along ``axis`` -> ring order (a static gather; meant for replicated
    inputs such as token ids and positions, where it moves nothing between devices)."""
    if not zigzag:
        return x
    perm = ring_permutation(x.shape[axis], n, zigzag)
    return jnp.take(x, jnp.asarray(perm), axis=axis)


def from_ring(x: jax.Array, n: int, zigzag: bool, axis: int = 1) -> jax.Array:
    """Inverse of :func:`to_ring` (a static gather on whole arrays)."""
    if not zigzag:
        return x
    inv = np.argsort(ring_permutation(x.shape[axis], n, zigzag)).astype(np.int32)
    return jnp.take(x, jnp.asarray(inv), axis=axis)


def from_ring_local(x: jax.Array, axis_name: str, n: int, zigzag: bool) -> jax.Array:
    """Inside ``shard_map``: this device's ring-order shard [B, 2c, ...] -> its natural-order
    shard (natural chunks 2d and 2d + 1 on device d).

    A zigzag device holds one even and one odd chunk (their indices sum to 2n - 1), and even
    chunk e belongs at natural device e // 2 (slot 0), odd chunk o at o // 2 (slot 1): two
    collective permutes, each a permutation of the devices.
    """
    if not zigzag or n == 1:
        return x
    c = x.shape[1] // 2
    table = chunk_table(n, zigzag)
    even = np.where(table[:, 0] % 2 == 0, table[:, 0], table[:, 1])  # [n]
    odd = 2 * n - 1 - even
    i = jax.lax.axis_index(axis_name)
    first, second = x[:, :c], x[:, c:]
    mine_even = jnp.where(i % 2 == 0, first, second)  # device i's early chunk is i
    mine_odd = jnp.where(i % 2 == 0, second, first)
    got_even = jax.lax.ppermute(mine_even, axis_name, [(d, int(even[d]) // 2) for d in range(n)])
    got_odd = jax.lax.ppermute(mine_odd, axis_name, [(d, int(odd[d]) // 2) for d in range(n)])
    return jnp.concatenate([got_even, got_odd], axis=1)


__all__ = ["chunk_table", "chunks_per_device", "from_ring", "from_ring_local",
           "positions_of_device", "ring_permutation", "to_ring"]
