"""Batched text generation with a contiguous KV cache.

Prompts of different lengths share one batch: rows are right-padded, each row's prefill is causal
so padding never leaks into real tokens, and each row decodes at its own cache slot
(`cache_index`). A row therefore produces exactly the tokens it would produce alone.

The jitted pieces are pure functions of `(graphdef, state, ...)` (NNX functional style), cached
by shape: prompt and cache lengths are rounded up to multiples of `BUCKET` to bound recompiles.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from jaxprefill.decoding import (BUCKET, Sampling, context_for, decode_step, encode_prompt,
                                 prefill_step, round_up, spec_graphdef)
from jaxprefill.models import KVCache, Llama
from jaxprefill.sharding import state_shardings
from jaxprefill.validate import InputError, check_prompts, check_sampling


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
             progress: bool = False, sparse=None, mesh: Mesh | None = None) -> Generations:
    """Generate a completion for each prompt (one batch).

    Args:
      prompts: a non-empty list of strings, chat message lists (`[{"role": ..., "content": ...}]`)
        or token id lists (ints in [0, vocab_size)); a bare string is a TypeError.
      chat: render string prompts through the tokenizer's chat template as a user turn.
      temperature: 0 = greedy; otherwise sample from softmax(logits / temperature) after top-k
        (0 = off) and nucleus top-p filtering, with a PRNG seeded by `seed` (per row, so a prompt
        samples the same tokens whatever batch it is in).
      max_new_tokens: >= 1.
      stop: a list of strings that end a completion (excluded from the text).
      eos_token_ids: default: the tokenizer's, else the config's.
      sparse: sparse prefill: a policy name ("flexprefill"), a YAML path, a dict, a
        `jaxprefill.sparse.Policy` or `SparseConfig` (see jaxprefill.sparse). Decode stays dense.
      mesh: a device mesh (`jaxprefill.make_mesh`): parameters are laid out by its rules. A
        `sequence` axis of n > 1 devices runs the prefill as ring attention over it
        (`jaxprefill.parallel`) over the whole cache length (a multiple of 2n x 128 tokens),
        and Llama-family models keep their cache split over that axis and decode against it
        by flash-decoding (DeepSeek's paged latent cache stays whole: docs/context_parallel.md).
    Returns:
      Generations (a list of GenerationResult, with `.stats`).
    Raises:
      PromptTooLongError if a prompt plus max_new_tokens exceeds the model's context.
      jaxprefill.validate.InputError (a ValueError; InputTypeError is also a TypeError) naming
      the argument: temperature < 0, top_p outside (0, 1], top_k < 0, max_new_tokens < 1, a
      non-integer seed, stop not a list of strings, a token id outside [0, vocab_size), an empty
      prompt list or prompt.
    """
    cfg = model.config
    prompts = check_prompts(prompts, cfg.vocab_size)
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   top_k=top_k, seed=seed, stop=stop)
    ids = [encode_prompt(tokenizer, p, chat) for p in prompts]
    for i, row in enumerate(ids):
        if not row:
            raise InputError(f"prompt {i} is empty after tokenization: give some text")
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
    ring = context_for(model, mesh)
    if ring is not None:
        mesh = ring.mesh  # a model built with a context setting brings its mesh
        # The prefill spans the whole cache, so each device's natural-order K/V shard is the
        # cache shard it keeps for decoding (no data moves between the two).
        cache_len = prompt_len = ring.padded_length(cache_len)
    tokens = np.zeros((batch, prompt_len), np.int32)
    for i, row in enumerate(ids):
        tokens[i, :len(row)] = row

    graphdef, state = nnx.split(model)
    fields = {} if sparse is None else {"sparse": sparse}
    if ring is not None and model.attention.context is None:
        fields["context"] = ring
    if fields:
        graphdef = spec_graphdef(model, "generation", **fields)
    sampling = Sampling.make(batch, temperature, top_p, top_k, seed)

    t0 = time.perf_counter()
    cache_class = getattr(model, "cache_class", KVCache)  # DeepSeek: paged latent cache
    cache = cache_class.zeros(cfg, batch, cache_len, model.dtype,
                              **getattr(model, "cache_options", {}))
    if mesh is not None:
        state = jax.device_put(state, state_shardings(state, mesh))
        cache = jax.device_put(cache, cache_sharding(cache, mesh, ring, cfg))
    next_tok, cache = prefill_step(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), cache,
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
        next_tok, cache = decode_step(graphdef, state, jnp.asarray(next_tok[:, None]),
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


def cache_sharding(cache, mesh: Mesh, ring, cfg):
    """Shardings of a fresh cache on ``mesh``: a contiguous KVCache split over the ring axis
    (batch and heads as the ring splits them); anything else replicated."""
    if ring is None or not isinstance(cache, KVCache):
        return jax.tree.map(lambda _: NamedSharding(mesh, P()), cache)
    b = cache.k[0].shape[0]
    spec = P(ring.batch_axes(b), ring.axis, ring.head_axis(cfg.num_heads, cfg.num_kv_heads), None)
    return jax.tree.map(lambda _: NamedSharding(mesh, spec), cache)


def _hits_stop(tokenizer, generated: list[int], stop: Sequence[str]) -> bool:
    text = tokenizer.decode(generated)
    return any(s in text for s in stop)


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stop if s in text), default=len(text))
    return text[:cut]
