"""Helpers shared by the Pallas Mosaic GPU (Hopper) kernels: device facts, shared-memory
buffers, and a version-independent ``plgpu.load``."""

from __future__ import annotations

import inspect
from typing import Any

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu

MAX_SMEM = 227 * 1024  # shared memory per block on sm90 (H100 / H200)


def is_hopper() -> bool:
    """True when the default device is an sm90 GPU (H100/H200/H800/H20)."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")) == "9.0"


def num_sms() -> int:
    """Streaming multiprocessors of the default device (132 on an H100 SXM if unknown)."""
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0) or 132) if dev.platform == "gpu" else 132


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def smem(shape: tuple[int, ...], dtype: Any) -> Any:
    """Shared memory with the 128-byte swizzle wgmma and TMA want (tiles of 8 x 64 x 16 bit)."""
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)),
                                                plgpu.SwizzleTransform(128)))


# ``plgpu.load(ref, idx)``: JAX 0.10 requires the index argument, 0.11 deprecates it (index
# the ref with ``ref.at[...]`` instead); decided once here from the signature.
_LOAD_TAKES_IDX = (inspect.signature(plgpu.load).parameters["idx"].default
                   is inspect.Parameter.empty)


def load(ref: Any, **kw: Any) -> jax.Array:
    """``plgpu.load`` of a whole (already indexed) ref on JAX 0.10 and 0.11 without warnings."""
    return plgpu.load(ref, (), **kw) if _LOAD_TAKES_IDX else plgpu.load(ref, **kw)


__all__ = ["MAX_SMEM", "is_hopper", "load", "num_sms", "round_up", "smem"]
