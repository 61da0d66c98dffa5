"""Float32 references of DeepSeek sparse attention (DSA): the lightning indexer's top-k and
sparse MLA over the selected tokens. Small inputs only: they materialize [B, S, T] scores and
[B, S, K, Dc + Dr] gathered rows.

Indexer (DeepSeek-V3.2). Queries q [B, S, Hi, D], per-head weights w [B, S, Hi] (float32, every
scale folded in), one key per token k [B, T, D] shared by the Hi heads:

    score[b, i, j] = sum_h w[b, i, h] * relu(q[b, i, h] . k[b, j])
    allowed(b, i, j) = j <= q_offset[b] + i   (and seg_q[b, i] == seg_k[b, j] with segments)

The top-k of row (b, i) is the K = min(topk, T) allowed keys of largest score; among equal
scores the lower key index wins (transformers leaves ties to `torch.topk`, whose order is
unspecified; this rule is ours and every backend follows it). -0.0 and +0.0 are equal scores.
The result lists the selected key indices in ascending order, then -1 for the slots a row
cannot fill (rows with fewer than K allowed keys).

Sparse MLA (absorbed MQA form over the latent rows; `rows` index kv's first axis):

    s[b, i, h, r] = sm_scale * (q_lat[b, i, h] . kv[rows[b, i, r], :Dc]
                                + q_pe[b, i, h] . kv[rows[b, i, r], Dc:])     rows[b, i, r] >= 0
    out[b, i, h]  = sum_r softmax_r(s) kv[rows[b, i, r], :Dc],  lse = log sum_r exp(s)

A query with no valid row gives out 0 and lse -inf. Valid rows of one query must be distinct.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
E4M3_MAX = 448.0


def canonical(s: jax.Array) -> jax.Array:
    """Scores with -0.0 made +0.0, so that equal values tie however they are compared."""
    return jnp.where(s == 0, jnp.zeros_like(s), s)


def check_index_inputs(q, w, k, q_offset, segment_ids) -> tuple[int, int, int, int, int]:
    """Validate the indexer's shapes; returns (B, S, Hi, D, T)."""
    if q.ndim != 4 or k.ndim != 3 or w.ndim != 3:
        raise ValueError(f"need q [B, S, Hi, D], w [B, S, Hi], k [B, T, D]; got {q.shape}, "
                         f"{w.shape}, {k.shape}")
    b, s, hi, d = q.shape
    if w.shape != (b, s, hi) or k.shape[0] != b or k.shape[2] != d:
        raise ValueError(f"q {q.shape}, w {w.shape} and k {k.shape} disagree in B, S, Hi or D")
    if q_offset is not None and jnp.shape(q_offset) != (b,):
        raise ValueError(f"q_offset must be int32 [B={b}], got shape {jnp.shape(q_offset)}")
    if segment_ids is not None:
        sq, sk = segment_ids
        if sq.shape != (b, s) or sk.shape != (b, k.shape[1]):
            raise ValueError(f"segment_ids must be ([B, S]={b, s}, [B, T]={b, k.shape[1]}); got "
                             f"{sq.shape}, {sk.shape}")
    return b, s, hi, d, k.shape[1]


def query_positions(b: int, s: int, q_offset: jax.Array | None) -> jax.Array:
    """int32 [B, S]: the position of each query (q_offset[b] + i)."""
    off = jnp.zeros((b,), jnp.int32) if q_offset is None else q_offset.astype(jnp.int32)
    return off[:, None] + jnp.arange(s, dtype=jnp.int32)[None]


def allowed(q_pos: jax.Array, t: int, seg_q: jax.Array | None = None,
            seg_k: jax.Array | None = None, k_start: int = 0) -> jax.Array:
    """bool [B, R, T]: key k_start + j allowed for the query at q_pos [B, R] (causal, segments;
    seg_q [B, R], seg_k [B, T])."""
    j = k_start + jnp.arange(t, dtype=jnp.int32)
    ok = j[None, None, :] <= q_pos[:, :, None]
    if seg_q is not None:
        ok &= seg_q[:, :, None] == seg_k[:, None, :]
    return ok


def index_scores_reference(q: jax.Array, w: jax.Array, k: jax.Array) -> jax.Array:
    """float32 [B, S, T] = sum_h w * relu(q_h . k), unmasked (materializes [B, S, Hi, T])."""
    dots = jnp.einsum("bshd,btd->bsht", q.astype(jnp.float32), k.astype(jnp.float32),
                      precision=HIGHEST)
    return canonical(jnp.einsum("bsh,bsht->bst", w.astype(jnp.float32), jnp.maximum(dots, 0.0),
                                precision=HIGHEST))


