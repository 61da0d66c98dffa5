"""Density, attention recall and output error of a block mask, exact on sampled query rows.

* density: listed causal blocks / all causal blocks of the row's valid query blocks
  (XAttention's definition; 1.0 = dense).
* recall: dense attention probability mass that the mask keeps, for sampled query rows
  (MInference Fig. 3c; FlexPrefill's gamma). 1.0 = nothing lost.
* output error: ||o_sparse - o_dense|| / ||o_dense|| on the same rows, where o_sparse is the
  softmax renormalized over the kept keys (what the kernel computes).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass
class LayerStats:
    """Per-head metrics of one layer, float64 numpy [Hq]."""

    density: np.ndarray
    recall: np.ndarray
    output_error: np.ndarray


def block_density(mask: jax.Array, lengths: jax.Array, block: int) -> np.ndarray:
    """mask bool [B, H, n, n] -> per-head density [H] over each row's valid causal blocks."""
    mask = np.asarray(mask)
    n = mask.shape[-1]
    nb = (np.asarray(lengths) + block - 1) // block
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    causal = (j <= i)[None] & (i < nb[:, None, None])  # [B, n, n]
    listed = (mask & causal[:, None]).sum(axis=(0, 2, 3))
    return listed / causal.sum()


def row_density(mask, lengths, block: int) -> np.ndarray:
    """mask bool [B, H, n, n] -> density [B, H] of each row over its own valid causal blocks."""
    mask = np.asarray(mask)
    n = mask.shape[-1]
    nb = (np.asarray(lengths) + block - 1) // block
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    causal = (j <= i)[None] & (i < nb[:, None, None])  # [B, n, n]
    listed = (mask & causal[:, None]).sum(axis=(2, 3))
    return listed / causal.sum(axis=(1, 2))[:, None]


