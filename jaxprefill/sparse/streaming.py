"""``streaming``: attention sinks + a local window (StreamingLLM A-shape; DuoAttention / LServe
streaming heads; MInference's A-shape pattern).

Static pattern: query block i lists key blocks [0, ceil(sink/block)) and the
ceil(local/block) blocks ending at the diagonal. Defaults are DuoAttention's deployment values
(sink 64, recent 256 tokens) rounded up to whole blocks; MInference's A-shape uses 100 / 800 and
its StreamingLLM baseline 1024 / 4096. Streaming alone cannot retrieve a needle far from the
end of the prompt: it is meant for the heads/layers that do not retrieve.

DuoAttention keeps its *retrieval heads* dense and streams the others. ``head_config`` names a
JSON file ``{"dense_heads": {"<layer>": [kv head, ...]}}`` whose listed KV heads (and their
query heads) get the full causal layout; layers it does not list stream every head.
DuoAttention finds those heads by training a gate per head; ``scripts/tools/search_streaming_heads.py``
instead ranks heads training-free (attention mass outside the window, mass on the needle, or
the answer's deviation from dense when a head streams: see that script).

``n_last`` > 0 (a field of every policy) adds TriangleMix's dense query tail: the query blocks
holding each row's last ``n_last`` queries attend to every earlier key (the generating tokens
see the whole prompt).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp

from jaxprefill.sparse.base import Geometry, Policy


def streaming_blocks(geo: Geometry, sink: int, local: int) -> jax.Array:
    """bool [1 or B, nq, n]: sink blocks plus the local blocks ending at the diagonal, for the
    computed query-block rows (all n, or a window's)."""
    sink_b = -(-sink // geo.block)
    local_b = max(1, -(-local // geo.block))
    i = geo.query_rows()[:, :, None]
    j = jnp.arange(geo.n)[None, None, :]
    return (j < sink_b) | ((j <= i) & (j > i - local_b))


@functools.lru_cache(maxsize=16)
def load_dense_heads(path: str) -> dict[int, tuple[int, ...]]:
    """JSON {"dense_heads": {"<layer>": [kv head ids]}} -> {layer: sorted kv heads}."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data.get("dense_heads"), dict):
        raise ValueError(f"{path}: streaming head config needs a 'dense_heads' object "
                         f"{{layer: [kv heads]}}, got keys {sorted(data)}")
    out = {}
    for layer, heads in data["dense_heads"].items():
        if not all(isinstance(h, int) and h >= 0 for h in heads):
            raise ValueError(f"{path}: layer {layer}: dense heads must be KV head ids >= 0, "
                             f"got {heads}")
        out[int(layer)] = tuple(sorted(set(heads)))
    return out


@dataclasses.dataclass(frozen=True)
class Streaming(Policy):
    """Sink + local window, optionally with dense (retrieval) heads.

    Params: sink (tokens, default 64), local (tokens, default 256), head_config (JSON path of
    the dense KV heads per layer, default None: every head streams), n_last (dense query tail
    in tokens, default 0), block_size (128).
    """

    name = "streaming"
    rows_exact = True  # static pattern: rows of a window are computed directly
    sink: int = 64
    local: int = 256
    head_config: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sink < 0 or self.local < 0:
            raise ValueError(f"streaming: sink and local must be >= 0 (tokens), got "
                             f"{self.sink} and {self.local}")

    def dense_heads(self, layer: int, hkv: int) -> tuple[int, ...]:
        """The KV heads of ``layer`` that keep full causal attention."""
        if self.head_config is None:
            return ()
        heads = load_dense_heads(self.head_config).get(layer, ())
        if heads and heads[-1] >= hkv:
            raise ValueError(f"{self.head_config}: layer {layer} lists KV head {heads[-1]}, "
                             f"the model has {hkv} KV heads")
        return heads

    def layer_key(self, layer: int) -> int:
        return layer if self.head_config is not None else 0

    def select(self, q: jax.Array, k: jax.Array, geo: Geometry, layer: int) -> jax.Array:
        m = jnp.broadcast_to(streaming_blocks(geo, self.sink, self.local)[:, None],
                             (geo.B, geo.Hkv, geo.nq, geo.n))
        dense = self.dense_heads(layer, geo.Hkv)
        if not dense:
            return m
        is_dense = jnp.isin(jnp.arange(geo.Hkv), jnp.asarray(dense))[None, :, None, None]
        return m | (is_dense & geo.causal())
