"""``dense``: every causal block. The baseline, and what short rows fall back to."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxprefill.sparse.base import Geometry, Policy


@dataclasses.dataclass(frozen=True)
class Dense(Policy):
    """All causal blocks (density 1.0). Useful as a per-layer-range entry of a SparseConfig."""

    name = "dense"
    rows_exact = True  # static: a window's rows are the rows of the pattern

    def select(self, q: jax.Array, k: jax.Array, geo: Geometry, layer: int) -> jax.Array:
        return jnp.ones((geo.B, geo.Hkv, geo.nq, geo.n), bool)  # one shared list per KV head
