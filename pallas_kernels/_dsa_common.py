"""The exact top-k of the DSA indexer as a k-th value search, shared by its backends.

Scores become int32 *order keys*: for floats other than NaN, `key(x) < key(y)` iff `x < y`
(the bits of x, with the magnitude bits flipped for negative x; -0.0 is made +0.0 first, so
equal scores have equal keys). Entries a query may not select get `INVALID` = int32 min, below
every float's key.

Per row, tau = the largest t with count(key >= t) >= k (a 32-step bit search: one masked count
per bit, on registers in the kernels, as `mass_cut` searches a mass). Then

    selected = valid & (key > tau | (key == tau & tie rank < k - count(key > tau)))

(tie rank: the entry's position among the row's entries equal to tau, in column order), which
is the top-k with lower indices first among ties (tau = INVALID when a row has fewer than k
valid entries: every valid entry is selected), kept in column order.

Rows longer than one register tile (`width`) go through a tournament, exactly: each segment of
`width` columns keeps its own top-k, and the row's top-k is the top-k of those (an entry beaten
by k entries of its own segment is beaten by them in the row too), so the search recurses on
rows of n_segments * k candidates, in column order: a 128K row with 8K tiles and k = 2048 reads
128K + 32K + 8K keys. Rows that segments cannot shrink (n_segments * k >= m: k above about
width / 2) are searched whole by the 32-pass XLA count (`kth_key_xla`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.dsa_reference import canonical

INVALID = jnp.iinfo(jnp.int32).min
_SIGN = jnp.int32(jnp.iinfo(jnp.int32).min)
_MAG = jnp.int32(0x7FFFFFFF)

# (key [R, w] int32, cols [R, w] int32 or None, k, n_seg) -> each row's top-k (keys, cols)
# [R, min(k, w)] in column order (INVALID / -1 padded). cols None: row g's entry j is column
# (g % n_seg) * w + j (the segments of one longer row).
SegmentTopk = Callable[[jax.Array, "jax.Array | None", int, int], tuple[jax.Array, jax.Array]]


def order_key(scores: jax.Array, ok: jax.Array | None = None) -> jax.Array:
    """int32 order keys of float32 scores (module doc); INVALID where ``ok`` is False."""
    bits = jax.lax.bitcast_convert_type(canonical(scores.astype(jnp.float32)), jnp.int32)
    key = bits ^ ((bits >> 31) & _MAG)
    return key if ok is None else jnp.where(ok, key, INVALID)


def bit_search(count_at_least: Callable[[jax.Array], jax.Array], k: int, shape) -> jax.Array:
    """tau int32 of ``shape``: the largest t with count_at_least(t) >= k, by 32 bit steps over
    the unsigned image of t (t ^ sign bit); INVALID when even INVALID does not qualify."""
    def step(b, ans):
        bit = jnp.left_shift(jnp.int32(1), (31 - b).astype(jnp.int32))
        cand = (ans | bit) ^ _SIGN  # signed image of the candidate
        return jnp.where(count_at_least(cand) >= k, ans | bit, ans)

    ans = jax.lax.fori_loop(0, 32, step, jnp.zeros(shape, jnp.int32))
    return ans ^ _SIGN


def kth_key_xla(key: jax.Array, k: int) -> jax.Array:
    """tau [R] of key [R, m] (one masked count per bit, 32 passes over the rows)."""
    return bit_search(lambda t: jnp.sum(key >= t[:, None], axis=1, dtype=jnp.int32), k,
                      key.shape[:1])


def compact(mask: jax.Array, cols: jax.Array, width: int, *extra: jax.Array
            ) -> tuple[jax.Array, ...]:
    """The entries of each row where mask [R, m] holds, in column order, packed into [R, width]
    (cols -> -1 and every `extra` -> INVALID in the slots left over)."""
    r = mask.shape[0]
    pos = jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1
    dest = jnp.where(mask, pos, width)  # width: a dropped column
    rows = jnp.arange(r, dtype=jnp.int32)[:, None]
    outs = [jnp.full((r, width + 1), -1, jnp.int32).at[rows, dest].set(cols)[:, :width]]
    for x in extra:
        outs.append(jnp.full((r, width + 1), INVALID, x.dtype).at[rows, dest].set(x)[:, :width])
    return tuple(outs)


def select(key: jax.Array, cols: jax.Array, tau: jax.Array, k: int
           ) -> tuple[jax.Array, jax.Array]:
    """(keys, cols) [R, k] of the top-k given tau (module doc), in column order."""
    valid = key != INVALID
    above = valid & (key > tau[:, None])
    tie = valid & (key == tau[:, None])
    need = k - jnp.sum(above, axis=1, keepdims=True, dtype=jnp.int32)
    rank = jnp.cumsum(tie, axis=1, dtype=jnp.int32) - 1
    ccols, ckey = compact(above | (tie & (rank < need)), cols, k, key)
    return ckey, ccols


def segment_columns(r: int, w: int, n_seg: int) -> jax.Array:
    """int32 [r, w]: the column of each entry of r rows that are segments of n_seg per row."""
    seg = jnp.arange(r, dtype=jnp.int32)[:, None] % n_seg
    return seg * w + jnp.arange(w, dtype=jnp.int32)[None]


def kth_select(kth: Callable[[jax.Array, int], jax.Array]) -> SegmentTopk:
    """A SegmentTopk from a k-th key search (`kth_key_xla`, the TPU kernel): the selection and
    its compaction in XLA."""
    def seg_topk(key, cols, k, n_seg):
        if cols is None:
            cols = segment_columns(key.shape[0], key.shape[1], n_seg)
        k = min(k, key.shape[1])
        return select(key, cols, kth(key, k), k)
    return seg_topk


def topk_keys(key: jax.Array, k: int, seg_topk: SegmentTopk, width: int,
              cols: jax.Array | None = None) -> jax.Array:
    """int32 [R, min(k, m)]: the top-k columns of each row of order keys [R, m] (module doc),
    ascending, -1 padded. ``seg_topk`` takes rows of at most ``width`` entries; ``cols``
    [R, m]: the column of each entry (default: its position)."""
    r, m = key.shape
    k = min(k, m)
    if m <= width:
        return seg_topk(key, cols, k, 1)[1]
    n_s = -(-m // width)
    if n_s * k >= m:  # k near width: segments cannot shrink the rows; count over whole rows
        if cols is None:
            cols = segment_columns(r, m, 1)
        return select(key, cols, kth_key_xla(key, k), k)[1]
    pad = n_s * width - m
    seg = jnp.pad(key, ((0, 0), (0, pad)), constant_values=INVALID).reshape(r * n_s, width)
    if cols is not None:
        cols = jnp.pad(cols, ((0, 0), (0, pad)), constant_values=-1).reshape(r * n_s, width)
    ckey, ccols = seg_topk(seg, cols, k, n_s)  # [r * n_s, k]
    return topk_keys(ckey.reshape(r, n_s * k), k, seg_topk, width, ccols.reshape(r, n_s * k))


__all__ = ["INVALID", "SegmentTopk", "bit_search", "compact", "kth_key_xla", "kth_select",
           "order_key", "segment_columns", "select", "topk_keys"]
