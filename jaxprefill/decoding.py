"""Shared generation machinery: prompt encoding, sampling, the jitted prefill and decode steps.

`jp.generate` (contiguous cache), the batch engine (paged caches) and the evaluation drivers all
build on these. The steps are pure functions of `(graphdef, state, ...)` (NNX functional style),
jitted once per shape: callers round prompt and cache lengths up to multiples of `BUCKET`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from jaxprefill.parallel import ContextParallel

BUCKET = 64


def sparse_graphdef(model, sparse):
    """The model's graphdef with AttentionSpec.sparse set (the model itself is left unchanged)."""
    return spec_graphdef(model, "sparse prefill", sparse=sparse)


def context_for(model, mesh: Mesh | None) -> ContextParallel | None:
    """The ring attention a model runs with on ``mesh``: its own `AttentionSpec.context`, else
    one over the mesh's `sequence` axis when that axis has more than one device, else None."""
    current = getattr(getattr(model, "attention", None), "context", None)
    if current is not None:
        if mesh is not None and current.mesh != mesh:
            raise ValueError("the model's ContextParallel mesh is not the mesh it runs on")
        return current
    if mesh is None or mesh.shape.get("sequence", 1) == 1:
        return None
    return ContextParallel(mesh)


def context_graphdef(model, mesh: Mesh):
    """The model's graphdef with :func:`context_for` as its `AttentionSpec.context` (the model
    itself is left unchanged)."""
    ring = context_for(model, mesh)
    if ring is None or ring is model.attention.context:
        return nnx.split(model)[0]
    return spec_graphdef(model, "context parallelism", context=ring)


def spec_graphdef(model, what: str, **fields):
    """The model's graphdef with these AttentionSpec fields replaced."""
    if not hasattr(model, "attention"):
        raise ValueError(f"{type(model).__name__} has no attention spec for {what}")
    if type(model).__name__ not in ("Llama", "DeepSeek"):
        raise NotImplementedError(f"{what} is wired into Llama and DeepSeek models, "
                                  f"not {type(model).__name__}")
    before = model.attention
    try:
        model.attention = dataclasses.replace(before, **fields)
        return nnx.split(model)[0]
    finally:
        model.attention = before


def encode_prompt(tokenizer, prompt, chat: bool) -> list[int]:
    """Token ids of one prompt: ids pass through; text and messages use the tokenizer.

    Callers pass prompts through ``jaxprefill.validate.check_prompt`` first, which returns
    token ids as Python ints: they are copied, not converted again (a 32K prompt: 0.05 ms, not
    2)."""
    if isinstance(prompt, (list, tuple)) and (not prompt or isinstance(prompt[0], (int, np.integer))):
        return list(prompt)
    if tokenizer is None:
        raise ValueError("text prompts need a tokenizer; pass token id lists instead")
    return tokenizer.encode_prompt(prompt, chat=chat or isinstance(prompt, (list, tuple)))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def sample(logits: jax.Array, seeds: jax.Array, steps: jax.Array, temperature: jax.Array,
           top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """Next token per row from logits [B, V]; all other arguments are per row [B].

    temperature 0 -> greedy. Otherwise softmax(logits / temperature) restricted to the top_k
    (0 = all) most likely tokens and to the smallest prefix of them whose mass reaches top_p,
    sampled with key fold_in(key(seed), step): a request samples the same tokens whatever batch,
    slot or engine it runs in.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    rank = jnp.arange(logits.shape[-1])[None, :]
    drop_sorted = ((jnp.cumsum(probs, axis=-1) - probs) >= top_p[:, None]) | (
        (top_k[:, None] > 0) & (rank >= top_k[:, None]))
    sorted_logits = jnp.where(drop_sorted, -jnp.inf, sorted_logits)
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, steps)
    choice = jax.vmap(jax.random.categorical)(keys, sorted_logits)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(4,))
def prefill_step(graphdef, state, tokens, lengths, cache, sampling):
    model = nnx.merge(graphdef, state)
    if getattr(getattr(model, "attention", None), "sparse", None) is not None:
        hidden, cache = model.forward(tokens, cache=cache, lengths=lengths)  # sparse estimation
    else:
        hidden, cache = model.forward(tokens, cache=cache)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return sample(model.logits(last), *sampling.at_step(0)), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(4,))
def decode_step(graphdef, state, token, index, cache, sampling, step):
    model = nnx.merge(graphdef, state)
    hidden, cache = model.forward(token, cache=cache, cache_index=index)
    return sample(model.logits(hidden[:, 0]), *sampling.at_step(step)), cache


def next_tokens(model, hidden: jax.Array, sampling: "Sampling", steps: jax.Array) -> jax.Array:
    """The next token of each row from its last hidden state [N, E]: logits, then `sample`
    with per-row settings (`steps` [N]: each row's decode step, for its PRNG key)."""
    return sample(model.logits(hidden), sampling.seeds, steps, sampling.temperature,
                  sampling.top_p, sampling.top_k)


@struct.dataclass
class Sampling:
    """Per-row sampling settings [B] (a pytree, so one jitted function serves all settings)."""

    seeds: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array

    @classmethod
    def make(cls, n: int, temperature=0.0, top_p=1.0, top_k=0, seed=0) -> "Sampling":
        full = lambda v, dt: np.broadcast_to(np.asarray(v, dt), (n,)).copy()  # noqa: E731
        return cls(full(seed, np.int32), full(temperature, np.float32), full(top_p, np.float32),
                   full(top_k, np.int32))

    def at_step(self, step) -> tuple:
        steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), self.seeds.shape)
        return self.seeds, steps, self.temperature, self.top_p, self.top_k
