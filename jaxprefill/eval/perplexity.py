"""Held-out perplexity against context length: per-token NLL of a dense causal forward, and the
perplexities read from it.

* :func:`token_nll`: the negative log-likelihood of every next token of a row, from one dense
  forward (the final hidden states of :func:`jaxprefill.train.step.hidden_states`) and the output
  projection + log-softmax in chunks of positions, so the [S, vocab] float32 logits of a whole
  row never exist at once (32768 x 49152 x 4 bytes = 6.4 GB for SmolLM2 at 32K).
* :func:`context_perplexity`: perplexity "at evaluation context window L" as the Position
  Interpolation and YaRN papers report it: every document truncated to its first L tokens, the
  L next-token predictions of those tokens pooled. Attention is causal, so the NLL of the first
  L predictions of a long row equals that of a forward over the truncated row: one forward at
  the longest length gives every shorter L.
* :func:`position_buckets`: perplexity of the predictions made at positions [a, b), which
  shows directly whether far context helps (it falls with the position when it does).

Indexing: for a row of S tokens, ``nll[:, p]`` is -log P(token p+1 | tokens 0..p): the prediction
made at position p, seeing p+1 tokens. A window of L tokens makes the predictions p < L.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprefill.train.step import hidden_states

CHUNK = 2048  # positions per output-projection step: [B, 2048, 49152] float32 = 400 MB per row


@functools.partial(jax.jit, static_argnums=(0, 3))
def _token_nll(graphdef, state, tokens: jax.Array, chunk: int) -> jax.Array:
    model = nnx.merge(graphdef, state)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # the last token is only ever a target
    hidden = hidden_states(model, inputs, None, None, "none")  # [B, S-1, E], plain causal
    b, n, e = hidden.shape
    steps = -(-n // chunk)
    pad = steps * chunk - n  # padded positions are computed and dropped
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, steps, chunk, e)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, steps, chunk)

    def step(xs):
        h, t = xs  # [B, C, E], [B, C]
        logits = model.logits(h)  # float32 [B, C, V]
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - target_logit

    nll = jax.lax.map(step, (hidden.swapaxes(0, 1), targets.swapaxes(0, 1)))  # [steps, B, C]
    return nll.swapaxes(0, 1).reshape(b, steps * chunk)[:, :n]


def token_nll(model, tokens, chunk: int = CHUNK) -> jax.Array:
    """Next-token negative log-likelihoods of a dense causal forward.

    Args:
      model: a jaxprefill decoder (Llama family or DeepSeek) with a dense AttentionSpec.
      tokens: int32 [B, S], S >= 2: whole rows (no padding: every position is predicted).
      chunk: positions per output-projection step (memory: B x chunk x vocab float32 logits).
    Returns:
      float32 [B, S-1]: ``nll[b, p] = -log P(tokens[b, p+1] | tokens[b, :p+1])``.
    """
    if getattr(getattr(model, "attention", None), "sparse", None) is not None:
        raise ValueError("token_nll needs a dense model (AttentionSpec.sparse is set)")
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [B, S] with S >= 2, got shape {tuple(tokens.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    graphdef, state = nnx.split(model)
    return _token_nll(graphdef, state, tokens, min(chunk, tokens.shape[1] - 1))


def _nll_array(nll) -> np.ndarray:
    arr = np.asarray(nll, np.float64)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise ValueError(f"nll must be [N, S-1] with S >= 2, got shape {arr.shape}")
    return arr


def context_perplexity(nll, lengths: Sequence[int]) -> dict[int, float]:
    """{L: perplexity} with every row truncated to its first L tokens.

    nll: [N, S-1] from :func:`token_nll` (rows of equal length). The window of L tokens makes
    the predictions at positions 0..L-1, so L may be at most S-1 (a row of L+1 tokens gives the
    last of them its target). Perplexity = exp(mean NLL over the N x L predictions): documents
    count equally since each contributes L predictions.
    """
    arr = _nll_array(nll)
    out = {}
    for length in lengths:
        if not 1 <= length <= arr.shape[1]:
            raise ValueError(f"length {length} is outside [1, {arr.shape[1]}] (the predictions "
                             f"of a row of {arr.shape[1] + 1} tokens)")
        out[int(length)] = math.exp(float(arr[:, :length].mean()))
    return out


def position_buckets(nll, edges: Sequence[int]) -> list[dict]:
    """Perplexity of the predictions made at positions p in [edges[i], edges[i+1]).

    nll: [N, S-1]; edges: strictly increasing, from >= 0 up to at most S-1. Returns one dict per
    bucket: start, end, predictions (N x bucket width), mean nll, ppl.
    """
    arr = _nll_array(nll)
    edges = [int(e) for e in edges]
    if (len(edges) < 2 or edges[0] < 0 or edges[-1] > arr.shape[1]
            or any(a >= b for a, b in zip(edges, edges[1:]))):
        raise ValueError(f"edges must increase strictly within [0, {arr.shape[1]}] (at least "
                         f"two), got {edges}")
    out = []
    for start, end in zip(edges, edges[1:]):
        mean = float(arr[:, start:end].mean())
        out.append({"start": start, "end": end, "predictions": arr.shape[0] * (end - start),
                    "nll": mean, "ppl": math.exp(mean)})
    return out
