"""Inputs and reference shared by the pooled-scores kernel tests (Triton and TPU)."""

import jax
import jax.numpy as jnp

from jaxprefill.sparse.base import make_geometry, make_row_geometry
from jaxprefill.sparse.estimation import Estimation
from jaxprefill.sparse.estimators import block_softmax_scores


def pooled_inputs(seed: int, B: int, Mq: int, Mk: int, Hq: int, Hkv: int, Dx: int, dtype):
    """Fresh random qx [B, Mq, Hq, Dx], kx [B, Mk, Hkv, Dx] in ``dtype``."""
    kq, kk = jax.random.split(jax.random.key(seed))
    qx = jax.random.normal(kq, (B, Mq, Hq, Dx), jnp.float32).astype(dtype)
    kx = jax.random.normal(kk, (B, Mk, Hkv, Dx), jnp.float32).astype(dtype)
    return qx, kx


def pooled_reference(qx, kx, r, valid_rows, scale, pool, row_start=None):
    """The chunked-XLA estimator the kernels replace (rows from ``row_start`` when given)."""
    xla = Estimation("xla")  # the reference takes its XLA path
    if row_start is None:
        geo = make_geometry(qx, kx, r, None, xla)
    else:
        geo = make_row_geometry(qx, kx, r, row_start // r, None, xla)
    return block_softmax_scores(qx, kx, geo, r, valid_rows, scale, pool)
