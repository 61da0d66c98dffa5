"""LoRA: low-rank updates W + (alpha / rank) * A @ B of a model's projection weights.

    attach(model, ["q", "k", "v", "o"], rank=16, alpha=32.0, dropout=0.05, rngs=nnx.Rngs(0))
    ...train A and B (`trainable_filter`), keep every other parameter frozen...
    merge(model)              # back to plain weights W + (alpha / rank) A @ B: an ordinary model

Where the low-rank branch lives. The models compute each projection through one helper,
`jaxprefill.models.layers.dense(eq, x, w)`, which for a plain `nnx.Param` is the einsum it
replaces. `attach` swaps the targeted Params for `LoRAWeight` modules (the frozen base weight plus
the factors A and B); `dense` then calls the module, which returns

    x W + scale * (drop(x) A) B          scale = alpha / rank, drop = dropout while training

So the model files read the same with and without adapters, and nothing besides `dense` knows
about them. A branch rather than a weight merged before the matmul, because dropout acts on the
branch input only (a merged weight cannot express it), and because the branch never forms the
full-size weight gradient x^T dy that a merged weight would compute for a frozen W. Reading a
`LoRAWeight` like a parameter (`w[...]`, e.g. MLA's absorbed decode) gives the merged matrix.

Layouts: a weight has its input axes first and its output axes last ([E, H, D] for q, [H, D, E]
for o, [E, F] for gate); A is [*input axes, r] and B is [r, *output axes], so A @ B (contracted
over r) has W's shape. A starts uniform in +-1/sqrt(fan_in) (PEFT's default), B at zero: the
adapted model starts exactly at the base model.

Targets, by the attribute name of the weight in the model:
  Llama family:   q, k, v, o (attention), gate, up, down (MLP)
  DeepSeek (MLA): q_a, q_b (or q without a q LoRA rank), kv_a, kv_b, o (attention); gate, up,
                  down of the dense MLP layers and of the shared experts. Routed experts (one
                  stacked [N, E, F] weight per MoE layer, ragged matmuls) take no adapters.
Dropout needs a key per step: `set_dropout(model, key)` (the training step does it on its own
merged copy); a model without keys (evaluation, inference) never drops.

Adapter files (the factors in PEFT's layout + config overrides) are written by
`jaxprefill.train.export.export_adapter` and applied at load by `jaxprefill.loading.adapter`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprefill.config import ConfigError
from jaxprefill.models.layers import SwiGLU

# target name -> number of leading input axes of its weight (the remaining axes are outputs)
INPUT_AXES: dict[str, int] = {
    "q": 1, "k": 1, "v": 1, "o": 2,        # Llama attention; q, o also MLA
    "q_a": 1, "q_b": 1, "kv_a": 1, "kv_b": 1,  # MLA attention
    "gate": 1, "up": 1, "down": 1,         # SwiGLU (dense MLP, DeepSeek shared experts)
}
ATTENTION_TARGETS = ("q", "k", "v", "q_a", "q_b", "kv_a", "kv_b", "o")
MLP_TARGETS = ("gate", "up", "down")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS


class DropoutKey(nnx.Variable):
    """The PRNG key of one step's dropout (set inside the training step, never saved)."""


