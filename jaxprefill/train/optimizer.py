"""optax optimizers for training: AdamW or Muon, warmup + cosine, clipping, a weight-decay mask.

Params are the pure-dict tree of `nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])`, so paths
look like ("layers", 0, "attn", "q"). The decay mask and Muon's matrix shapes are decided from
those names: leaf "scale" (RMSNorm), "*_bias" and "embed" are never treated as weight matrices.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxprefill.train.config import OptimSection

# Muon orthogonalizes each weight as a [reduction, output] matrix; our kernels keep heads as
# separate axes ([E, H, D] in, [H, D, E] out), so name which axes are which.
MUON_DIMS = {
    "q": ((0,), (1, 2)), "k": ((0,), (1, 2)), "v": ((0,), (1, 2)),
    "o": ((0, 1), (2,)),
    "gate": ((0,), (1,)), "up": ((0,), (1,)), "down": ((0,), (1,)),
    # DeepSeek MLA: q_b [d_q, H, Dqk], kv_b [d_c, H, d_n + d_v]; q_a, kv_a, router are 2-D
    "q_b": ((0,), (1, 2)), "kv_b": ((0,), (1, 2)),
}
# MoE expert stacks [N, E, F] / [N, F, E]: axis 0 is a batch axis (one matrix per expert)
MUON_EXPERT_DIMS = ((1,), (2,))


def leaf_name(path: tuple) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def is_matrix_weight(path: tuple, leaf: Any) -> bool:
    """True for projection kernels; False for norms, biases and the token embedding."""
    name = leaf_name(path)
    return not (name == "scale" or name.endswith("bias") or name == "embed" or leaf.ndim < 2)


def decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
    """Same tree as `params`: True where weight decay applies."""
    def one(path, leaf):
        if decay_embeddings and leaf_name(path) == "embed":
            return True
        return is_matrix_weight(path, leaf)
    return jax.tree_util.tree_map_with_path(one, params)


def schedule(cfg: OptimSection, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> lr over `warmup_steps`, then cosine to lr * min_lr_ratio (or constant)."""
    decay_steps = max(cfg.decay_steps or total_steps, cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        warm = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
        return optax.join_schedules([warm, optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, decay_steps,
                                              end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg: OptimSection, params: Any, total_steps: int):
    """(optax transformation, schedule). Clipping runs first, on the raw accumulated gradient."""
    lr = schedule(cfg, total_steps)
    mask = decay_mask(params, cfg.decay_embeddings)
    if cfg.name == "adamw":
        core = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=mask)
    elif cfg.name == "muon":
        muon = getattr(getattr(optax, "contrib", None), "muon", None)
        if muon is None:
            raise ValueError("optim.name=muon needs optax.contrib.muon (optax >= 0.2.5)")
        from optax.contrib import MuonDimensionNumbers

        def dims(path, leaf):
            if not is_matrix_weight(path, leaf):
                return None  # Adam for embeddings, lm_head-free paths, norms, biases
            if leaf_name(path) == "lm_head":
                return None  # output layer: Adam, as the Muon authors recommend
            if leaf.ndim == 3 and leaf_name(path) in ("gate", "up", "down"):
                red, out = MUON_EXPERT_DIMS
            else:
                red, out = MUON_DIMS.get(leaf_name(path), ((0,), (1,)))
            return MuonDimensionNumbers(reduction_axis=red, output_axis=out)

        dim_tree = jax.tree_util.tree_map_with_path(dims, params)
        core = muon(lr, beta=cfg.b1, weight_decay=cfg.weight_decay, weight_decay_mask=mask,
                    adam_b1=cfg.b1, adam_b2=cfg.b2, adam_weight_decay=cfg.weight_decay,
                    muon_weight_dimension_numbers=dim_tree)
    else:  # pragma: no cover - config validates
        raise ValueError(cfg.name)
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    return optax.chain(*parts, core), lr
