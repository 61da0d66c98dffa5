"""Recall guard: check a policy's block selection against exact attention on a few query rows,
and give every head that misses the target recall its dense causal rows.

An estimator can be wrong in ways its own parameters cannot see: a last-query estimate
(minference, flexprefill) misses a head whose middle rows look elsewhere, a pooled estimate
(xattention, proxyattn) smooths away a single important key, a static pattern (streaming) has
no estimate at all. The guard measures instead of trusting: for ``probes`` query-block rows of
the computed window (the last valid row, then rows spaced evenly before it) and ``queries``
queries spread over each of those rows, it computes the exact softmax over all causal keys and
the share of that mass inside the selected blocks (the attention recall of the layout on those
queries). A head whose recall on any probe row is below ``target`` becomes dense (its causal
blocks) for the whole window; the other heads keep their selection.

Cost: ``probes * queries`` query rows of exact scores against every key, per head (at 128K keys,
2 x 16 queries and 32 heads: 0.3 GFLOP and a [B, Hq, 32, S] float32 buffer of 0.5 GB), small
next to the attention itself. The decision is per call: in chunked prefill each chunk probes its
own rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def probe_rows(geo, probes: int) -> jax.Array:
    """int32 [B, probes]: local rows (0..nq-1) of the computed window to probe.

    The last row holding a valid query first (it sees the most keys), then rows spaced evenly
    from the window's start up to (not including) that last row. In a row window (chunked
    prefill) the first row is skipped when there are others: a chunk that starts inside a
    block leaves zeros (uncached prefix queries) at the start of that row. Rows repeat when the
    window has fewer valid rows than probes.
    """
    first = jnp.zeros_like(geo.lengths) if geo.row0 is None else geo.row0
    last = jnp.clip(geo.row_blocks() - 1 - first, 0, geo.nq - 1)  # [B] local last valid row
    lo = jnp.zeros_like(last) if geo.row0 is None else jnp.where(last > 0, 1, 0)
    if probes == 1:
        return last[:, None].astype(jnp.int32)
    frac = jnp.arange(probes - 1, dtype=jnp.float32) / (probes - 1)  # [P-1] in [0, 1)
    spaced = lo[:, None] + jnp.floor(frac[None, :] * (last - lo)[:, None]).astype(jnp.int32)
    return jnp.concatenate([last[:, None], jnp.minimum(spaced, last[:, None])],
                           axis=1).astype(jnp.int32)


def probe_recall(mask: jax.Array, q: jax.Array, k: jax.Array, geo, probes: int = 2,
                 queries: int = 16) -> jax.Array:
    """float32 [B, Hq, probes]: exact attention mass inside ``mask`` on each probe row.

    mask: bool [B, Hm, nq, n] block selection of the computed rows, Hm in (1, Hkv, Hq).
    q: [B, nq * block (or S), Hq, D] the computed rows' queries (geo's window); k: [B, S, Hkv, D].
    Each probe row's recall is the mean over ``queries`` valid queries spread over the row.
    """
    b, _, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    blk, n = geo.block, geo.n
    rows = probe_rows(geo, probes)  # [B, P]
    step = max(1, blk // queries)
    offs = jnp.arange(queries, dtype=jnp.int32) * step + step - 1  # [Q] within a row
    local = rows[:, :, None] * blk + jnp.minimum(offs, blk - 1)[None, None, :]  # [B, P, Q]
    start = jnp.broadcast_to(geo.query_start(), (b,))[:, None, None]
    pos = jnp.minimum(start + local, geo.lengths[:, None, None] - 1)  # absolute, valid
    local = jnp.clip(pos - start, 0, q.shape[1] - 1)
    qs = jnp.take_along_axis(q, local.reshape(b, -1)[:, :, None, None], axis=1)  # [B, PQ, Hq, D]
    qs = qs.reshape(b, -1, hkv, hq // hkv, d)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qs, k,
                        preferred_element_type=jnp.float32) * geo.scale  # [B, Hkv, G, PQ, S]
    key = jnp.arange(s)[None, :]
    visible = (key <= pos.reshape(b, -1)[:, :, None]) & (key < geo.lengths[:, None, None])
    logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)
    p = jnp.pad(p, [(0, 0)] * 4 + [(0, n * blk - s)]).reshape(*p.shape[:-1], n, blk).sum(-1)
    p = p.reshape(b, hq, probes, queries, n)  # block mass of each probe query
    hm = mask.shape[1]
    kept = jnp.take_along_axis(mask, rows[:, None, :, None], axis=2)  # [B, Hm, P, n]
    kept = jnp.repeat(kept, hq // hm, axis=1) if hm in (1, hkv) else kept  # per query head
    kept = jnp.broadcast_to(kept, (b, hq, probes, n))
    return jnp.mean(jnp.sum(p * kept[:, :, :, None, :], axis=-1), axis=-1)


def guard_heads(mask: jax.Array, causal: jax.Array, q: jax.Array, k: jax.Array, geo,
                target: float, probes: int = 2, queries: int = 16) -> jax.Array:
    """``mask`` with every head whose recall on some probe row is below ``target`` replaced
    by ``causal`` (bool [B, 1, nq, n]). mask: bool [B, Hm, nq, n] (Hm in 1, Hkv, Hq); a head
    of a per-KV-head mask fails when any query head of its group does. Returns [B, Hm', nq, n]
    with Hm' = Hq when Hm == 1 (a shared pattern becomes per head), else Hm."""
    recall = probe_recall(mask, q, k, geo, probes, queries).min(axis=-1)  # [B, Hq]
    low = recall < target
    hm = mask.shape[1]
    if hm == 1:
        mask = jnp.broadcast_to(mask, (mask.shape[0], geo.Hq) + mask.shape[2:])
    elif hm != geo.Hq:  # per KV head
        low = low.reshape(low.shape[0], hm, -1).any(axis=-1)
    return jnp.where(low[:, :, None, None], causal, mask)
