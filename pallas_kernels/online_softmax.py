"""The last step of an online (flash) softmax, shared by the kernel bodies and the XLA path.

Every implementation accumulates, per query row, ``acc`` (sum of p * v), ``m`` (running max
logit) and ``l`` (sum of p relative to ``m``). :func:`normalize_rows` turns them into the output
and the logsumexp with one convention everywhere: a row that attended to nothing (``l == 0``)
gives output 0 and lse ``-inf``, never NaN.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LN2 = math.log(2.0)


def normalize_rows(acc: jax.Array, m: jax.Array, l: jax.Array, *,
                   base2: bool = False) -> tuple[jax.Array, jax.Array]:
    """``(acc / l, m + log l)`` with empty rows -> ``(0, -inf)``.

    Args:
      acc: float32 ``[..., D]``.
      m, l: float32 ``acc.shape[:-1]``, or ``acc.shape[:-1] + (1,)`` (kept dims, as TPU VMEM
        scratch holds them). ``base2``: ``m`` is in log2 units (kernels that use ``exp2``).
    Returns:
      ``out [..., D]`` float32 and the natural-log ``lse`` in ``l``'s shape.
    """
    has = l > 0.0
    l_safe = jnp.where(has, l, 1.0)
    kept = l.ndim == acc.ndim
    out = jnp.where(has if kept else has[..., None],
                    acc / (l_safe if kept else l_safe[..., None]), 0.0)
    lse = (m + jnp.log2(l_safe)) * LN2 if base2 else m + jnp.log(l_safe)
    return out, jnp.where(has, lse, -jnp.inf)
