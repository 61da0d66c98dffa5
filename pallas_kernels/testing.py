"""Test helpers shared by the CPU tests and the GPU check script: a float64 NumPy reference
(independent of :mod:`pallas_kernels.layout`: it reads the dense block mask) and random problems.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from pallas_kernels._prep import SegmentIds
from pallas_kernels.attention import block_sparse_attention
from pallas_kernels.layout import BlockSparseLayout, cdiv
from pallas_kernels.layout_columns import with_columns


def numpy_reference(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    block_mask: np.ndarray,
    block_q: int,
    block_k: int,
    *,
    causal: bool,
    sm_scale: float | None = None,
    q_offset: Any = 0,
    seg_q: np.ndarray | None = None,
    seg_kv: np.ndarray | None = None,
    col_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """float64 block-sparse attention.

    Args:
        q ``[B, Sq, Hq, Dqk]``, k ``[B, Sk, Hkv, Dqk]``, v ``[B, Sk, Hkv, Dv]`` (any float dtype);
        block_mask bool ``[B or 1, H, nq, nk]`` with ``H`` in ``(Hq, Hkv)``;
        q_offset int or ``[B]``; seg_q ``[B, Sq]``, seg_kv ``[B, Sk]`` or None;
        col_mask bool ``[B or 1, H, nq, Sk]`` extra key columns per query block, or None.
    Returns:
        out ``[B, Sq, Hq, Dv]`` float64 and lse ``[B, Hq, Sq]`` float64 (-inf for empty rows).
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bm = np.broadcast_to(np.asarray(block_mask, bool), (B,) + block_mask.shape[1:])
    bm = np.repeat(bm, Hq // bm.shape[1], axis=1)  # per query head
    mask = bm[:, :, np.arange(Sq) // block_q][:, :, :, np.arange(Sk) // block_k]
    if col_mask is not None:
        cm = np.broadcast_to(np.asarray(col_mask, bool), (B,) + col_mask.shape[1:])
        cm = np.repeat(cm, Hq // cm.shape[1], axis=1)
        mask = mask | cm[:, :, np.arange(Sq) // block_q]
    if causal:
        off = np.broadcast_to(np.asarray(q_offset, np.int64), (B,))
        i = np.arange(Sq)[None, :, None] + off[:, None, None]
        mask = mask & (np.arange(Sk)[None, None, :] <= i)[:, None]
    if seg_q is not None:
        mask = mask & (np.asarray(seg_q)[:, None, :, None] == np.asarray(seg_kv)[:, None, None, :])
    scale = D ** -0.5 if sm_scale is None else sm_scale
    kk = np.repeat(k, G, axis=2)
    vv = np.repeat(v, G, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    s = np.where(mask, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    l = p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p / np.where(l > 0, l, 1.0), vv)
    with np.errstate(divide="ignore"):
        lse = np.where(l > 0, m + np.log(l), -np.inf)[..., 0]
    return out, lse


@dataclasses.dataclass
class Problem:
    """A random block-sparse attention problem (NumPy arrays)."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    block_mask: np.ndarray
    block_q: int
    block_k: int
    causal: bool
    q_offset: np.ndarray
    seg_q: np.ndarray | None
    seg_kv: np.ndarray | None
    col_mask: np.ndarray | None = None  # bool [B, H, nq, Sk], disjoint from block_mask

    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        return numpy_reference(self.q, self.k, self.v, self.block_mask, self.block_q,
                               self.block_k, causal=self.causal, q_offset=self.q_offset,
                               seg_q=self.seg_q, seg_kv=self.seg_kv, col_mask=self.col_mask)

    def layout(self):
        """The problem's :class:`BlockSparseLayout` (columns from ``col_mask``, if any)."""
        lay = BlockSparseLayout.from_block_mask(self.block_mask, self.block_q, self.block_k)
        return lay if self.col_mask is None else with_columns(lay, self.col_mask)


def random_problem(
    seed: int,
    *,
    B: int = 1,
    Sq: int = 64,
    Sk: int = 64,
    Hq: int = 4,
    Hkv: int = 1,
    Dqk: int = 32,
    Dv: int = 32,
    block_q: int = 16,
    block_k: int = 16,
    per_kv_head: bool = True,
    density: float = 0.5,
    empty_row_frac: float = 0.1,
    causal: bool = True,
    q_offset: str | int = 0,
    segments: bool = False,
    dtype: Any = np.float32,
    columns: int = 0,
    col_only_frac: float = 0.0,
) -> Problem:
    """Draws q, k, v ~ N(0, 1) (cast to ``dtype``), a random block mask with ``density`` and a
    fraction of empty rows, per-batch ``q_offset`` (``"chunk"`` = Sk - Sq, ``"random"``,
    or an int) and optional sorted random segment ids.

    ``columns > 0`` adds up to that many random key columns per row (outside the row's listed
    blocks; empty rows stay empty); ``col_only_frac`` of the rows then list columns only."""
    rng = np.random.default_rng(seed)
    H = Hkv if per_kv_head else Hq
    nq, nk = cdiv(Sq, block_q), cdiv(Sk, block_k)
    bm = rng.random((B, H, nq, nk)) < density
    empty = rng.random((B, H, nq, 1)) < empty_row_frac
    bm &= ~empty
    col_mask = None
    if columns:
        bm &= ~(rng.random((B, H, nq, 1)) < col_only_frac)
        picks = rng.integers(0, Sk, (B, H, nq, columns))
        col_mask = np.zeros((B, H, nq, Sk), bool)
        np.put_along_axis(col_mask, picks, True, axis=-1)
        in_block = np.repeat(bm, block_k, axis=-1)[..., :Sk]
        col_mask &= ~in_block & ~empty
    if q_offset == "chunk":
        off = np.full((B,), max(Sk - Sq, 0), np.int32)
    elif q_offset == "random":
        off = rng.integers(0, max(Sk - Sq, 0) + 8, (B,)).astype(np.int32)
    else:
        off = np.full((B,), int(q_offset), np.int32)
    seg_q = seg_kv = None
    if segments:
        seg_kv = np.sort(rng.integers(0, 3, (B, Sk)), axis=-1).astype(np.int32)
        seg_q = np.sort(rng.integers(0, 3, (B, Sq)), axis=-1).astype(np.int32)

    def draw(*shape):
        return rng.standard_normal(shape).astype(np.float32).astype(dtype)

    return Problem(draw(B, Sq, Hq, Dqk), draw(B, Sk, Hkv, Dqk), draw(B, Sk, Hkv, Dv), bm,
                   block_q, block_k, causal, off, seg_q, seg_kv, col_mask)


def assert_close(out: Any, lse: Any, ref_out: np.ndarray, ref_lse: np.ndarray, *,
                 low_precision: bool) -> None:
    """Elementwise and norm-relative comparison; NaN never passes; lse -inf must match."""
    out = np.asarray(out, np.float64)
    lse = np.asarray(lse, np.float64)
    assert out.shape == ref_out.shape, (out.shape, ref_out.shape)
    assert lse.shape == ref_lse.shape, (lse.shape, ref_lse.shape)
    assert np.isfinite(out).all(), "non-finite output"
    assert not np.isnan(lse).any(), "NaN in lse"
    empty = np.isneginf(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), empty)
    tol = 2e-2 if low_precision else 2e-5
    np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol)
    denom = max(np.linalg.norm(ref_out), 1e-30)
    assert np.linalg.norm(out - ref_out) / denom < (1e-2 if low_precision else 1e-5)
    np.testing.assert_allclose(lse[~empty], ref_lse[~empty], rtol=1e-3 if low_precision else 1e-5,
                               atol=1e-3 if low_precision else 1e-5)
    # Rows that attend to nothing give exactly 0 (B, Sq, Hq) vs lse (B, Hq, Sq).
    assert np.all(out[empty.transpose(0, 2, 1)] == 0.0)


def run_problem(p: Problem, impl: str, **kwargs: Any) -> tuple[Any, Any]:
    """Runs ``block_sparse_attention`` on a :class:`Problem`; returns (out, lse) jax arrays."""
    layout = p.layout()
    seg = None if p.seg_q is None else SegmentIds(jnp.asarray(p.seg_q), jnp.asarray(p.seg_kv))
    return block_sparse_attention(
        jnp.asarray(p.q), jnp.asarray(p.k), jnp.asarray(p.v), layout, causal=p.causal,
        q_offset=jnp.asarray(p.q_offset), segment_ids=seg, return_lse=True, impl=impl, **kwargs)
