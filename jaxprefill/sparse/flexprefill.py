"""``flexprefill``: FlexPrefill (ICLR'25), per-head choice between query-aware and
vertical-slash patterns with cumulative-attention budgets.

Per query head (block B = block_size, default 128), following the official code:
1. softmax(Q̂ K^T / sqrt(D) + causal) of the row's last B queries (float32).
2. Vertical v_j = mean over those queries; slash s_o = mean diagonal sums (offset o = i - j).
3. Budgets: n_v = (#largest entries of v whose cumsum <= gamma) // B + 1 blocks, same for the
   slash; clamped to [ceil(min_budget / B), ceil(max_budget / B)].
4. Pattern test: â = softmax(mean(Q̂) · avgpool_B(K)^T / sqrt(D)) (estimated block distribution),
   ā = block sums of v (true); D = sqrt(JSD(â, ā)). D < tau -> query-aware head.
5. Vertical-slash head: top n_v key blocks by block-summed v, top n_s block diagonals by
   block-summed s (a diagonal band of B offsets covers block diagonals d and d + 1).
6. Query-aware head: VS budgets at their minimum, plus P = row-softmax(Q̄ K̄^T / sqrt(D) +
   block causal) over mean-pooled blocks, flattened over the whole block matrix, sorted, kept
   while the cumulative mass stays below gamma * (number of query blocks) (global, not per row).

Defaults: gamma 0.95 (RULER scripts for Llama-3.1-8B), tau 0.1, min_budget 1024 tokens,
max_budget None, block 128. gamma >= 1 gives the dense layout. The original asserts batch 1;
here rows have their own lengths and budgets.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxprefill.sparse import estimators as est
from jaxprefill.sparse import select
from jaxprefill.sparse.base import Geometry, Policy
from jaxprefill.sparse.registry import register


def js_distance(p: jax.Array, q: jax.Array, eps: float = 1e-10) -> jax.Array:
    """sqrt(Jensen-Shannon divergence) along the last axis (natural log)."""
    m = 0.5 * (p + q)
    kl = lambda a, b: jnp.sum(jnp.where(a > 0, a * (jnp.log(a + eps) - jnp.log(b + eps)), 0.0),  # noqa: E731
                              axis=-1)
    return jnp.sqrt(jnp.maximum(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0))


def mass_count(x: jax.Array, valid: jax.Array, gamma: float) -> jax.Array:
    """Number of largest entries of x [..., S] whose cumulative sum stays <= gamma (valid only).
    Threshold search (no sort; :func:`mass_count_sort` is the reference)."""
    if not select.use_sort():
        return select.mass_count(x, valid, gamma)
    return mass_count_sort(x, valid, gamma)


def mass_count_sort(x: jax.Array, valid: jax.Array, gamma: float) -> jax.Array:
    """Sort-based :func:`mass_count`."""
    if gamma >= 1.0:
        return valid.sum(-1)
    srt = -jnp.sort(-jnp.where(valid, x, 0.0), axis=-1)
    return jnp.sum((jnp.cumsum(srt, axis=-1) <= gamma) & (srt > 0), axis=-1)


@register
@dataclasses.dataclass(frozen=True)
class FlexPrefill(Policy):
    """FlexPrefill. Params: gamma (0.95), tau (0.1), min_budget (1024 tokens), max_budget
    (None), block_size (128)."""

    name = "flexprefill"
    gamma: float = 0.95
    tau: float = 0.1
    min_budget: int = 1024
    max_budget: int | None = None

    def select(self, q: jax.Array, k: jax.Array, geo: Geometry, layer: int) -> jax.Array:
        bsz = geo.block
        p = est.last_q_probs(q, k, geo, bsz)  # [B, Hq, bsz, S]
        nrows = jnp.minimum(geo.lengths, bsz).astype(jnp.float32)[:, None, None]
        vert = p.sum(axis=2) / nrows  # [B, Hq, S], sums to 1 over valid keys
        slash = est.slash_sums(p, geo, bsz) / nrows
        tok_ok = (jnp.arange(geo.S)[None, :] < geo.lengths[:, None])[:, None]  # [B, 1, S]
        nb = geo.row_blocks()[:, None]  # [B, 1]
        lo = -(-self.min_budget // bsz)
        hi = geo.n if self.max_budget is None else -(-self.max_budget // bsz)

        def budget(x):
            return jnp.clip(mass_count(x, tok_ok, self.gamma) // bsz + 1, lo, hi)

        n_v, n_s = budget(vert), budget(slash)  # [B, Hq] blocks

        # Pattern test: estimated vs true block distribution of the last query block.
        blk_ok = jnp.arange(geo.n)[None, :] < nb  # [B, n]
        ql, _ = est.last_queries(q, geo, bsz)
        qmask = (jnp.arange(bsz)[None, :] >= bsz - geo.lengths[:, None])[:, :, None, None]
        qmean = jnp.sum(jnp.where(qmask, ql.astype(jnp.float32), 0.0), axis=1, keepdims=True)
        qmean = qmean / nrows[:, :, :, None].reshape(geo.B, 1, 1, 1)
        kp = est.pool_blocks(k, geo)  # [B, n, Hkv, D]
        s_est = est.grouped_logits(qmean, kp)[:, :, 0] * geo.scale  # [B, Hq, n]
        a_est = jax.nn.softmax(jnp.where(blk_ok[:, None], s_est, -jnp.inf), axis=-1)
        a_true = est.block_sum(vert, geo)
        query_aware = js_distance(a_est, a_true) < self.tau  # [B, Hq]
        n_v = jnp.where(query_aware, lo, n_v)
        n_s = jnp.where(query_aware, lo, n_s)

        vert_blocks = est.topk_mask(est.block_sum(vert, geo), blk_ok[:, None], n_v)  # [B,Hq,n]
        band = est.block_sum(slash, geo)  # [B, Hq, n] by block-diagonal band
        sel_band = est.topk_mask(band, blk_ok[:, None], n_s)
        sel_diag = sel_band | jnp.pad(sel_band, ((0, 0), (0, 0), (1, 0)))[..., :geo.n]
        vs = vert_blocks[:, :, None, :] | est.diagonal_blocks(sel_diag, geo)

        # Query-aware blocks: global cumulative threshold over the pooled block matrix.
        qp = est.pool_blocks(q, geo)
        causal = geo.causal()  # [B, 1, n, n]
        s = jnp.where(causal, est.grouped_logits(qp, kp) * geo.scale, -jnp.inf)
        pb = jnp.where(causal, jax.nn.softmax(s, axis=-1), 0.0)  # [B, Hq, n, n]
        flat_ok = jnp.broadcast_to(causal, pb.shape).reshape(geo.B, geo.Hq, -1)
        qa = est.cumulative_keep(pb.reshape(geo.B, geo.Hq, -1), flat_ok, self.gamma)
        qa = qa.reshape(pb.shape) & query_aware[:, :, None, None]
        return vs | qa
