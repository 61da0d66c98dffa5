"""Pure jitted functions over `(graphdef, state)`: the NNX functional pattern.

`nnx.split` once; every step is a `jax.jit` of a pure function that `nnx.merge`s inside the trace,
so no Python object graph is walked per call.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxprefill.decoding import context_graphdef
from jaxprefill.models import Llama
from jaxprefill.sharding import LOGICAL_RULES, batch_sharding, logical_to_spec, state_shardings


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array,
            positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
    """logits [B, S, V] float32 for tokens [B, S] (positions/segment_ids [B, S] for packing)."""
    return nnx.merge(graphdef, state)(tokens, positions, segment_ids)


def make_forward(model: Llama, mesh: Mesh | None = None) -> Callable[..., jax.Array]:
    """`fn(tokens) -> logits` jitted with explicit shardings on `mesh`.

    Inputs: parameters as laid out by the mesh rules, tokens [B, S] with batch over
    (data, fsdp); output logits [B, S, V] with batch over (data, fsdp) and vocab over tensor.
    A mesh with a `sequence` axis of n > 1 devices runs attention as ring attention over it
    (`jaxprefill.parallel`; the prompt is padded to a multiple of 2n x 128 tokens inside).
    """
    graphdef, state = nnx.split(model)
    if mesh is None:
        return lambda tokens, positions=None, segment_ids=None: forward(
            graphdef, state, tokens, positions, segment_ids)
    graphdef = context_graphdef(model, mesh)
    params = state_shardings(state, mesh)
    state = jax.device_put(state, params)  # no-op when loaded onto this mesh already

    @functools.lru_cache(maxsize=None)
    def compiled(b: int, s: int, packed: bool):
        tok = batch_sharding(mesh, b)
        out = NamedSharding(mesh, logical_to_spec(("batch", None, "vocab"),
                                                  (b, s, model.config.vocab_size), mesh,
                                                  LOGICAL_RULES))
        extra = tok if packed else None
        return jax.jit(lambda st, t, p, g: nnx.merge(graphdef, st)(t, p, g),
                       in_shardings=(params, tok, extra, extra), out_shardings=out)

    def run(tokens, positions=None, segment_ids=None):
        packed = positions is not None or segment_ids is not None
        if packed and (positions is None or segment_ids is None):
            raise ValueError("packed inputs need both positions and segment_ids")
        return compiled(*tokens.shape, packed)(state, tokens, positions, segment_ids)

    return run


__all__ = ["forward", "make_forward"]
