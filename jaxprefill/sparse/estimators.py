"""Estimators shared by the policies: pure, jit-able functions of (q, k) and the geometry.

Shapes: q [B, S, Hq, D], k [B, S, Hkv, D]; GQA is handled by grouped einsums (k is never
repeated to Hq heads). Scores are float32. Per-row lengths come from ``geo.lengths``: padding
tokens never contribute to a pooled mean, a softmax or a sum, so a row's estimate does not depend
on the batch it is in.

Row windows (``geo.row0`` set, :meth:`Policy.build_rows`): q is then the window's queries
[B, nr * block, Hq, D] (query t at position geo.query_start() + t) while k stays [B, S, Hkv, D];
the query-side helpers (``padded_queries``, ``pool_query_blocks``, ``last_queries``,
``block_softmax_scores``, ``diagonal_blocks``) work on the window's rows, and queries before the
window read as zeros (as the whole-prefix chunk path's zero prefix did).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import estimation
from jaxprefill.sparse import select
from jaxprefill.sparse.geometry import Geometry
from jaxprefill.sparse.estimation import Estimation


def grouped_logits(qx: jax.Array, kx: jax.Array) -> jax.Array:
    """qx [B, Mq, Hq, D], kx [B, Mk, Hkv, D] -> float32 qx.kx [B, Hq, Mq, Mk] (GQA groups).

    Operands stay in their own dtype (bf16 on accelerators: tensor-core rate) with float32
    accumulation; the first H100 measurement used float32 HIGHEST here and the estimators cost
    8-235% of a cuDNN dense prefill at 128K. Scores only rank blocks, so bf16 inputs suffice.
    """
    b, mq, hq, d = qx.shape
    hkv = kx.shape[2]
    dtype = jnp.promote_types(qx.dtype, kx.dtype)
    qg = qx.astype(dtype).reshape(b, mq, hkv, hq // hkv, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, kx.astype(dtype), preferred_element_type=jnp.float32)
    return s.reshape(b, hq, mq, kx.shape[1])


def zero_padding(x: jax.Array, geo: Geometry) -> jax.Array:
    """x [B, S, ...] with the right-padding tokens of each row set to 0."""
    valid = geo.valid_tokens().reshape(geo.B, geo.S, *([1] * (x.ndim - 2)))
    return jnp.where(valid, x, 0)


def pool_blocks(x: jax.Array, geo: Geometry) -> jax.Array:
    """Mean over each block's valid tokens: x [B, S, H, D] -> float32 [B, n, H, D]."""
    pad = geo.n * geo.block - geo.S
    xv = zero_padding(x, geo).astype(jnp.float32)
    xv = jnp.pad(xv, ((0, 0), (0, pad), (0, 0), (0, 0)))
    total = xv.reshape(geo.B, geo.n, geo.block, *x.shape[2:]).sum(axis=2)
    cnt = jnp.pad(geo.valid_tokens(), ((0, 0), (0, pad))).reshape(geo.B, geo.n, geo.block)
    cnt = cnt.sum(-1).astype(jnp.float32)
    return total / jnp.maximum(cnt, 1.0)[:, :, None, None]


def padded_queries(q: jax.Array, geo: Geometry) -> jax.Array:
    """The computed rows' queries with padding zeroed: [B, nq * block, Hq, D].

    Whole prompt: :func:`padded`. Row window: q is already [B, nr * block, ...]."""
    if geo.row0 is None:
        return padded(q, geo)
    return jnp.where(geo.query_valid()[:, :, None, None], q, 0)


def pool_query_blocks(q: jax.Array, geo: Geometry) -> jax.Array:
    """Mean over each computed query block's valid tokens: float32 [B, nq, H, D]."""
    if geo.row0 is None:
        return pool_blocks(q, geo)
    qv = padded_queries(q, geo).astype(jnp.float32)
    total = qv.reshape(geo.B, geo.nq, geo.block, *q.shape[2:]).sum(axis=2)
    cnt = geo.query_valid().reshape(geo.B, geo.nq, geo.block).sum(-1).astype(jnp.float32)
    return total / jnp.maximum(cnt, 1.0)[:, :, None, None]


def last_query_positions(geo: Geometry, n_last: int) -> jax.Array:
    """int32 [B, n_last]: positions of each row's last n_last queries (negative: missing)."""
    return geo.lengths[:, None] - n_last + jnp.arange(n_last)[None, :]


