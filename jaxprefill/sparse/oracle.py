"""``oracle_topk``: exact attention-mass selection (diagnostic upper bound, not a fast method).

Computes the exact softmax of every query row (in chunks of query blocks), sums the attention
mass of each block and keeps, per query-block row, the sink and the diagonal first, then the
heaviest blocks until ``gamma`` of the row's mass is covered. Its estimation costs as much as
dense attention: use it to measure how far a policy's recall is from the best mask of the same
density.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxprefill.sparse import estimators as est
from jaxprefill.sparse.base import Geometry, Policy


def exact_block_mass(q: jax.Array, k: jax.Array, geo: Geometry) -> jax.Array:
    """float32 [B, Hq, nq, n]: dense attention probability summed over each block (row-local)."""
    return est.block_softmax_scores(est.padded_queries(q, geo), est.padded(k, geo), geo, geo.block,
                                    geo.lengths, geo.scale)


@dataclasses.dataclass(frozen=True)
class OracleTopK(Policy):
    """Exact top mass. Params: gamma (0.95), block_size (128)."""

    name = "oracle_topk"
    rows_exact = True  # exact per-row mass, per-row threshold
    gamma: float = 0.95

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.gamma <= 1:  # a share of the attention mass
            raise ValueError(f"oracle_topk: gamma must be in (0, 1], got {self.gamma}")

    def select(self, q: jax.Array, k: jax.Array, geo: Geometry, layer: int) -> jax.Array:
        mass = exact_block_mass(q, k, geo)
        valid = jnp.broadcast_to(geo.causal(), mass.shape)
        return est.cumulative_keep(mass, valid, self.gamma, forced=geo.forced(), how=geo.estimation)
