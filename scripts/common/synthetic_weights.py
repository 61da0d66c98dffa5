"""Random Llama weights whose attention is local by construction, for speed runs at long context.

With plain random weights every query attends almost uniformly, so the data-dependent sparse
policies keep 70-100% of the blocks and a TTFT measures their overhead at full density, not
their speed. No trained model of Llama-3-8B's shapes is available offline; these weights keep
the shapes (so dense attention, the matmuls and the kernels cost what they cost) and give
attention the structure trained models show most: a local window with a long tail.

Construction (``localize``, in place on a ``jp.Llama``):

- Every token's embedding is one shared direction ``u`` plus ``noise`` times its own random
  vector, and each layer's attention and MLP outputs are scaled by ``residual``, so the hidden
  state stays near ``u`` in every layer (every layer gets the same structure).
- Per KV group, the key head's projection ``W`` is also its query heads' (plus ``head_noise``
  times a per-head random matrix). Then ``q_i ~ R(i) a`` and ``k_j ~ R(j) a`` with
  ``a = W^T norm(u)``, and ``q_i . k_j ~ sum_f |a_f|^2 cos(theta_f (i - j))``: largest at
  offset 0, falling with the distance, with a tail from RoPE's low frequencies.
- ``W``'s scale puts that logit at offset 0 near ``logit`` (the query-key product over
  sqrt(D)), so the window's sharpness does not depend on the model's width.

What it is not: the tokens' identities barely matter (no retrieval structure, no vertical
lines besides the noise), so accuracy means nothing here; only densities and times do.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxprefill as jp

WEIGHTS = {"random": "random weights",
           "local": "random weights, local attention by construction (synthetic_weights)"}


def add_weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", choices=sorted(WEIGHTS), default="random",
                   help="the random model's weights: plain random, or with local attention by "
                   "construction (scripts/common/synthetic_weights.py)")


def random_llama(cfg: jp.ModelConfig, dtype, weights: str) -> tuple[jp.Llama, str]:
    """(a Llama of ``cfg`` with ``weights`` as ``--weights`` names them, their description)."""
    model = jp.Llama(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
    if weights == "local":
        localize(model)
    return model, WEIGHTS[weights]


def localize(model: jp.Llama, *, seed: int = 0, noise: float = 0.3, head_noise: float = 0.3,
             residual: float = 0.1, logit: float = 16.0) -> None:
    """Overwrites ``model``'s random weights as the module docstring describes (in place)."""
    cfg = model.config
    e, d = cfg.hidden_size, cfg.head_dim
    g = cfg.num_heads // cfg.num_kv_heads
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(e)
    u /= np.linalg.norm(u) / math.sqrt(e)  # RMS 1, as after the attention norm
    # drawn on the device: the table is [V, E] (525M values at Llama-3-8B's shapes)
    table = model.embed[...]
    noisy = jax.random.normal(jax.random.key(seed), table.shape, jnp.float32)
    model.embed[...] = (jnp.asarray(u, jnp.float32)[None] + noise * noisy).astype(table.dtype)
    # |W^T u|^2 ~ d * std^2 * e; over sqrt(d): the logit at offset 0
    std = math.sqrt(logit / (math.sqrt(d) * e))
    for layer in model.layers:
        attn = layer.attn
        w = std * rng.standard_normal((e, cfg.num_kv_heads, d))
        q = np.repeat(w, g, axis=1) + head_noise * std * rng.standard_normal((e, cfg.num_heads, d))
        attn.k[...] = jnp.asarray(w, attn.k[...].dtype)
        attn.q[...] = jnp.asarray(q, attn.q[...].dtype)
        attn.o[...] = (residual * attn.o[...].astype(jnp.float32)).astype(attn.o[...].dtype)
        down = layer.mlp.down
        down[...] = (residual * down[...].astype(jnp.float32)).astype(down[...].dtype)


def local_mass(model: jp.Llama, tokens: jax.Array, window: int) -> float:
    """Mean attention mass, over the heads and the prompt's second half of queries, that lies
    within ``window`` keys of the query (layer 0 of a dense forward)."""
    from jaxprefill.eval.probe import layer_qkv

    _, q, k, _ = next(iter(layer_qkv(model, tokens)))
    q, k = q[0].astype(jnp.float32), k[0].astype(jnp.float32)
    s = q.shape[0]
    k = jnp.repeat(k, q.shape[1] // k.shape[1], axis=1)
    logits = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    i, j = jnp.arange(s)[:, None], jnp.arange(s)[None, :]
    p = jax.nn.softmax(jnp.where(j <= i, logits, -jnp.inf), axis=-1)
    near = (i - j < window) & (j <= i)
    return float(jnp.sum(jnp.where(near, p, 0.0), axis=-1)[:, s // 2:].mean())


__all__ = ["WEIGHTS", "add_weights_arg", "local_mass", "localize", "random_llama"]
