"""Paged KV cache: a pool of fixed-size pages shared by all sequences, and its allocator.

Layout per layer: k, v [num_pages, page_size, Hkv, D]. Sequence s owns the pages listed in its
page-table row; its token t lives in page `table[t // page_size]` at offset `t % page_size`.
Page 0 is a scratch page the allocator never hands out: unused page-table entries and idle
decode slots point at it, so every gather and write stays in bounds and real pages are never
touched by padding.

The model's attention reads a contiguous per-row view (`gather_view`), and new entries go back
to their pages (`write_back`). A paged attention kernel that reads pages in place is the next
step (it saves the view copy); the interface stays the same.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxprefill.config import ModelConfig
from jaxprefill.models import KVCache
from jaxprefill.scatter import distinct_drops

SCRATCH_PAGE = 0


@struct.dataclass
class PagedKVCache:
    k: tuple[jax.Array, ...]  # per layer [num_pages, page_size, Hkv, D]
    v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> "PagedKVCache":
        shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        return cls(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)))

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]


def gather_view(cache: PagedKVCache, page_table: jax.Array) -> KVCache:
    """Contiguous KVCache [B, P * page_size, Hkv, D] of the pages in page_table [B, P]."""
    def one(pages):
        g = pages[page_table]  # [B, P, page, H, D]
        return g.reshape(g.shape[0], -1, *g.shape[3:])
    return KVCache(tuple(one(k) for k in cache.k), tuple(one(v) for v in cache.v))


def slot_ids(page_table: jax.Array, positions: jax.Array, valid: jax.Array,
             cache: PagedKVCache) -> jax.Array:
    """Flat slot (page * page_size + offset) of token positions [B, S]; invalid -> out of range
    (dropped by the scatter)."""
    ps = cache.page_size
    page = jnp.take_along_axis(page_table, positions // ps, axis=1)
    return jnp.where(valid, page * ps + positions % ps, cache.num_pages * ps)


def write_back(cache: PagedKVCache, view: KVCache, view_positions: jax.Array,
               slots: jax.Array) -> PagedKVCache:
    """Copy view entries at view_positions [B, S] into flat `slots` [B, S] of the pages."""
    def one(pages, rows):
        flat = pages.reshape(-1, *pages.shape[2:])
        new = jnp.take_along_axis(rows, view_positions[:, :, None, None], axis=1)
        idx = distinct_drops(slots.reshape(-1), flat.shape[0])
        flat = flat.at[idx].set(new.reshape(-1, *new.shape[2:]).astype(flat.dtype),
                                mode="drop", unique_indices=True)
        return flat.reshape(pages.shape)
    return PagedKVCache(tuple(one(p, r) for p, r in zip(cache.k, view.k)),
                        tuple(one(p, r) for p, r in zip(cache.v, view.v)))


def write_pages(cache: PagedKVCache, view: KVCache, slots: jax.Array) -> PagedKVCache:
    """`write_back` of rows that fill their pages from token 0: view [B, T, Hkv, D] with T a
    multiple of the page size, slots [B, T] as `write_back` takes them (token t of row b in
    page slots[b, t] // page_size at offset t % page_size, out of range = skipped).

    Whole pages are copied (one index per page, not per token), so a row's last page also
    receives the padding after its final token: slots a sequence owns but has not reached,
    which a later write fills before any query can see them (every read is causal). A page
    whose first slot is out of range is skipped whole.
    """
    ps = cache.page_size
    b, t = slots.shape
    if t % ps:
        raise ValueError(f"write_pages needs a row width that is a multiple of the page size "
                         f"{ps}, got {t}")
    pages = (slots[:, ::ps] // ps).reshape(-1)  # out of range slot -> page num_pages: dropped
    pages = distinct_drops(pages, cache.num_pages)

    def one(pool, rows):
        new = rows[:, :t].reshape(b * (t // ps), ps, *rows.shape[2:])
        return pool.at[pages].set(new.astype(pool.dtype), mode="drop", unique_indices=True)
    return PagedKVCache(tuple(one(p, r) for p, r in zip(cache.k, view.k)),
                        tuple(one(p, r) for p, r in zip(cache.v, view.v)))


class PageAllocator:
    """Host-side free list of page ids 1..num_pages-1 (page 0 is scratch)."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError("the page pool needs at least 2 pages (page 0 is scratch)")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """n pages, or None (and nothing taken) if fewer are free."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        if any(p == SCRATCH_PAGE or not 0 < p < self.num_pages for p in pages):
            raise ValueError(f"cannot free pages {pages}")
        self._free.extend(reversed(pages))