class LoRAWeight(nnx.Module):
    """A frozen weight `base` plus a trainable low-rank update scale * A @ B (module docstring).

    base: the original `nnx.Param`, shape [*in, *out] with `n_in` input axes.
    a: `nnx.LoRAParam` [*in, rank]; b: `nnx.LoRAParam` [rank, *out].
    """

    def __init__(self, base: nnx.Param, n_in: int, *, rank: int, alpha: float, dropout: float,
                 rngs: nnx.Rngs) -> None:
        shape = tuple(base.shape)
        axes = base.get_metadata().get("axes") or (None,) * len(shape)
        fan_in = math.prod(shape[:n_in])
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(rngs.params(), shape[:n_in] + (rank,), jnp.float32, -bound, bound)
        self.base = base
        self.a = nnx.LoRAParam(a.astype(base.dtype), axes=tuple(axes[:n_in]) + (None,))
        self.b = nnx.LoRAParam(jnp.zeros((rank,) + shape[n_in:], base.dtype),
                               axes=(None,) + tuple(axes[n_in:]))
        self.n_in = n_in
        self.scale = float(alpha) / rank
        self.dropout = float(dropout)
        self.key = nnx.data(None)  # a DropoutKey while a training step runs

    def __call__(self, eq: str, x: jax.Array) -> jax.Array:
        """einsum(eq, x, W) + scale * (drop(x) A) B, in x's dtype (eq as for the base weight)."""
        dt = x.dtype
        y = jnp.einsum(eq, x, self.base[...].astype(dt))
        into_rank, out_of_rank = branch_equations(eq, self.n_in)
        h = x
        if self.key is not None and self.dropout > 0:
            keep = 1.0 - self.dropout
            mask = jax.random.bernoulli(self.key[...], keep, x.shape)
            h = jnp.where(mask, x / jnp.asarray(keep, dt), jnp.zeros((), dt))
        low = jnp.einsum(into_rank, h, self.a[...].astype(dt)) * jnp.asarray(self.scale, dt)
        return y + jnp.einsum(out_of_rank, low, self.b[...].astype(dt))

    def delta(self) -> jax.Array:
        """scale * A @ B in float32, shape of the base weight."""
        a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
        return self.scale * jnp.tensordot(a, b, axes=1)

    def merged(self) -> jax.Array:
        """W + scale * A @ B in the base weight's dtype."""
        base = self.base[...]
        return (base.astype(jnp.float32) + self.delta()).astype(base.dtype)

    def __getitem__(self, index: Any) -> jax.Array:
        return self.merged()[index]


@functools.lru_cache(maxsize=None)
def branch_equations(eq: str, n_in: int) -> tuple[str, str]:
    """The two einsums of the low-rank branch of a projection `eq` = "x,w->y".

    With w = [*in, *out] (n_in input letters): ("x,{in}R->{rest}R", "{rest}R,R{out}->y"), R a
    letter eq does not use and rest the letters of y that are not outputs (batch, sequence).
    """
    inputs, y = eq.replace(" ", "").split("->")
    x, w = inputs.split(",")
    w_in, w_out = w[:n_in], w[n_in:]
    if not y.endswith(w_out):
        raise ValueError(f"projection {eq!r}: the output must end with the weight's output axes "
                         f"{w_out!r}")
    rest = y[:len(y) - len(w_out)]
    r = next(c for c in "rRzZqQ" if c not in eq)
    return f"{x},{w_in}{r}->{rest}{r}", f"{rest}{r},{r}{w_out}->{y}"


# ---- sites: where the targets live in a model ---------------------------------------------------

def sites(model: nnx.Module) -> dict[str, list[tuple[nnx.Module, str, tuple]]]:
    """{target name: [(owning module, attribute, parameter path)]} for every adaptable weight of
    a `Llama` or `DeepSeek` (a weight already wrapped in a LoRAWeight counts too)."""
    out: dict[str, list[tuple[nnx.Module, str, tuple]]] = {}

    def add(owner: nnx.Module, path: tuple, names: Sequence[str]) -> None:
        for name in names:
            w = getattr(owner, name, None)
            if isinstance(w, (nnx.Param, LoRAWeight)) and not isinstance(w, nnx.LoRAParam):
                out.setdefault(name, []).append((owner, name, path + (name,)))

    for i, layer in enumerate(model.layers):
        add(layer.attn, ("layers", i, "attn"), ATTENTION_TARGETS)
        mlp = layer.mlp
        if isinstance(mlp, SwiGLU):
            add(mlp, ("layers", i, "mlp"), MLP_TARGETS)
        elif isinstance(getattr(mlp, "shared", None), SwiGLU):  # MoE: the shared experts only
            add(mlp.shared, ("layers", i, "mlp", "shared"), MLP_TARGETS)
    return out


