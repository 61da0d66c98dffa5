"""Helpers shared by the Pallas Triton-lowering kernels (block sizes, compiler params)."""

from __future__ import annotations

import math

from jax.experimental.pallas import triton as plgpu

# JAX 0.10 names it TritonCompilerParams, 0.11 CompilerParams.
CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
LOG2E = math.log2(math.e)  # the kernels' softmax works in base 2 (exp2)


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton block shapes are powers of two."""
    return 1 << max(0, (n - 1).bit_length())


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
