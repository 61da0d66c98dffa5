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
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from jaxprefill.sparse import Prefill, SparseConfig

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
    return Prefill(kind, layer, sm_scale, cfg.min_length, cfg.kernel,
                   lengths=lengths if kind != "packed" else None, q_offset=offset,
                   segment_ids=segment_ids[0] if kind == "packed" else None)


def sparse_attend(q: jax.Array, k: jax.Array, v: jax.Array, cfg: SparseConfig,
                  call: Prefill) -> jax.Array:
    """The layer's policy on a classified call: [B, Sq, Hq, Dv]."""
    return cfg.policy_for(call.layer).attend(q, k, v, call)


__all__ = ["sparse_attend", "sparse_call"]