def select_topk(scores: jax.Array, ok: jax.Array, topk: int) -> jax.Array:
    """int32 [..., K]: per row of scores [..., T] the top-K allowed columns (lower column first
    among equal scores), ascending, -1 padded; K = min(topk, T)."""
    t = scores.shape[-1]
    kk = min(topk, t)
    key = jnp.where(ok, canonical(scores), -jnp.inf)
    order = jnp.argsort(-key, axis=-1, stable=True)[..., :kk]  # stable: lower index first
    n = jnp.minimum(jnp.sum(ok, axis=-1, keepdims=True), kk)
    slot = jnp.arange(kk, dtype=jnp.int32)
    picked = jnp.where(slot < n, order.astype(jnp.int32), t)
    picked = jnp.sort(picked, axis=-1)
    return jnp.where(picked < t, picked, -1)


def index_topk_reference(q: jax.Array, w: jax.Array, k: jax.Array, topk: int, *,
                         q_offset: jax.Array | None = None,
                         segment_ids: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """int32 [B, S, min(topk, T)]; see the module docstring."""
    b, s, _, _, t = check_index_inputs(q, w, k, q_offset, segment_ids)
    seg_q, seg_k = segment_ids if segment_ids is not None else (None, None)
    ok = allowed(query_positions(b, s, q_offset), t, seg_q, seg_k)
    return select_topk(index_scores_reference(q, w, k), ok, topk)


def quantize_e4m3(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row float8 e4m3 quantization over the last axis (one scale per row of D values;
    DeepSeek-V3.2's 128-value blocks at D = 128): (x8 float8_e4m3fn [..., D], scale float32
    [...]) with x ~ x8 * scale, scale = amax / 448 (1 for an all-zero row)."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    return (x32 / scale[..., None]).astype(jnp.float8_e4m3fn), scale


def fp8_index_inputs(q: jax.Array, w: jax.Array, k: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The FP8 indexer's operands: (q8, w * q_scale, k8, k_scale [B, T]). With positive scales
    w_h relu(sq_h sk q8_h . k8) = sk (w_h sq_h) relu(q8_h . k8): the query scale folds into the
    head weights and the key scale multiplies the head sum (as DeepSeek's fp8_index does)."""
    q8, w8 = fp8_index_queries(q, w)
    k8, ks = quantize_e4m3(k)
    return q8, w8, k8, ks


def fp8_index_queries(q: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The query half of :func:`fp8_index_inputs`: (q8, w * q_scale), for keys already in FP8."""
    q8, qs = quantize_e4m3(q)
    return q8, w.astype(jnp.float32) * qs


def check_sparse_inputs(q_latent, q_pe, kv, rows) -> tuple[int, int, int, int, int, int]:
    """Validate sparse MLA shapes; returns (B, S, H, Dc, Dr, K)."""
    if q_latent.ndim != 4 or q_pe.ndim != 4 or q_latent.shape[:3] != q_pe.shape[:3]:
        raise ValueError(f"q_latent [B, S, H, Dc] and q_pe [B, S, H, Dr] must share B, S, H; "
                         f"got {q_latent.shape}, {q_pe.shape}")
    b, s, h, dc = q_latent.shape
    dr = q_pe.shape[-1]
    if kv.ndim != 2 or kv.shape[-1] != dc + dr:
        raise ValueError(f"kv must be [N, Dc + Dr = {dc + dr}], got {kv.shape}")
    if rows.ndim != 3 or rows.shape[:2] != (b, s):
        raise ValueError(f"rows must be int32 [B={b}, S={s}, K], got {rows.shape}")
    return b, s, h, dc, dr, rows.shape[-1]


def sparse_mla_reference(q_latent: jax.Array, q_pe: jax.Array, kv: jax.Array, rows: jax.Array,
                         sm_scale: float) -> tuple[jax.Array, jax.Array]:
    """(out float32 [B, S, H, Dc], lse float32 [B, S, H]); see the module docstring."""
    b, s, h, dc, dr, kk = check_sparse_inputs(q_latent, q_pe, kv, rows)
    valid = rows >= 0
    g = jnp.take(kv, jnp.clip(rows, 0, kv.shape[0] - 1), axis=0).astype(jnp.float32)
    q = jnp.concatenate([q_latent, q_pe], axis=-1).astype(jnp.float32)
    sc = jnp.einsum("bshd,bsrd->bshr", q, g, precision=HIGHEST) * sm_scale
    sc = jnp.where(valid[:, :, None, :], sc, -jnp.inf)
    m = jnp.max(sc, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(valid[:, :, None, :], jnp.exp(sc - m), 0.0)
    denom = jnp.sum(p, axis=-1)
    out = jnp.einsum("bshr,bsrc->bshc", p, g[..., :dc], precision=HIGHEST)
    has = denom > 0
    safe = jnp.where(has, denom, 1.0)
    out = jnp.where(has[..., None], out / safe[..., None], 0.0)
    lse = jnp.where(has, m[..., 0] + jnp.log(safe), -jnp.inf)
    return out, lse


__all__ = ["allowed", "canonical", "check_index_inputs", "check_sparse_inputs",
           "fp8_index_inputs", "fp8_index_queries", "index_scores_reference",
           "index_topk_reference", "query_positions", "quantize_e4m3", "select_topk",
           "sparse_mla_reference"]