def sample_rows(lengths, count: int, seed: int = 0, min_pos: int = 0) -> np.ndarray:
    """int32 [B, count] query positions per row: evenly spread over [min_pos, length) plus
    jitter; the last position is always included (it produces the first token)."""
    rng = np.random.default_rng(seed)
    rows = []
    for length in np.asarray(lengths):
        lo = min(min_pos, length - 1)
        pos = np.linspace(lo, length - 1, count).astype(np.int64)
        jitter = rng.integers(0, max(1, (length - lo) // (2 * count)), count)
        pos = np.clip(pos - jitter, lo, length - 1)
        pos[-1] = length - 1
        rows.append(pos)
    return np.asarray(rows, np.int32)


@functools.partial(jax.jit, static_argnums=5)
def _row_stats(q, k, v, mask, rows, block: int):
    """q [B,S,Hq,D], k/v [B,S,Hkv,D], mask [B,Hl,n,n], rows [B,R] -> recall, err [B,Hq,R]."""
    s, hq = q.shape[1], q.shape[2]
    hl = mask.shape[1]
    head_map = jnp.arange(hq) * hl // hq  # layout head of each query head
    m = jax.vmap(lambda mb, rb: mb[head_map][:, rb // block])(mask, rows)  # [B, Hq, R, n]
    keep = jnp.repeat(m, block, axis=-1)[..., :s]
    return _keep_stats(q, k, v, keep, rows)


@jax.jit
def _keep_stats(q, k, v, keep, rows):
    """keep bool [B, Hq or Hkv, R, S]: keys each sampled row attends -> recall, err [B,Hq,R]."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    if keep.shape[1] != hq:
        keep = jnp.repeat(keep, hq // keep.shape[1], axis=1)
    qr = jnp.take_along_axis(q, rows[:, :, None, None], axis=1).astype(jnp.float32)
    qg = qr.reshape(b, -1, hkv, hq // hkv, d)
    logit = jnp.einsum("brhgd,bkhd->bhgrk", qg, k.astype(jnp.float32), precision=_HI)
    logit = logit.reshape(b, hq, -1, s) * d ** -0.5
    causal = jnp.arange(s)[None, None, None, :] <= rows[:, None, :, None]
    p = jax.nn.softmax(jnp.where(causal, logit, -jnp.inf), axis=-1)
    kept = jnp.where(keep & causal, p, 0.0)
    recall = kept.sum(-1)
    vg = jnp.repeat(v.astype(jnp.float32), hq // hkv, axis=2)
    o_dense = jnp.einsum("bhrk,bkhd->bhrd", p, vg, precision=_HI)
    o_sparse = jnp.einsum("bhrk,bkhd->bhrd", kept / jnp.maximum(recall, 1e-30)[..., None], vg,
                          precision=_HI)
    err = jnp.linalg.norm(o_sparse - o_dense, axis=-1) / jnp.maximum(
        jnp.linalg.norm(o_dense, axis=-1), 1e-30)
    return recall, err


def keep_recall_error(q, k, v, keep, rows) -> tuple[np.ndarray, np.ndarray]:
    """:func:`row_recall_error` from a token-level keep bool [B, Hq or Hkv, R, S] (policies
    whose selection is not a block mask of the original keys, e.g. pbs)."""
    keep, rows = jnp.asarray(keep), jnp.asarray(rows)
    return _by_kv_heads(lambda qs, ks, vs, sl: _keep_stats(qs, ks, vs, keep[:, sl], rows),
                        q, k, v, keep.shape[1], rows.shape[1])


# Bytes of float32 [B, Hq, R, S] intermediates one stats call may hold (logits, probabilities,
# kept mass, ...: about 6 such buffers). Larger calls are split over groups of KV heads.
STATS_CALL_BYTES = 1 << 30


def _by_kv_heads(fn, q, k, v, mask_heads: int, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Run ``fn(q, k, v, mask head slice) -> (recall, err) [B, Hq', R]`` over groups of KV
    heads small enough for :data:`STATS_CALL_BYTES`; returns row-mean float64 ([B, Hq],
    [B, Hq]). Every group has the same shape (one compile)."""
    b, s, hq, _ = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    per_kv = 6 * 4 * b * g * n_rows * s + 4 * b * s * g * q.shape[3]  # + v repeated per group
    fit = max(1, min(hkv, STATS_CALL_BYTES // max(per_kv, 1)))
    step = max(d for d in range(1, fit + 1) if hkv % d == 0)
    recall, err = [], []
    for h0 in range(0, hkv, step):
        m0, m1 = (h0 * g, (h0 + step) * g) if mask_heads == hq else (h0, h0 + step)
        r, e = fn(q[:, :, h0 * g:(h0 + step) * g], k[:, :, h0:h0 + step], v[:, :, h0:h0 + step],
                  slice(m0, m1))
        recall.append(np.asarray(r, np.float64).mean(axis=2))
        err.append(np.asarray(e, np.float64).mean(axis=2))
    return np.concatenate(recall, axis=1), np.concatenate(err, axis=1)


def head_stats(q, k, v, mask, lengths, block: int, rows: np.ndarray) -> LayerStats:
    """Per-head density, mean recall and mean output error of ``mask`` for one layer.

    q [B, S, Hq, D], k/v [B, S, Hkv, D], mask bool [B, Hl, n, n] (Hl = Hq or Hkv), rows int
    [B, R] sampled query positions (see :func:`sample_rows`).
    """
    recall, err = row_recall_error(q, k, v, mask, rows, block)
    return LayerStats(
        density=np.repeat(block_density(mask, lengths, block), q.shape[2] // mask.shape[1]),
        recall=recall.mean(axis=0), output_error=err.mean(axis=0))


def row_recall_error(q, k, v, mask, rows, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Per batch row and query head: mean recall and mean output error over the sampled query
    rows (shapes as in :func:`head_stats`; ``block`` tokens per mask block). Returns float64
    numpy ([B, Hq], [B, Hq])."""
    mask, rows = jnp.asarray(mask), jnp.asarray(rows)
    return _by_kv_heads(lambda qs, ks, vs, sl: _row_stats(qs, ks, vs, mask[:, sl], rows,
                                                          int(block)),
                        q, k, v, mask.shape[1], rows.shape[1])
