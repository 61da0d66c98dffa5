"""``trianglemix``: TriangleMix (arXiv 2507.21526), a composition over layers.

Layers < start_layer: dense. Layers >= start_layer: "triangle": every query block attends the
sink (n_init tokens) and a local window (n_local tokens) only, except the query blocks holding
the row's last n_last queries, which attend densely (the answer is produced there; the shared
dense tail of every policy, ``Policy.n_last``). Static pattern: no estimation. One list per KV
head.

Defaults (README, Llama-3.1-8B, 32 layers): start_layer 16, n_init 8, n_local 512, n_last 128.
Block 128; sink and local windows round up to whole blocks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxprefill.sparse.base import Geometry, Policy
from jaxprefill.sparse.streaming import streaming_blocks


@dataclasses.dataclass(frozen=True)
class TriangleMix(Policy):
    """TriangleMix. Params: start_layer (16), n_init (8), n_local (512), n_last (128),
    block_size (128)."""

    name = "trianglemix"
    rows_exact = True  # static per row (the dense tail depends on lengths only)
    start_layer: int = 16
    n_init: int = 8
    n_local: int = 512
    n_last: int = 128  # the dense tail (Policy.finish applies it)

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.start_layer, self.n_init, self.n_local) < 0:
            raise ValueError(f"trianglemix: start_layer, n_init and n_local must be >= 0, got "
                             f"{self.start_layer}, {self.n_init} and {self.n_local}")

    def layer_key(self, layer: int) -> int:
        return min(layer, self.start_layer)

    def select(self, q: jax.Array, k: jax.Array, geo: Geometry, layer: int) -> jax.Array:
        if layer < self.start_layer:
            return jnp.ones((geo.B, geo.Hkv, geo.nq, geo.n), bool)
        tri = streaming_blocks(geo, self.n_init, self.n_local)[:, None]  # [1 or B, 1, nq, n]
        return jnp.broadcast_to(tri, (geo.B, geo.Hkv, geo.nq, geo.n))