def last_queries(q: jax.Array, geo: Geometry, n_last: int) -> tuple[jax.Array, jax.Array]:
    """The last ``n_last`` valid queries of each row: ([B, n_last, Hq, D], positions [B, n_last]).

    Rows shorter than n_last give negative positions for the missing rows (mask them out).
    Row window: queries before the window are zeros (the window must reach the row's end).
    """
    pos = last_query_positions(geo, n_last)
    if geo.row0 is None:
        idx = jnp.clip(pos, 0, geo.S - 1)
        return jnp.take_along_axis(q, idx[:, :, None, None], axis=1), pos
    local = pos - geo.query_start()[:, None]
    inside = (local >= 0) & (local < q.shape[1])
    ql = jnp.take_along_axis(q, jnp.clip(local, 0, q.shape[1] - 1)[:, :, None, None], axis=1)
    return jnp.where(inside[:, :, None, None], ql, 0), pos


def last_q_probs(q: jax.Array, k: jax.Array, geo: Geometry, n_last: int) -> jax.Array:
    """softmax(Q_last K^T / sqrt(D) + causal) of the last n_last queries: float32 [B, Hq, n_last, S].

    Keys past each query (causal) or past the row length get probability 0; missing query rows
    (row shorter than n_last) are all zero. Written as one masked max / exp / sum so XLA fuses
    it into its consumers (vertical and slash sums) instead of materializing masked copies of
    the [n_last, S] scores (jax.nn.softmax plus two selects cost 3x more at 128K on an H100).
    """
    ql, pos = last_queries(q, geo, n_last)
    s = grouped_logits(ql, k)
    ok = jnp.arange(geo.S)[None, None, None, :] <= pos[:, None, :, None]  # pos < 0: none
    s = jnp.where(ok, s * geo.scale, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - jnp.where(m == -jnp.inf, 0.0, m))  # masked keys: exp(-inf) = 0
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(total > 0, total, 1.0)


def last_q_sums(q: jax.Array, k: jax.Array, geo: Geometry, n_last: int,
                slash: bool = True) -> tuple[jax.Array, jax.Array | None]:
    """Vertical and slash sums of :func:`last_q_probs`: (float32 [B, Hq, S], [B, Hq, S] or None).

    vert[j] = sum over the last queries of P[r, j]; slash[o] = :func:`slash_sums`. On GPUs a
    Pallas kernel computes both without materializing P
    (:func:`pallas_kernels.estimation.last_query_sums`); elsewhere XLA reduces P.
    """
    impl = geo.estimation.backend("last_query_sums", rows=n_last)
    if impl != "xla":
        ql, _ = last_queries(q, geo, n_last)
        return estimation.last_query_sums(jnp.swapaxes(ql, 1, 2), k, geo.lengths,
                                          scale=geo.scale, slash=slash, impl=impl,
                                          interpret=geo.estimation.interpret)
    p = last_q_probs(q, k, geo, n_last)
    return p.sum(axis=2), (slash_sums(p, geo, n_last) if slash else None)


def slash_sums(p: jax.Array, geo: Geometry, n_last: int) -> jax.Array:
    """Diagonal sums of last-query probabilities: p [B, H, n_last, S] -> [B, H, S] by offset.

    Offset o = query position - key position (0 = the main diagonal). Query r of a row sits at
    position L - n_last + r (L = the row's length), so s_o = sum_r p[r, L - n_last + r - o].
    Computed with a skew instead of a gather (a gather of the [n_last, S] probabilities cost
    milliseconds per call on an H100 at 32K): reversing the keys turns the sum into
    sum_r rev[r, c0 + o - r] with c0 = S - 1 - L + n_last, and padding each row of rev with
    n_last zeros then reshaping [R, S + R] -> [R, S + R - 1] shifts row r right by r, so the
    column sums at c0 + o are s_o. Missing query rows (L < n_last) are zero in p already.
    """
    b, h, r, s = p.shape
    rev = jnp.pad(p[..., ::-1], ((0, 0), (0, 0), (0, 0), (0, r)))  # [B, H, R, S + R]
    skew = rev.reshape(b, h, r * (s + r))[..., : r * (s + r - 1)].reshape(b, h, r, s + r - 1)
    tot = jnp.pad(skew.sum(axis=2), ((0, 0), (0, 0), (0, s)))  # [B, H, 2S + R - 1]
    c0 = s - 1 - geo.lengths + r  # [B], >= r - 1 >= 0 since lengths <= S
    return jax.vmap(lambda t, c: jax.lax.dynamic_slice_in_dim(t, c, s, axis=-1))(tot, c0)


def slash_sums_gather(p: jax.Array, geo: Geometry, n_last: int) -> jax.Array:
    """Gather-based :func:`slash_sums` (the reference of the tests)."""
    pos = last_query_positions(geo, n_last)
    o = jnp.arange(geo.S)
    kidx = pos[:, :, None] - o[None, None, :]  # [B, n_last, S]: key of offset o in row r
    ok = kidx >= 0
    g = jnp.take_along_axis(p, jnp.clip(kidx, 0, geo.S - 1)[:, None], axis=-1)
    return jnp.where(ok[:, None], g, 0.0).sum(axis=2)


