"""Building blocks shared by the decoders: parameters with logical axes, RMSNorm, RoPE, SwiGLU,
the Hadamard rotation.

Every parameter is an `nnx.Param` whose metadata `axes` names its logical dimensions
("embed", "heads", "mlp", ...). `jaxprefill.sharding` maps those names to mesh axes with one
rules table, so no module knows about meshes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprefill.config import RopeConfig


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str | None, ...],
          dtype=jnp.float32, *, init: str = "normal", std: float = 0.02) -> nnx.Param:
    """A parameter of `shape` with logical `axes`; random init (real weights overwrite it)."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape)).astype(dtype)
    return nnx.Param(value, axes=axes)


def dense(eq: str, x: jax.Array, w) -> jax.Array:
    """A projection: einsum(eq, x, w) in x's dtype. `w` is a weight Param, or a module that
    computes the product itself (`jaxprefill.lora.LoRAWeight`: base weight + low-rank branch)."""
    if isinstance(w, nnx.Variable):
        return jnp.einsum(eq, x, w[...].astype(x.dtype))
    return w(eq, x)


class RMSNorm(nnx.Module):
    """y = x / rms(x) * scale, computed in float32 and cast back (as transformers does)."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32, axis_name: str = "norm"):
        self.scale = param(None, (dim,), (axis_name,), param_dtype, init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)); kernels [E, F] and [F, E]."""

    def __init__(self, hidden: int, inner: int, *, bias: bool, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        self.gate = param(rngs, (hidden, inner), ("embed", "mlp"), param_dtype)
        self.up = param(rngs, (hidden, inner), ("embed", "mlp"), param_dtype)
        self.down = param(rngs, (inner, hidden), ("mlp", "embed"), param_dtype)
        if bias:
            self.gate_bias = param(None, (inner,), ("mlp",), param_dtype, init="zeros")
            self.up_bias = param(None, (inner,), ("mlp",), param_dtype, init="zeros")
            self.down_bias = param(None, (hidden,), ("embed",), param_dtype, init="zeros")
        self.bias = bias

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        gate = dense("...e,ef->...f", x, self.gate)
        up = dense("...e,ef->...f", x, self.up)
        if self.bias:
            gate, up = gate + self.gate_bias[...].astype(dt), up + self.up_bias[...].astype(dt)
        y = dense("...f,fe->...e", jax.nn.silu(gate) * up, self.down)
        return y + self.down_bias[...].astype(dt) if self.bias else y


# ---- RoPE ---------------------------------------------------------------------------------------

def rope_inv_freq(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies [head_dim // 2] (float64 numpy) and the cos/sin scale for `rope.type`.

    Follows transformers' `modeling_rope_utils` so logits match: llama3 smooths between the
    scaled low and unscaled high frequencies; yarn blends interpolation/extrapolation over a
    ramp of dimensions and scales cos/sin by an attention factor; dynamic (NTK) raises theta.
    """
    dim = head_dim
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if rope.type == "default":
        return inv_freq, 1.0
    if rope.type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled), 1.0
    if rope.type == "yarn":
        return _yarn_inv_freq(rope, dim, inv_freq)
    if rope.type == "dynamic":
        # transformers' dynamic NTK recomputes the base per sequence length L; our tables are
        # static, so take its base at the longest length, L = factor x the original context
        f = rope.factor
        base = rope.theta * (f * f - f + 1) ** (dim / (dim - 2))
        return 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)), 1.0
    raise ValueError(f"unknown rope type {rope.type!r}")


def _yarn_inv_freq(rope: RopeConfig, dim: int, inv_freq: np.ndarray) -> tuple[np.ndarray, float]:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        orig = rope.original_max_position_embeddings
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1 keeps the original frequency, 0 interpolates it
    blended = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return blended, float(attention_factor)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, scale: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, S, D] (float32) for integer positions [B, S], rotate-half layout."""
    inv = jnp.asarray(inv_freq, jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv  # [B, S, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, S, H, D] by cos/sin [B, S, D] (HF rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def rope_cos_sin_half(positions: jax.Array, inv_freq: np.ndarray, scale: float
                      ) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, S, D/2] (float32): one angle per rotation pair (no duplicated halves)."""
    inv = jnp.asarray(inv_freq, jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope_pairs(x: jax.Array, cos: jax.Array, sin: jax.Array, *, interleaved: bool) -> jax.Array:
    """Rotate x [B, S, H, D] by per-pair cos/sin [B, S, D/2]; output in rotate-half layout.

    interleaved=True: pairs are (x[2i], x[2i+1]) (DeepSeek checkpoints, `view_as_complex`);
    interleaved=False: pairs are (x[i], x[i + D/2]) (HF rotate-half). Either way the result is
    [x1*cos - x2*sin | x2*cos + x1*sin] with x1/x2 the pair members, i.e. the de-interleaved
    order of transformers' DeepseekV3 `apply_rotary_pos_emb_interleave`. Queries and keys are
    permuted alike, so dot products equal DeepSeek's interleaved ones exactly.
    """
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def hadamard(n: int) -> np.ndarray:
    """Orthonormal Sylvester Hadamard matrix [n, n] (n a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard transform needs a power-of-two size, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)
