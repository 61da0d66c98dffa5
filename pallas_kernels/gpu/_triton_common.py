"""Helpers shared by the Pallas Triton-lowering kernels (block sizes, compiler params)."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._estimation_common import is_pow2, pow2

# JAX 0.10 names it TritonCompilerParams, 0.11 CompilerParams.
CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
LOG2E = math.log2(math.e)  # the kernels' softmax works in base 2 (exp2)

# How float32 operands are multiplied in a kernel's dots (the ``f32_dot`` argument).
F32_DOTS = {"ieee": lax.Precision.HIGHEST,  # CUDA-core FMAs: exact products, ~40x slower
            "tf32x3": lax.DotAlgorithmPreset.TF32_TF32_F32_X3,  # 3 TF32 products, f32 accuracy
            "tf32": lax.DotAlgorithmPreset.TF32_TF32_F32}  # one TF32 product, ~4e-4 error


def f32_dot_precision(f32_dot: str, dtype: Any, interpret: Any) -> Any:
    """The ``precision`` of a kernel's dots: None for 16-bit inputs; for float32 the algorithm
    named by ``f32_dot``, except in interpret mode (exact there: CPUs have no TF32)."""
    if f32_dot not in F32_DOTS:
        raise ValueError(f"f32_dot must be one of {sorted(F32_DOTS)}, got {f32_dot!r}")
    if jnp.dtype(dtype) != jnp.float32:
        return None
    return lax.Precision.HIGHEST if interpret else F32_DOTS[f32_dot]


__all__ = ["CompilerParams", "F32_DOTS", "LOG2E", "f32_dot_precision", "is_pow2",
           "pow2"]  # Triton block shapes: powers of two
