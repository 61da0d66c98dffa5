"""``blasst``: BLASST (arXiv 2512.12087), a data-dependent skip inside the attention kernel.

No estimation pass: the layout is dense causal, and the kernel drops, per query row, every key
tile (block) whose max logit is below the row's running max by more than ``ln(lambda)``: its
softmax weights are all below ``lambda`` times the current max weight. The exact rule (per row,
tiles in list order) is in :mod:`pallas_kernels.reference`; kernels save the exp and P.V work
of tiles that all rows of a program skip (the paper's per-tile vote).

The paper calibrates one lambda per phase as ``lambda(L) = a / L`` (linear regression of the
best lambda on 1/L); its examples, about 75% sparsity at lambda ~ 1e-4 for 8K tokens and ~ 1e-5
for 64K, give ``a ~ 0.8`` (0.82 and 0.66), our default. ``lam`` fixes lambda for all lengths.

Measured on an H100 (2026-11-23, structured synthetic q/k, Llama-3-8B heads, 32K and 128K): no
speedup yet. The Triton kernel with the skip ran 13-18% slower than without it, because almost
no 128-row tile is skipped by all its rows on those inputs (see docs/performance.md). On GPUs
the kernel resolver runs this policy on the Triton kernel: the Mosaic one has no BLASST
predicate.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxprefill.sparse.base import Geometry, Policy


@dataclasses.dataclass(frozen=True)
class Blasst(Policy):
    """BLASST. Params: lam (None: calibrated ``calib_a / L``, L = the padded prefill length),
    calib_a (0.8, from the paper's lambda(8K) ~ 1e-4 / lambda(64K) ~ 1e-5 examples),
    block_size (128: the kernel tile), heads ("kv": the dense layout is shared by a GQA group)."""

    name = "blasst"
    rows_exact = True  # static dense layout: a window's rows are the rows of the pattern
    heads: str = "kv"
    lam: float | None = None
    calib_a: float = 0.8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lam is not None and not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"blasst: lam must be in [0, 1], got {self.lam}")
        if self.calib_a < 0:
            raise ValueError(f"blasst: calib_a must be >= 0, got {self.calib_a}")

    def select(self, q: jax.Array, k: jax.Array, geo: Geometry, layer: int) -> jax.Array:
        return jnp.ones((geo.B, geo.Hkv, geo.nq, geo.n), bool)  # dense causal (after finish)

    def threshold(self, seq_len: int) -> float:
        """lambda for a prefill of ``seq_len`` tokens (static)."""
        if self.lam is not None:
            return float(self.lam)
        return min(1.0, self.calib_a / max(int(seq_len), 1))

    def kernel_options(self, seq_len: int) -> dict[str, float]:
        """Extra ``block_sparse_attention`` kwargs for this policy's layouts."""
        return {"blasst_threshold": self.threshold(seq_len)}


__all__ = ["Blasst"]
