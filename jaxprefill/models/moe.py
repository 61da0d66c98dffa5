"""DeepSeekMoE: routed experts (grouped matmul over tokens sorted by expert) + shared experts.

Shapes: T tokens (B*S flattened), E hidden, N routed experts, K experts per token, F expert
inner size. Expert kernels carry the logical axis "expert" (sharded over the `expert` mesh axis
by `jaxprefill.sharding`), then ("embed", "mlp") like the dense SwiGLU.

Routing follows transformers' DeepseekV2/V3 routers (and DeepSeek's own code):
  * softmax scoring (V2): "greedy" top-k, or "group_limited_greedy" (keep the `topk_group`
    groups with the largest max score, then top-k inside them);
  * sigmoid scoring (V3, Kimi-K2): choice by score + e_score_correction_bias, groups ranked by
    the sum of their two largest biased scores ("noaux_tc"); weights are the unbiased scores.
  * weights renormalized over the K chosen when `norm_topk_prob`, then x routed_scaling_factor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprefill.config import MLAConfig
from jaxprefill.models.layers import SwiGLU, param


def route(logits: jax.Array, cfg: MLAConfig, bias: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Router logits float32 [T, N] -> (weights float32 [T, K], expert ids int32 [T, K])."""
    n, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    scores = jax.nn.softmax(logits, axis=-1) if cfg.scoring_func == "softmax" else jax.nn.sigmoid(logits)
    choice = scores if bias is None else scores + bias.astype(jnp.float32)
    if cfg.topk_method in ("group_limited_greedy", "noaux_tc") and cfg.n_group > 1:
        grouped = choice.reshape(-1, cfg.n_group, n // cfg.n_group)
        if cfg.topk_method == "noaux_tc":
            group_score = jax.lax.top_k(grouped, min(2, n // cfg.n_group))[0].sum(-1)
        else:
            group_score = grouped.max(-1)
        _, keep = jax.lax.top_k(group_score, cfg.topk_group)  # [T, topk_group]
        group_mask = jnp.zeros_like(group_score, bool).at[
            jnp.arange(group_score.shape[0])[:, None], keep].set(True)
        expert_mask = jnp.repeat(group_mask, n // cfg.n_group, axis=-1)
        choice = jnp.where(expert_mask, choice, -jnp.inf)
    _, ids = jax.lax.top_k(choice, k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    # DeepSeek-V2 code renormalizes only for k > 1; V3 (sigmoid) always does
    if cfg.norm_topk_prob and (k > 1 or cfg.scoring_func == "sigmoid"):
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, ids.astype(jnp.int32)


def grouped_swiglu(x: jax.Array, ids: jax.Array, weights: jax.Array, gate: jax.Array,
                   up: jax.Array, down: jax.Array) -> jax.Array:
    """sum_k weights[t,k] * expert_{ids[t,k]}(x[t]) with `jax.lax.ragged_dot`.

    x [T, E]; ids, weights [T, K]; gate/up [N, E, F]; down [N, F, E]. The T*K (token, expert)
    assignments are sorted by expert so each expert's rows are contiguous (ragged_dot's groups);
    results are scattered back with an add (a token's K experts sum).
    """
    t, k = ids.shape
    n = gate.shape[0]
    flat_ids = ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    token_of = order // k  # assignment i -> token index
    xs = jnp.take(x, token_of, axis=0)
    sizes = jnp.bincount(flat_ids, length=n).astype(jnp.int32)
    dt = x.dtype
    h = jax.nn.silu(jax.lax.ragged_dot(xs, gate.astype(dt), sizes)) * \
        jax.lax.ragged_dot(xs, up.astype(dt), sizes)
    ys = jax.lax.ragged_dot(h, down.astype(dt), sizes)
    ys = ys * jnp.take(weights.reshape(-1), order)[:, None].astype(dt)
    return jnp.zeros_like(x).at[token_of].add(ys)


class MoE(nnx.Module):
    """Routed experts + shared experts (one SwiGLU of n_shared * F)."""

    def __init__(self, cfg: MLAConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        e, n, f = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        self.router = param(rngs, (e, n), ("embed", None), param_dtype)
        if cfg.topk_method == "noaux_tc":
            self.router_bias = param(None, (n,), (None,), jnp.float32, init="zeros")
        self.gate = param(rngs, (n, e, f), ("expert", "embed", "mlp"), param_dtype)
        self.up = param(rngs, (n, e, f), ("expert", "embed", "mlp"), param_dtype)
        self.down = param(rngs, (n, f, e), ("expert", "mlp", "embed"), param_dtype)
        if cfg.n_shared_experts:
            self.shared = SwiGLU(e, f * cfg.n_shared_experts, bias=False, rngs=rngs,
                                 param_dtype=param_dtype)
        self.cfg = cfg

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, S, E] -> [B, S, E]."""
        cfg = self.cfg
        flat = x.reshape(-1, x.shape[-1])
        # router in float32 like transformers (routing decisions must not flip with dtype)
        logits = flat.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
        bias = self.router_bias[...] if cfg.topk_method == "noaux_tc" else None
        weights, ids = route(logits, cfg, bias)
        y = grouped_swiglu(flat, ids, weights, self.gate[...], self.up[...], self.down[...])
        y = y.reshape(x.shape)
        if cfg.n_shared_experts:
            y = y + self.shared(x)
        return y
