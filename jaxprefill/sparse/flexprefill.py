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
max_budget None, block 128. gamma is in (0, 1]; 1 gives the dense layout. The original
asserts batch 1; here rows have their own lengths and budgets.

Row windows (chunked prefill, :meth:`Policy.build_rows`): steps 1-5 read the row's last query
block (the window's end) and are exact; step 6's pooled softmax is row-local but its threshold
is global over all query blocks. The rows before the window hold zero queries (as in the
whole-prefix chunk path), so their pooled softmax is uniform, 1/(i+1) over i+1 causal blocks:
:func:`keep_after_uniform_prefix` adds them to the threshold analytically, without their
[row0, n] block matrix.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pallas_kernels import estimation
from jaxprefill.sparse import estimators as est
from jaxprefill.sparse import select
from jaxprefill.sparse.base import Geometry, Policy
from jaxprefill.sparse.estimation import Estimation


def js_distance(p: jax.Array, q: jax.Array, eps: float = 1e-10) -> jax.Array:
    """sqrt(Jensen-Shannon divergence) along the last axis (natural log)."""
    m = 0.5 * (p + q)
    kl = lambda a, b: jnp.sum(jnp.where(a > 0, a * (jnp.log(a + eps) - jnp.log(b + eps)), 0.0),  # noqa: E731
                              axis=-1)
    return jnp.sqrt(jnp.maximum(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0))


def mass_count(x: jax.Array, valid: jax.Array, gamma: float, *, how: Estimation) -> jax.Array:
    """Number of largest entries of x [..., S] whose cumulative sum stays <= gamma (valid only).
    Threshold search (no sort; :func:`mass_count_sort` is the reference); its cut runs on the
    estimation kernel where ``how`` gives one (GPUs), else on the XLA search."""
    if not how.sort:
        return select.mass_count(x, valid, gamma, how=how)
    return mass_count_sort(x, valid, gamma)


def mass_count_sort(x: jax.Array, valid: jax.Array, gamma: float) -> jax.Array:
    """Sort-based :func:`mass_count`."""
    if gamma >= 1.0:
        return valid.sum(-1)
    srt = -jnp.sort(-jnp.where(valid, x, 0.0), axis=-1)
    return jnp.sum((jnp.cumsum(srt, axis=-1) <= gamma) & (srt > 0), axis=-1)


def uniform_prefix(geo: Geometry) -> tuple[jax.Array, jax.Array]:
    """The pooled softmax rows before a window (zero queries): (value float32 [1, n] = 1/(i+1),
    as softmax computes it, and multiplicity float32 [B, n] = i+1 for rows i < row0, else 0)."""
    i = jnp.arange(geo.n, dtype=jnp.int32)[None, :]
    value = 1.0 / (i + 1).astype(jnp.float32)
    count = jnp.where(i < geo.row0[:, None], i + 1, 0).astype(jnp.float32)
    return value, count


def _prefix_above(pkey: jax.Array, pmass: jax.Array, u: jax.Array) -> jax.Array:
    """float32 [B, H, C]: the prefix mass pmass [B, H, P] whose keys pkey [B, H, P] are strictly
    above each candidate cut u uint32 [B, H, C]."""
    return jnp.sum(jnp.where(select.above(pkey, u), pmass[..., None, :], 0.0), axis=-1)


def prefix_cut_operands(s: jax.Array, pv: jax.Array, pcount: jax.Array,
                        pmass: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The weighted mass cut's (values, weights) [B, H, P + M] over [prefix; scores]: a prefix
    entry is ordered by its value pv and weighs its mass pmass (0 for both past row0, where
    pcount is 0: never above a cut); a score is both."""
    live = pcount > 0
    return (jnp.concatenate([jnp.where(live, pv, 0.0), s], axis=-1),
            jnp.concatenate([jnp.where(live, pmass, 0.0), s], axis=-1))


def uniform_prefix_cut(s: jax.Array, valid: jax.Array, pv: jax.Array, pcount: jax.Array,
                       pmass: jax.Array, goal: jax.Array, *, how: Estimation) -> jax.Array:
    """uint32 [B, H]: the cut of :func:`keep_after_uniform_prefix`, the smallest key U
    (``select.sort_key``) with (mass of the prefix entries and valid scores above U) < goal.

    s, valid [B, H, M] (s 0 where invalid); pv, pcount, pmass [B, H, P]: the prefix values,
    their counts and masses pv x pcount. A prefix entry is ordered by its value but weighs its
    mass, so where ``how`` gives a kernel (GPUs) this is one weighted mass cut
    (:func:`pallas_kernels.estimation.mass_cut`) over [prefix; scores], else the XLA radix
    search. Both return the same key (sums differ in float order only): ties at the cut are
    the caller's.
    """
    rows = math.prod(s.shape[:-1])
    impl = how.backend("mass_cut", columns=pv.shape[-1] + s.shape[-1], rows=rows, weighted=True)
    if impl != "xla":
        values, weights = prefix_cut_operands(s, pv, pcount, pmass)
        base = jnp.zeros(goal.shape, jnp.float32)
        return estimation.mass_cut(values, base, goal.astype(jnp.float32), weights, impl=impl,
                                   interpret=how.interpret)
    key, pkey = select.sort_key(s), select.sort_key(pv)

    def cond(u):  # mass strictly above u < goal (as select.cumulative_keep); u [B, H, C]
        hit = valid[..., None, :] & select.above(key, u)
        mass = jnp.sum(jnp.where(hit, s[..., None, :], 0.0), axis=-1)
        return mass + _prefix_above(pkey, pmass, u) < goal[..., None]

    return select._search(cond, s.shape[:-1])


def keep_after_uniform_prefix(scores: jax.Array, valid: jax.Array, gamma: float,
                              value: jax.Array, count: jax.Array, *,
                              how: Estimation) -> jax.Array:
    """:func:`estimators.cumulative_keep` (no forced entries) of the concatenation [prefix
    entries; scores], returned for the scores only: bool [B, H, M].

    scores, valid [B, H, M]; the prefix has count[b, i] entries of value[0, i] each (value,
    count [1 or B, P]), all before the scores in index order (the rows before the window).
    Same threshold / sort semantics as the whole-prompt call; sums differ in float order only.
    The threshold search (not the sort) finds its cut as :func:`uniform_prefix_cut`: the
    weighted mass-cut kernel where ``how`` gives one (GPUs), else the XLA search.
    """
    if gamma >= 1.0:
        return valid
    s = jnp.where(valid, scores, 0.0).astype(jnp.float32)
    pshape = s.shape[:-1] + (count.shape[-1],)  # [B, H, P]
    pmass = jnp.broadcast_to((value * count)[:, None, :], pshape)  # prefix row mass (~1 or 0)
    pv = jnp.broadcast_to(value[:, None, :], pshape)
    pcount = jnp.broadcast_to(count[:, None, :], pshape)
    goal = gamma * (jnp.sum(s, axis=-1) + jnp.sum(pmass, axis=-1))  # [B, H]
    if how.sort:
        # Stable sort of [prefix; scores] by value: ties keep the prefix first (lower index).
        prio = jnp.concatenate([jnp.where(pcount > 0, pv, -1.0),
                                jnp.where(valid, s, -1.0)], axis=-1)
        mass = jnp.concatenate([pmass, s], axis=-1)
        order = jnp.argsort(-prio, axis=-1, stable=True)
        sorted_mass = jnp.take_along_axis(mass, order, axis=-1)
        before = jnp.cumsum(sorted_mass, axis=-1) - sorted_mass
        keep = jnp.put_along_axis(jnp.zeros(prio.shape, bool), order,
                                  before < goal[..., None], axis=-1, inplace=False)
        return keep[..., pshape[-1]:] & valid
    key, pkey = select.sort_key(s), select.sort_key(pv)
    cut = uniform_prefix_cut(s, valid, pv, pcount, pmass, goal, how=how)
    gt = valid & (key > cut[..., None])
    eq = valid & (key == cut[..., None])
    before = (jnp.sum(jnp.where(gt, s, 0.0), axis=-1)
              + _prefix_above(pkey, pmass, cut[..., None])[..., 0])
    # earlier entries tied at the cut: the prefix's ties, then the scores' own
    ties = jnp.sum(jnp.where(pkey == cut[..., None], pcount, 0.0), axis=-1)
    rank = (select.prefix_count(eq) - 1).astype(jnp.float32) + ties[..., None]
    return gt | (eq & (before[..., None] + s * rank < goal[..., None]))


@dataclasses.dataclass(frozen=True)
class FlexPrefill(Policy):
    """FlexPrefill. Params: gamma (0.95), tau (0.1), min_budget (1024 tokens), max_budget
    (None), block_size (128)."""

    name = "flexprefill"
    rows_exact = True  # see the module docstring (global threshold: uniform prefix rows)
    gamma: float = 0.95
    tau: float = 0.1
    min_budget: int = 1024
    max_budget: int | None = None
    n_last: int = 128  # the dense query tail (Policy.n_last); 0 gives the paper's layout

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.gamma <= 1:  # a share of the attention mass
            raise ValueError(f"flexprefill: gamma must be in (0, 1], got {self.gamma}")
        if self.tau < 0:  # a Jensen-Shannon distance threshold
            raise ValueError(f"flexprefill: tau must be >= 0, got {self.tau}")
        if self.min_budget < 0 or (self.max_budget is not None and self.max_budget < 1):
            raise ValueError(f"flexprefill: min_budget must be >= 0 and max_budget >= 1 or None "
                             f"(tokens), got {self.min_budget} and {self.max_budget}")

    def select(self, q: jax.Array, k: jax.Array, geo: Geometry, layer: int) -> jax.Array:
        bsz = geo.block
        vert, slash = est.last_q_sums(q, k, geo, bsz)  # [B, Hq, S] each
        nrows = jnp.minimum(geo.lengths, bsz).astype(jnp.float32)[:, None, None]
        vert = vert / nrows  # sums to 1 over valid keys
        slash = slash / nrows
        tok_ok = (jnp.arange(geo.S)[None, :] < geo.lengths[:, None])[:, None]  # [B, 1, S]
        nb = geo.row_blocks()[:, None]  # [B, 1]
        lo = -(-self.min_budget // bsz)
        hi = geo.n if self.max_budget is None else -(-self.max_budget // bsz)

        def budget(x):
            return jnp.clip(mass_count(x, tok_ok, self.gamma, how=geo.estimation) // bsz + 1, lo, hi)

        n_v, n_s = budget(jnp.stack([vert, slash]))  # [B, Hq] blocks each, one search

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

        # key blocks by vertical mass and block-diagonal bands by slash mass, [B, Hq, n] each
        vert_blocks, sel_band = est.topk_mask(
            jnp.stack([est.block_sum(vert, geo), est.block_sum(slash, geo)]),
            blk_ok[None, :, None], jnp.stack([n_v, n_s]), how=geo.estimation)
        sel_diag = sel_band | jnp.pad(sel_band, ((0, 0), (0, 0), (1, 0)))[..., :geo.n]
        vs = vert_blocks[:, :, None, :] | est.diagonal_blocks(sel_diag, geo)

        # Query-aware blocks: global cumulative threshold over the pooled block matrix.
        qp = est.pool_query_blocks(q, geo)
        causal = geo.causal()  # [B, 1, nq, n]
        s = jnp.where(causal, est.grouped_logits(qp, kp) * geo.scale, -jnp.inf)
        pb = jnp.where(causal, jax.nn.softmax(s, axis=-1), 0.0)  # [B, Hq, nq, n]
        flat_ok = jnp.broadcast_to(causal, pb.shape).reshape(geo.B, geo.Hq, -1)
        if geo.row0 is None:
            qa = est.cumulative_keep(pb.reshape(geo.B, geo.Hq, -1), flat_ok, self.gamma,
                                     how=geo.estimation)
        else:  # the rows before the window join the global threshold analytically
            qa = keep_after_uniform_prefix(pb.reshape(geo.B, geo.Hq, -1), flat_ok, self.gamma,
                                           *uniform_prefix(geo), how=geo.estimation)
        qa = qa.reshape(pb.shape) & query_aware[:, :, None, None]
        return vs | qa