def available_targets(model: nnx.Module) -> list[str]:
    """Target names this model has, in canonical order."""
    found = sites(model)
    return [t for t in TARGETS if t in found]


def check_targets(model: nnx.Module, targets: Sequence[str]) -> None:
    """ConfigError naming unknown or duplicated targets and the ones this model has."""
    have = available_targets(model)
    kind = getattr(model.config, "model_type", type(model).__name__)
    if not targets:
        raise ConfigError(f"lora.targets: list at least one projection; this {kind} model has: "
                          f"{', '.join(have)}")
    dup = sorted({t for t in targets if list(targets).count(t) > 1})
    if dup:
        raise ConfigError(f"lora.targets: {dup} listed more than once")
    unknown = [t for t in targets if t not in have]
    if unknown:
        raise ConfigError(f"lora.targets: {unknown} not in this {kind} model; it has: "
                          f"{', '.join(have)}")


def attach(model: nnx.Module, targets: Sequence[str], *, rank: int, alpha: float,
           dropout: float = 0.0, rngs: nnx.Rngs) -> nnx.Module:
    """Wrap every weight named in `targets` (all layers) in a LoRAWeight, in place; returns the
    model. Raises ConfigError for targets the model does not have."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"lora.rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ConfigError(f"lora.alpha must be positive, got {alpha}")
    if not 0 <= dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {dropout}")
    check_targets(model, targets)
    found = sites(model)
    for name in targets:
        for owner, attr, _ in found[name]:
            base = getattr(owner, attr)
            if isinstance(base, LoRAWeight):
                raise ConfigError(f"lora: {attr} already carries an adapter")
            setattr(owner, attr, LoRAWeight(base, INPUT_AXES[name], rank=rank, alpha=alpha,
                                            dropout=dropout, rngs=rngs))
    return model


def lora_weights(model: nnx.Module) -> list[tuple[tuple, LoRAWeight]]:
    """(parameter path, LoRAWeight) of every adapted weight, in a fixed order."""
    return [(tuple(path), node) for path, node in nnx.iter_graph(model)
            if isinstance(node, LoRAWeight)]


def merge(model: nnx.Module) -> nnx.Module:
    """Replace every LoRAWeight by a plain Param holding W + scale * A @ B, in place; returns the
    model (an ordinary Llama / DeepSeek again)."""
    for path, w in lora_weights(model):
        owner = model
        for p in path[:-1]:
            owner = owner[p] if isinstance(p, int) else getattr(owner, p)
        axes = w.base.get_metadata().get("axes")
        setattr(owner, path[-1], nnx.Param(w.merged(), axes=axes))
    return model


def set_dropout(model: nnx.Module, key: jax.Array) -> None:
    """Give each adapter with dropout its own key derived from `key` (one training step)."""
    for i, (_, w) in enumerate(lora_weights(model)):
        if w.dropout > 0:
            w.key = DropoutKey(jax.random.fold_in(key, i))


def is_norm(path: tuple) -> bool:
    return str(path[-1]) == "scale"  # RMSNorm scales (block, q/k, latent and final norms)


def is_bias(path: tuple) -> bool:
    name = str(path[-1])
    return name.endswith("_bias") and name != "router_bias"  # MoE routing bias is not a bias


def trainable_filter(train_norms: bool = False, train_biases: bool = False) -> Callable:
    """An nnx filter for what trains under LoRA: the factors A and B, plus norm scales and
    projection biases when asked. Everything else stays frozen."""
    def pred(path: tuple, value: Any) -> bool:
        if isinstance(value, nnx.LoRAParam):
            return True
        if not isinstance(value, nnx.Param):
            return False
        return (train_norms and is_norm(path)) or (train_biases and is_bias(path))
    return pred


__all__ = ["ATTENTION_TARGETS", "INPUT_AXES", "LoRAWeight", "MLP_TARGETS", "TARGETS", "attach",
           "available_targets", "check_targets", "lora_weights", "merge", "set_dropout", "sites",
           "trainable_filter"]
