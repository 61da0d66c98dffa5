"""``streaming``: attention sinks + a local window (StreamingLLM A-shape; DuoAttention / LServe
streaming heads; MInference's A-shape pattern).

Static pattern: query block i lists key blocks [0, ceil(sink/block)) and the
ceil(local/block) blocks ending at the diagonal. Defaults are DuoAttention's deployment values
(sink 64, recent 256 tokens) rounded up to whole blocks; MInference's A-shape uses 100 / 800 and
its StreamingLLM baseline 1024 / 4096. Streaming alone cannot retrieve a needle far from the
end of the prompt: it is meant for the heads/layers that do not retrieve (see trianglemix).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxprefill.sparse.base import Geometry, Policy
from jaxprefill.sparse.registry import register


def streaming_blocks(geo: Geometry, sink: int, local: int) -> jax.Array:
    """bool [1 or B, nq, n]: sink blocks plus the local blocks ending at the diagonal, for the
    computed query-block rows (all n, or a window's)."""
    sink_b = -(-sink // geo.block)
    local_b = max(1, -(-local // geo.block))
    i = geo.query_rows()[:, :, None]
    j = jnp.arange(geo.n)[None, None, :]
    return (j < sink_b) | ((j <= i) & (j > i - local_b))


@register
@dataclasses.dataclass(frozen=True)
class Streaming(Policy):
    """Sink + local window.

    Params: sink (tokens, default 64), local (tokens, default 256), block_size (128).
    """

    name = "streaming"
    rows_exact = True  # static pattern: rows of a window are computed directly
    sink: int = 64
    local: int = 256

    def select(self, q: jax.Array, k: jax.Array, geo: Geometry, layer: int) -> jax.Array:
        m = streaming_blocks(geo, self.sink, self.local)
        return jnp.broadcast_to(m[:, None], (geo.B, geo.Hkv, geo.nq, geo.n))
