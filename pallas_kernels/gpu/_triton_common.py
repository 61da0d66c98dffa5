"""Helpers shared by the Pallas Triton-lowering kernels (block sizes, compiler params)."""

from __future__ import annotations

import math

from jax.experimental.pallas import triton as plgpu

from pallas_kernels._estimation_common import is_pow2, pow2

# JAX 0.10 names it TritonCompilerParams, 0.11 CompilerParams.
CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
LOG2E = math.log2(math.e)  # the kernels' softmax works in base 2 (exp2)

__all__ = ["CompilerParams", "LOG2E", "is_pow2", "pow2"]  # Triton block shapes: powers of two