def block_sum(x: jax.Array, geo: Geometry) -> jax.Array:
    """Sums the last axis (S tokens) into blocks: [..., S] -> [..., n]."""
    pad = geo.n * geo.block - geo.S
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], geo.n, geo.block).sum(-1)


def diagonal_blocks(sel: jax.Array, geo: Geometry) -> jax.Array:
    """Block-diagonal offsets -> block mask: sel bool [B, H, n] (offset d = i - j) -> [B, H, nq, n]
    over the computed query-block rows i."""
    i = geo.query_rows()[:, :, None]  # [1 or B, nq, 1]
    j = jnp.arange(geo.n)[None, None, :]
    d = jnp.clip(i - j, 0, geo.n - 1)
    if geo.row0 is None:
        return sel[:, :, d[0]] & (j <= i)[:, None]
    hit = jax.vmap(lambda s, dd: s[:, dd])(sel, d)  # per batch row: [H, nr, n]
    return hit & (j <= i)[:, None]


def slash_offsets_to_blocks(sel_tok: jax.Array, geo: Geometry) -> jax.Array:
    """Token-diagonal selection -> block-diagonal selection: bool [B, H, S] -> [B, H, n].

    Token diagonal o = d*block + r crosses, in query block i, key blocks i-d and (r > 0) i-d-1.
    """
    blk = jnp.arange(geo.S) // geo.block
    part = (jnp.arange(geo.S) % geo.block) > 0
    out = jnp.zeros(sel_tok.shape[:-1] + (geo.n + 1,), bool)
    out = out.at[..., blk].max(sel_tok)
    out = out.at[..., blk + 1].max(sel_tok & part)
    return out[..., : geo.n]


def rank_desc(scores: jax.Array) -> jax.Array:
    """int32 rank of each entry along the last axis, 0 = largest (ties: lower index first)."""
    order = jnp.argsort(-scores, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)


def cumulative_keep(scores: jax.Array, valid: jax.Array, gamma: float,
                    forced: jax.Array | None = None, *, how: Estimation) -> jax.Array:
    """Smallest set, in descending score order, whose mass reaches ``gamma`` of the valid total.

    scores [..., m] (non-negative), valid bool [..., m]; forced entries are taken first (their
    mass counts); ties in index order. gamma >= 1 keeps every valid entry: exact, where a float
    cumsum would drop the entries whose probability underflows. Returns bool [..., m].
    Threshold search (:mod:`jaxprefill.sparse.select`); :func:`cumulative_keep_sort` is the
    sort-based reference with the same result.
    """
    if not how.sort:
        return select.cumulative_keep(scores, valid, gamma, forced, how=how)
    return cumulative_keep_sort(scores, valid, gamma, forced)


def cumulative_keep_sort(scores: jax.Array, valid: jax.Array, gamma: float,
                         forced: jax.Array | None = None) -> jax.Array:
    """Sort-based :func:`cumulative_keep` (argsort, cumsum, scatter back)."""
    if gamma >= 1.0:
        return valid
    s = jnp.where(valid, scores, 0.0)
    prio = jnp.where(valid, s, -1.0)
    if forced is not None:
        prio = jnp.where(forced & valid, jnp.inf, prio)
    order = jnp.argsort(-prio, axis=-1, stable=True)
    sorted_mass = jnp.take_along_axis(s, order, axis=-1)
    before = jnp.cumsum(sorted_mass, axis=-1) - sorted_mass
    total = s.sum(axis=-1, keepdims=True)
    keep_sorted = before < gamma * total
    keep = jnp.zeros_like(keep_sorted)
    keep = jnp.put_along_axis(keep, order, keep_sorted, axis=-1, inplace=False)
    keep = keep | (forced & valid if forced is not None else False)
    return keep & valid


def topk_mask(scores: jax.Array, valid: jax.Array, count: jax.Array, *,
              how: Estimation) -> jax.Array:
    """bool [..., m]: the ``count`` (broadcast to [...]) highest valid entries of each row
    (ties in index order). Threshold search; :func:`topk_mask_sort` is the reference."""
    if not how.sort:
        return select.topk_mask(scores, valid, count)
    return topk_mask_sort(scores, valid, count)


def topk_mask_sort(scores: jax.Array, valid: jax.Array, count: jax.Array) -> jax.Array:
    """Sort-based :func:`topk_mask` (rank by two stable argsorts)."""
    r = rank_desc(jnp.where(valid, scores, -jnp.inf))
    return (r < jnp.asarray(count)[..., None]) & valid


