"""Batched text generation with a contiguous KV cache.

Prompts of different lengths share one batch: rows are right-padded, each row's prefill is causal
so padding never leaks into real tokens, and each row decodes at its own cache slot
(`cache_index`). A row therefore produces exactly the tokens it would produce alone.

The jitted pieces are pure functions of `(graphdef, state, ...)` (NNX functional style), cached
by shape: prompt and cache lengths are rounded up to multiples of `BUCKET` to bound recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from tqdm.auto import tqdm

from jaxprefill.models import KVCache, Llama

BUCKET = 64


class PromptTooLongError(ValueError):
    """A prompt (plus the tokens to generate) does not fit the model's context."""


@dataclasses.dataclass
class GenerationResult:
    """One completion. `tokens`: generated ids (stop/eos token excluded)."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos" | "stop" | "length"


@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / max(self.prefill_s, 1e-9)

    @property
    def decode_tok_s(self) -> float:
        return self.generated_tokens / max(self.decode_s, 1e-9)


class Generations(list):
    """A list of GenerationResult with `.stats` (GenerationStats) for the batch."""

    stats: GenerationStats


def generate(model: Llama, tokenizer, prompts: Sequence[str | list[dict] | Sequence[int]], *,
             max_new_tokens: int = 64, chat: bool = False, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             stop: Sequence[str] | None = None, eos_token_ids: Sequence[int] | None = None,
             progress: bool = False, sparse=None) -> Generations:
    """Generate a completion for each prompt (one batch).

    Args:
      prompts: strings, chat message lists (`[{"role": ..., "content": ...}]`), or token id lists.
      chat: render string prompts through the tokenizer's chat template as a user turn.
      temperature: 0 = greedy; otherwise sample from softmax(logits / temperature) after top-k
        (0 = off) and nucleus top-p filtering, with a PRNG seeded by `seed` (per row, so a prompt
        samples the same tokens whatever batch it is in).
      stop: strings that end a completion (excluded from the text).
      eos_token_ids: default: the tokenizer's, else the config's.
      sparse: sparse prefill: a policy name ("flexprefill"), a YAML path, a dict, a
        `jaxprefill.sparse.Policy` or `SparseConfig` (see jaxprefill.sparse). Decode stays dense.
    Returns:
      Generations (a list of GenerationResult, with `.stats`).
    Raises:
      PromptTooLongError if a prompt plus max_new_tokens exceeds the model's context.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = model.config
    ids = [encode_prompt(tokenizer, p, chat) for p in prompts]
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompt {i} is empty after tokenization")
        if len(row) + max_new_tokens > cfg.max_position_embeddings:
            raise PromptTooLongError(
                f"prompt {i} has {len(row)} tokens; with max_new_tokens={max_new_tokens} it needs "
                f"{len(row) + max_new_tokens} positions but the model's context is "
                f"{cfg.max_position_embeddings}")
    if eos_token_ids is None:
        eos_token_ids = (tokenizer.eos_token_ids if tokenizer is not None else ()) or cfg.eos_token_ids
    eos = set(int(e) for e in eos_token_ids)

    batch, lengths = len(ids), np.array([len(r) for r in ids], np.int32)
    prompt_len = round_up(int(lengths.max()), BUCKET)
    cache_len = min(round_up(prompt_len + max_new_tokens, BUCKET),
                    max(cfg.max_position_embeddings, prompt_len + max_new_tokens))
    tokens = np.zeros((batch, prompt_len), np.int32)
    for i, row in enumerate(ids):
        tokens[i, :len(row)] = row

    graphdef, state = nnx.split(model)
    if sparse is not None:
        graphdef = _sparse_graphdef(model, sparse)
    sampling = Sampling.make(batch, temperature, top_p, top_k, seed)

    t0 = time.perf_counter()
    cache_class = getattr(model, "cache_class", KVCache)  # DeepSeek: paged latent cache
    cache = cache_class.zeros(cfg, batch, cache_len, model.dtype)
    next_tok, cache = _prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                               sampling)
    next_tok = np.asarray(next_tok)
    t1 = time.perf_counter()

    out: list[list[int]] = [[] for _ in range(batch)]
    finish = [None] * batch
    index = lengths.copy()  # cache slot of each row's next token
    steps = tqdm(range(max_new_tokens), desc="decode", disable=not progress, leave=False)
    for step in steps:
        for b in range(batch):
            if finish[b] is None:
                tok = int(next_tok[b])
                if tok in eos:
                    finish[b] = "eos"
                    continue
                out[b].append(tok)
                if stop and tokenizer is not None and _hits_stop(tokenizer, out[b], stop):
                    finish[b] = "stop"
        if all(f is not None for f in finish) or step == max_new_tokens - 1:
            break
        next_tok, cache = _decode(graphdef, state, jnp.asarray(next_tok[:, None]),
                                  jnp.asarray(index), cache, sampling, step + 1)
        next_tok = np.asarray(next_tok)
        index += 1
    t2 = time.perf_counter()

    results = Generations()
    for b in range(batch):
        text = tokenizer.decode(out[b]) if tokenizer is not None else ""
        if finish[b] == "stop":
            text = _cut_at_stop(text, stop)
        results.append(GenerationResult(text, out[b], int(lengths[b]), finish[b] or "length"))
    results.stats = GenerationStats(int(lengths.sum()), sum(len(o) for o in out), t1 - t0, t2 - t1)
    return results


def _sparse_graphdef(model, sparse):
    """The model's graphdef with AttentionSpec.sparse set (the model itself is left unchanged)."""
    if not hasattr(model, "attention"):
        raise ValueError(f"{type(model).__name__} has no attention spec to make sparse")
    if type(model).__name__ not in ("Llama", "DeepSeek"):
        raise NotImplementedError(f"sparse prefill is wired into Llama and DeepSeek models, "
                                  f"not {type(model).__name__}")
    dense = model.attention
    try:
        model.attention = dataclasses.replace(dense, sparse=sparse)
        return nnx.split(model)[0]
    finally:
        model.attention = dense


def encode_prompt(tokenizer, prompt, chat: bool) -> list[int]:
    """Token ids of one prompt: ids pass through; text and messages use the tokenizer."""
    if isinstance(prompt, (list, tuple)) and (not prompt or isinstance(prompt[0], (int, np.integer))):
        return [int(t) for t in prompt]
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
def _prefill(graphdef, state, tokens, lengths, cache, sampling):
    model = nnx.merge(graphdef, state)
    if getattr(getattr(model, "attention", None), "sparse", None) is not None:
        hidden, cache = model.forward(tokens, cache=cache, lengths=lengths)  # sparse estimation
    else:
        hidden, cache = model.forward(tokens, cache=cache)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return sample(model.logits(last), *sampling.at_step(0)), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(4,))
def _decode(graphdef, state, token, index, cache, sampling, step):
    model = nnx.merge(graphdef, state)
    hidden, cache = model.forward(token, cache=cache, cache_index=index)
    return sample(model.logits(hidden[:, 0]), *sampling.at_step(step)), cache


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


def _hits_stop(tokenizer, generated: list[int], stop: Sequence[str]) -> bool:
    text = tokenizer.decode(generated)
    return any(s in text for s in stop)


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stop if s in text), default=len(text))
    return text[:cut]
