"""The loss and the one jitted training step over (params, opt_state, step, rng) + a batch.

Functional NNX: the model is split once (`graphdef`, Param state as a pure dict); inside the
jitted step it is merged back, so the step traces once and nothing walks the object graph per
call. Shapes: A grad-accumulation micro-steps, B rows per micro-step, S tokens, V vocab.

LoRA runs split the model in two (train/model.py): `params` (the adapters) are differentiated and
updated; `frozen` (the base) is a third input of the step, merged in but never differentiated.
Their LoRA dropout draws from the state's RNG: one key per step, folded per micro-step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxprefill import lora
from jaxprefill.models.layers import rope_cos_sin

TrainState = dict[str, Any]  # {"params", "opt_state", "step": int32 [], "rng": uint32 [2]}

REMAT_POLICIES = {
    "full": None,  # save nothing inside a block: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class StepOptions:
    remat: str = "none"
    packed: bool = True  # pass positions/segment ids to the model (False: plain causal rows)
    dropout: bool = False  # the model has LoRA dropout: give it keys while training


def merge(graphdef, template, params, frozen_template=None, frozen=None) -> nnx.Module:
    """Model from a pure-dict params tree (`template` is the abstract Param state), plus the
    frozen part of a LoRA run's model when given."""
    state = jax.tree.map(lambda x: x, template)  # fresh Variables: never mutate the template
    nnx.replace_by_pure_dict(state, params)
    if frozen_template is None:
        return nnx.merge(graphdef, state)
    rest = jax.tree.map(lambda x: x, frozen_template)
    nnx.replace_by_pure_dict(rest, frozen)
    return nnx.merge(graphdef, state, rest)


def hidden_states(model, tokens, positions, segment_ids, remat: str) -> jax.Array:
    """[B, S, E] final-norm hidden states. remat "none" is exactly `model.forward`; otherwise each
    block runs under `jax.checkpoint` (same math, a test checks the two agree)."""
    if remat == "none":
        return model.forward(tokens, positions, segment_ids)[0]
    b, s = tokens.shape
    ring = model.attention.context  # context parallelism: ring order in, natural order out
    if ring is not None:
        tokens, positions, segment_ids, _ = ring.enter(tokens, positions, segment_ids, None)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    if hasattr(model, "rope_tables"):  # DeepSeek: per-pair tables of the decoupled RoPE part
        cos, sin = model.rope_tables(positions)
    else:
        inv_freq, scale = model.rope
        cos, sin = rope_cos_sin(positions, jnp.asarray(inv_freq), scale)
    x = jnp.take(model.embed[...], tokens, axis=0).astype(model.dtype)
    for i, layer in enumerate(model.layers):
        graphdef, state = nnx.split(layer)

        def block(state, x, cos, sin, segment_ids, graphdef=graphdef, i=i):
            y, _ = nnx.merge(graphdef, state)(x, cos, sin, spec=model.attention,
                                              segment_ids=segment_ids, cache=None,
                                              cache_index=None, **model.block_kwargs(i))
            return y

        x = jax.checkpoint(block, policy=REMAT_POLICIES[remat])(state, x, cos, sin, segment_ids)
    x = model.norm(x)
    return x if ring is None else ring.exit(x, s)


def token_losses(model, batch: dict[str, jax.Array], opts: StepOptions) -> tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy summed over the batch, and the number of predicted tokens.

    Token t predicts token t+1 only inside its own document (equal, non-zero segment ids), so no
    loss crosses a document boundary or touches padding. batch arrays are int32 [B, S]; with
    "loss_weights" (float32 [B, S], the weight of predicting each token) the sum and the count
    are weighted (the count is then the sum of the weights).
    """
    tokens, segs = batch["tokens"], batch["segment_ids"]
    if opts.packed:
        hidden = hidden_states(model, tokens, batch["positions"], segs, opts.remat)
    else:
        hidden = hidden_states(model, tokens, None, None, opts.remat)
    logits = model.logits(hidden)  # float32 [B, S, V]
    targets = jnp.roll(tokens, -1, axis=1)
    mask = (segs == jnp.roll(segs, -1, axis=1)) & (segs > 0)
    mask = mask.at[:, -1].set(False)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jnp.where(mask, logz - target_logit, 0.0)
    if "loss_weights" not in batch:
        return nll.sum(), mask.sum().astype(jnp.float32)
    w = jnp.where(mask, jnp.roll(batch["loss_weights"], -1, axis=1), 0.0)
    return (nll * w).sum(), w.sum()


def make_train_step(graphdef, template, tx: optax.GradientTransformation, lr_fn: Callable,
                    opts: StepOptions, frozen_template=None) -> Callable:
    """step(state, batch, frozen=None) -> (state, metrics). batch arrays are int32 [A, B, S]; the
    loss is the mean over every predicted token of all A micro-batches (so accumulation is
    exact). `frozen`: the frozen params of a LoRA run (`frozen_template` their abstract state)."""

    def micro(params, frozen, mb, key):
        def loss_sum(p):
            model = merge(graphdef, template, p, frozen_template, frozen)
            if opts.dropout:
                lora.set_dropout(model, key)
            return token_losses(model, mb, opts)
        (total, count), grads = jax.value_and_grad(loss_sum, has_aux=True)(params)
        return total, count, grads

    def step(state: TrainState, batch: dict[str, jax.Array], frozen: Any = None):
        params = state["params"]
        rng, dropout_key = jax.random.split(state["rng"])
        a = batch["tokens"].shape[0]
        if a == 1:
            total, count, grads = micro(params, frozen, jax.tree.map(lambda x: x[0], batch),
                                        jax.random.fold_in(dropout_key, 0))
        else:
            def body(carry, xs):
                mb, i = xs
                t, c, g = micro(params, frozen, mb, jax.random.fold_in(dropout_key, i))
                return jax.tree.map(jnp.add, carry, (t, c, g)), None
            zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                     jax.tree.map(jnp.zeros_like, params))
            (total, count, grads), _ = jax.lax.scan(body, zeros, (batch, jnp.arange(a)))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
        grad_norm = _norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}
        metrics = {"loss": total / denom, "tokens": count, "grad_norm": grad_norm,
                   "lr": lr_fn(state["step"])}
        return new_state, metrics

    return step


def _norm(tree) -> jax.Array:
    tree_norm = getattr(getattr(optax, "tree", None), "norm", None)  # optax >= 0.2.5
    return tree_norm(tree) if tree_norm is not None else optax.global_norm(tree)


def make_eval_step(graphdef, template, opts: StepOptions, frozen_template=None) -> Callable:
    """eval(params, batch [B, S], frozen=None) -> (summed nll, token count); no dropout."""
    def evaluate(params, batch, frozen=None):
        return token_losses(merge(graphdef, template, params, frozen_template, frozen), batch, opts)
    return evaluate


def init_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.PRNGKey(seed)}


def state_shardings(params_shardings: Any, tx: optax.GradientTransformation, abstract_state: TrainState,
                    replicated) -> TrainState:
    """Shardings of the whole train state: optimizer moments follow their parameter."""
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract_state["opt_state"], params_shardings,
                                transform_non_params=lambda _: replicated,
                                is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return {"params": params_shardings, "opt_state": opt, "step": replicated, "rng": replicated}