_CHUNK_ELEMS = 1 << 27  # float32 scores per chunk (512 MiB)


def block_softmax_scores(qx: jax.Array, kx: jax.Array, geo: Geometry, r: int,
                         valid_rows: jax.Array, scale: float, pool: str = "sum",
                         rk: int | None = None, valid_cols: jax.Array | None = None) -> jax.Array:
    """Row-softmax of qx.kx^T pooled into blocks, computed in chunks of query blocks.

    qx [B, nq*r, Hq, Dx] (the computed query-block rows), kx [B, n*rk, Hkv, Dx]: r query rows
    and rk key rows per block (r = rk = block for exact attention, block/stride for strided or
    reshaped estimates; rk != r when keys are sampled more densely than queries). Row i (global
    index: a window's rows start at row0 * r) sees columns j with j * r <= i * rk (causal at
    token granularity when both sample the first token of equal windows), row i < valid_rows[b]
    and column j < valid_cols[b] (default valid_rows). Each softmax row is pooled over its
    block's r x rk cells ("sum" or "max"); rows are independent, so a window's rows equal the
    whole prompt's. Returns float32 [B, Hq, nq, n]; the [nq*r, n*rk] matrix is never
    materialized whole (at most ~_CHUNK_ELEMS floats live at once). On GPUs, square cells of
    <= 64 rows go to the one-pass Pallas kernel
    (:func:`pallas_kernels.estimation.pooled_block_scores`), same result.
    """
    first = geo.query_start() // geo.block * r  # [B] global index of row 0
    square = (rk is None or rk == r) and valid_cols is None
    impl = geo.estimation.backend("pooled_block_scores", cell=r if square else None)
    if impl != "xla":  # one-pass Pallas kernel (square cells of <= 64 rows)
        return estimation.pooled_block_scores(qx, kx, valid_rows, first, r=r, scale=scale,
                                              pool=pool, impl=impl,
                                              interpret=geo.estimation.interpret)
    rk = r if rk is None else rk
    valid_cols = valid_rows if valid_cols is None else valid_cols
    m, nq = geo.n * rk, geo.nq
    chunk = max(1, min(nq, _CHUNK_ELEMS // max(1, geo.B * geo.Hq * r * m)))
    n_chunks = -(-nq // chunk)
    qc = jnp.pad(qx, ((0, 0), (0, n_chunks * chunk * r - nq * r), (0, 0), (0, 0)))
    qc = qc.reshape(geo.B, n_chunks, chunk * r, geo.Hq, qx.shape[-1]).transpose(1, 0, 2, 3, 4)
    col = jnp.arange(m)[None, None, :]
    vr = valid_rows[:, None, None]
    vc = valid_cols[:, None, None]
    first = first[:, None, None]

    def one_chunk(args):
        c, qi = args  # qi [B, chunk*r, Hq, Dx]
        row = first + c * chunk * r + jnp.arange(chunk * r)[None, :, None]
        ok = ((col * r <= row * rk) & (col < vc) & (row < vr))[:, None]
        s = jnp.where(ok, grouped_logits(qi, kx) * scale, -jnp.inf)
        p = jnp.where(ok, jax.nn.softmax(s, axis=-1), 0.0)  # [B, Hq, chunk*r, m]
        p = p.reshape(geo.B, geo.Hq, chunk, r, geo.n, rk)
        return p.sum(axis=(3, 5)) if pool == "sum" else p.max(axis=(3, 5))

    out = jax.lax.map(one_chunk, (jnp.arange(n_chunks), qc))  # [n_chunks, B, Hq, chunk, n]
    out = out.transpose(1, 2, 0, 3, 4).reshape(geo.B, geo.Hq, n_chunks * chunk, geo.n)
    return out[:, :, :nq]


def padded(x: jax.Array, geo: Geometry) -> jax.Array:
    """x [B, S, H, D] with padding tokens zeroed, extended with zeros to n*block tokens."""
    return jnp.pad(zero_padding(x, geo), ((0, 0), (0, geo.n * geo.block - geo.S), (0, 0), (0, 0)))


__all__ = ["block_softmax_scores", "padded", "padded_queries", "grouped_logits", "zero_padding",
           "pool_blocks", "pool_query_blocks", "last_query_positions", "last_queries",
           "last_q_probs", "last_q_sums", "slash_sums", "slash_sums_gather",
           "block_sum", "diagonal_blocks", "slash_offsets_to_blocks", "rank_desc",
           "cumulative_keep", "cumulative_keep_sort", "topk_mask", "topk_mask_sort"]
