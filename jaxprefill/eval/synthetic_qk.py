"""Structured synthetic q/k with the attention patterns sparse prefill exploits.

Random Gaussian q/k give near-uniform attention (every block matters, no method can be sparse);
real models show sinks, a local window and a few vertical lines. This generator plants exactly
those, so GPU benchmarks at 32K-128K (no real weights there) measure estimators on realistic
structure. Per KV head (query heads of a group share it, with their own amplitudes):

* noise: N(0, noise^2) in every dimension of q and k;
* sinks: keys 0..n_sink-1 get +4 * u_sink; every query gets +a_h * u_sink (u unit vectors, a_h
  a per-query-head amplitude in [0.5, 1.5]): a logit boost of ~4 * a_h;
* vertical lines: ``n_vertical`` random key positions get +2.5 * u_vert, queries +a_h * u_vert
  (those columns draw attention from every later query);
* local window: the first 2F dims carry (cos, sin)(2 pi i / P_f) * a_local on queries and keys,
  periods P_f = 4 * local * 2^f: the q.k term sum_f cos(2 pi (i - j) / P_f) decays with |i - j|.

Amplitudes are scaled by D^(1/4) on each side so logits (scaled by 1/sqrt(D)) land in a realistic range.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def structured_qk(key: jax.Array, batch: int, seq: int, hq: int, hkv: int, d: int, *,
                  n_sink: int = 4, n_vertical: int = 16, local: int = 256, n_freq: int = 4,
                  noise: float = 0.5, dtype=jnp.bfloat16) -> tuple[jax.Array, jax.Array]:
    """Returns q [B, S, Hq, D] and k [B, S, Hkv, D] (see module docstring)."""
    kq, kk, ks, kv, ka, kc = jax.random.split(key, 6)
    g = hq // hkv
    scale = d ** 0.5
    q = noise * jax.random.normal(kq, (batch, seq, hq, d), jnp.float32)
    k = noise * jax.random.normal(kk, (batch, seq, hkv, d), jnp.float32)
    unit = lambda kk_: (lambda u: u / jnp.linalg.norm(u, axis=-1, keepdims=True))(  # noqa: E731
        jax.random.normal(kk_, (hkv, d)).at[:, : 2 * n_freq].set(0.0))
    u_sink, u_vert = unit(ks), unit(kv)
    amp = jax.random.uniform(ka, (hq,), minval=0.5, maxval=1.5)  # per query head strength
    pos = jnp.arange(seq)
    sink_on = (pos < n_sink).astype(jnp.float32)[None, :, None, None]
    cols = jax.random.choice(kc, jnp.arange(n_sink, seq), (batch, n_vertical), replace=False)
    vert_on = jnp.zeros((batch, seq)).at[jnp.arange(batch)[:, None], cols].set(1.0)
    k = k + (4.0 * sink_on * u_sink + 2.5 * vert_on[:, :, None, None] * u_vert) * scale ** 0.5
    qdir = jnp.repeat(u_sink + u_vert, g, axis=0) * amp[:, None]  # [Hq, D]
    q = q + qdir[None, None] * scale ** 0.5
    periods = 4.0 * local * 2.0 ** jnp.arange(n_freq)
    ang = 2 * jnp.pi * pos[:, None] / periods[None, :]  # [S, F]
    feat = jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1) * scale ** 0.5  # [S, 2F]
    q = q.at[..., : 2 * n_freq].add(feat[None, :, None, :] * amp[None, None, :, None])
    k = k.at[..., : 2 * n_freq].add(feat[None, :, None, :])
    return q.astype(dtype), k.astype(dtype)
