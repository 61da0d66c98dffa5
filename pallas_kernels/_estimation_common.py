"""Argument checks and padding shared by the GPU and TPU estimation kernels (no kernel code)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_pooled_inputs(qx: jax.Array, kx: jax.Array, r: int, pool: str, block_n: int) -> None:
    """Raises ValueError naming the problem with pooled_block_scores' arguments (block sizes
    other than block_n are each kernel's own business)."""
    if pool not in ("sum", "max"):
        raise ValueError(f"pool must be 'sum' or 'max', got {pool!r}")
    if not is_pow2(r) or r > block_n:
        raise ValueError(f"r must be a power of two <= block_n={block_n}, got {r}")
    if qx.ndim != 4 or kx.ndim != 4:
        raise ValueError(f"need qx [B, Mq, Hq, Dx] and kx [B, Mk, Hkv, Dx]: {qx.shape}, "
                         f"{kx.shape}")
    (b, mq, hq, dx), (bk, mk, hkv, dxk) = qx.shape, kx.shape
    if b != bk or dx != dxk:
        raise ValueError(f"qx {qx.shape} and kx {kx.shape} differ in batch or Dx")
    if hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    if mq % r or mk % r:
        raise ValueError(f"Mq={mq} and Mk={mk} must be multiples of r={r}")


def per_row(x: Any, b: int, name: str) -> jax.Array:
    """A scalar or [B] int32 argument as int32 [B]."""
    x = jnp.asarray(x, jnp.int32)
    if x.ndim > 1 or (x.ndim == 1 and x.shape[0] not in (1, b)):
        raise ValueError(f"{name} must be a scalar or int32 [B={b}], got shape {x.shape}")
    return jnp.broadcast_to(x.reshape(-1), (b,))


def mass_cut_rows(s: jax.Array, base: jax.Array, goal: jax.Array, max_columns: int, name: str,
                  row_multiple: int, columns: int, weight: jax.Array | None = None,
                  ) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array, int]:
    """Checks mass_cut's arguments and flattens them to rows: (s [rows_p, columns] float32,
    weight [rows_p, columns] float32 or None, base [rows_p], goal [rows_p], rows), rows padded
    to a multiple of ``row_multiple``. Padding has zero mass (never above a cut: its key is 0
    and its weight 0) and goal 0 (no cut qualifies: 2^31 - 1)."""
    lead, m = s.shape[:-1], s.shape[-1]
    if m > max_columns:
        raise ValueError(f"{name}: rows of {m} entries exceed {max_columns}")
    if base.shape != lead or goal.shape != lead:
        raise ValueError(f"base {base.shape} and goal {goal.shape} must have shape {lead}")
    if weight is not None and weight.shape != s.shape:
        raise ValueError(f"{name}: weight {weight.shape} must have the shape of s {s.shape}")
    rows = max(1, math.prod(lead))
    pad_r = -rows % row_multiple

    def matrix(a: jax.Array) -> jax.Array:
        return jnp.pad(a.astype(jnp.float32).reshape(rows, m), ((0, pad_r), (0, columns - m)))

    b = jnp.pad(base.astype(jnp.float32).reshape(rows), (0, pad_r))
    g = jnp.pad(goal.astype(jnp.float32).reshape(rows), (0, pad_r))
    return matrix(s), None if weight is None else matrix(weight), b, g, rows


def cut_key(cut: jax.Array, rows: int, lead: tuple[int, ...]) -> jax.Array:
    """int32 cuts over the low 31 bits [rows_p] -> uint32 [lead], the key of
    ``select.sort_key`` (+ 2^31)."""
    cut = jax.lax.bitcast_convert_type(cut[:rows], jnp.uint32) | jnp.uint32(0x80000000)
    return cut.reshape(lead)
