"""The one sparse-prefill entry point: classify an attention call once, then run its policy.

`attend` asks :func:`sparse_call` whether a call is a sparse prefill; if so, the layer's policy
computes it (:meth:`jaxprefill.sparse.Policy.attend`). A call is one of three kinds
(:mod:`jaxprefill.sparse.prefill`):

    prompt   a whole causal prompt: no q_offset, no segment ids, Sq == Sk
    chunk    chunked prefill: queries at q_offset[b] against the cache view (Sq >= 2)
    packed   a prepacked row: segment ids, Sq == Sk

and stays dense (returns None) when: no sparse config or no layer index; not causal; a sliding
window; query and key head dims differ; the view (Sk) is shorter than ``min_length``; decode
(Sq < 2); both q_offset and segment ids; the layer's rule is dense; or the policy does not take
the kind (``Policy.kinds``: PBS takes whole prompts only). Each reason is logged at debug level
(``logging.getLogger("jaxprefill.attention")``).

Layers that share a layout (a policy's ``share_layers``) need a :class:`LayoutShare`: the model
makes one per forward and passes it to every layer's ``attend``; without one, every layer
builds its own layout.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from jaxprefill.sparse import Prefill, SparseConfig
from jaxprefill.sparse.prefill import layout_for

log = logging.getLogger("jaxprefill.attention")


def sparse_call(cfg: SparseConfig | None, layer: int | None, q: jax.Array, k: jax.Array, *,
                causal: bool, q_offset: jax.Array | None, segment_ids: tuple | None,
                window: int | None, lengths: jax.Array | None,
                sm_scale: float) -> Prefill | None:
    """The classified call (see module docstring), or None when it stays dense.

    q [B, Sq, Hq, D], k [B, Sk, Hkv, D]; segment_ids (q_seg [B, Sq], kv_seg [B, Sk]);
    lengths int32 [B]: valid tokens per prompt row, or valid queries of each row's chunk.
    """
    if cfg is None or layer is None:
        return None
    sq, sk = q.shape[1], k.shape[1]
    reason = None
    if not causal or window is not None:
        reason = "not plain causal attention (non-causal or a sliding window)"
    elif q.shape[-1] != k.shape[-1]:
        reason = "query and key head dims differ"
    elif sq < 2:
        reason = "decode step"
    elif sk < max(cfg.min_length, 1):
        reason = f"{sk} keys < min_length {cfg.min_length}"
    elif q_offset is not None and segment_ids is not None:
        reason = "a chunk of packed rows"
    elif q_offset is None and sq != sk:
        reason = f"{sq} queries against {sk} keys without a q_offset"
    if reason is not None:
        log.debug("layer %s: dense (%s)", layer, reason)
        return None
    policy = cfg.policy_for(layer)
    if policy is None:
        log.debug("layer %s: dense (its rule is dense)", layer)
        return None
    kind = "chunk" if q_offset is not None else "packed" if segment_ids is not None else "prompt"
    if kind not in policy.kinds:
        log.debug("layer %s: dense (%s takes %s calls, not %s)", layer, policy.name,
                  "/".join(policy.kinds), kind)
        return None
    offset = None
    if kind == "chunk":
        offset = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (q.shape[0],))
    return Prefill(kind, layer, sm_scale, cfg.min_length, cfg.kernel, cfg.kernel_config,
                   lengths=lengths if kind != "packed" else None, q_offset=offset,
                   segment_ids=segment_ids[0] if kind == "packed" else None)


class LayoutShare:
    """The layouts built during one model forward, for layers that reuse an earlier layer's
    (``Policy.share_layers``). Holds traced arrays: make one per forward (inside its trace)
    and drop it after; the layers must be traced in order within that one trace (a loop, not a
    scan or a per-layer remat)."""

    def __init__(self) -> None:
        self._layouts: dict = {}

    def layout(self, cfg: SparseConfig, call: Prefill, q: jax.Array, k: jax.Array):
        """The layout ``call.layer`` runs: the one its source layer
        (:meth:`SparseConfig.layout_source`) built for the same kind of call and shapes, built
        here from this layer's q and k when the source made none."""
        policy = cfg.policy_for(call.layer)
        key = (cfg.layout_source(call.layer), id(policy), call.kind, q.shape, k.shape)
        if key not in self._layouts:
            self._layouts[key] = layout_for(policy, q, k, call)
        return self._layouts[key]


def sparse_attend(q: jax.Array, k: jax.Array, v: jax.Array, cfg: SparseConfig,
                  call: Prefill, share: LayoutShare | None = None) -> jax.Array:
    """The layer's policy on a classified call: [B, Sq, Hq, Dv]. With ``share`` and a policy
    whose ``share_layers`` > 1, the layout comes from ``share`` (built once per group)."""
    policy = cfg.policy_for(call.layer)
    if share is None or policy.share_layers == 1:
        return policy.attend(q, k, v, call)
    return policy.attend(q, k, v, call, layout=share.layout(cfg, call, q, k))


__all__ = ["LayoutShare", "sparse_attend", "sparse_call"]
