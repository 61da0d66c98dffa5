"""``xattention``: XAttention (ICML'25), strided antidiagonal scoring + per-row threshold.

Estimation (per query head, GQA through grouped einsums):
1. Within every stride x stride sub-block the score is sum_t q[iS + S-1-t] . k[jS + t]: one GEMM
   of the "reshaped" queries (S rows concatenated along D in reverse order) with the reshaped
   keys (S rows in order), size (L/S) x (L/S) x (S*D).
2. Scale 1/(sqrt(D) * S), causal mask at reshaped granularity, softmax over each reshaped row,
   summed into block x block cells (block/S x block/S reshaped entries each).
3. Per query-block row: the sink block and the diagonal first, then blocks in descending score
   until the cumulative score reaches threshold x the row's total.

Defaults: block 128 and threshold 0.9 from the official code's RULER runs
(``Xattention_prefill``'s own default is 0.8); stride 16, the paper's second RULER setting
(Llama-3.1-8B RULER average 88.08 at stride 16, 88.47 at 8, dense 87.52), not the code's 8:
at 128K on an H100 the estimate costs 4.6% of cuDNN dense attention at stride 16 and 8.3% at
stride 8, whose antidiagonal GEMM alone is 6.25% of dense attention's FLOPs
(docs/performance.md, estimation kernels, 2026-11-23). threshold is in (0, 1]; 1 gives the dense
layout.

Not in the paper: 64 key columns by default (``Policy.key_columns``: the keys the last 64 queries
attend most, added to every query block). Antidiagonal block scores spread a key that holds a
query's attention alone over its 128-key block; at 32K on a 135M model that lost 9 points of
task accuracy on the dev split, 4 with the columns (docs/sparse.md). ``key_columns=0`` gives the
paper's layout (faster: the columns cost ~0.26 ms of estimation a layer at 32K on an H100,
measured when they were chosen by a radix search over every key; docs/sparse.md).

Rows are processed in chunks of query blocks so the (L/S)^2 score matrix never exists whole.
The original asserts batch 1 and Hq == Hkv; here both are lifted.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxprefill.sparse import estimators as est
from jaxprefill.sparse.base import Geometry, Policy


def antidiagonal_operands(q: jax.Array, k: jax.Array, geo: Geometry,
                          stride: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The strided GEMM operands: (qr [B, nq*block/stride, Hq, stride*D] with each stride
    group's queries reversed and concatenated along D, kr [B, n*block/stride, Hkv, stride*D]
    with its keys in order, valid rows int32 [B]). qr @ kr^T sums each group's antidiagonal."""
    m = geo.n * geo.block // stride
    mq = geo.nq * geo.block // stride  # stride groups never straddle a block (block % stride == 0)
    qr = est.padded_queries(q, geo).reshape(geo.B, mq, stride, geo.Hq, geo.D)[:, :, ::-1]
    qr = qr.transpose(0, 1, 3, 2, 4).reshape(geo.B, mq, geo.Hq, stride * geo.D)
    kr = est.padded(k, geo).reshape(geo.B, m, stride, geo.Hkv, geo.D).transpose(0, 1, 3, 2, 4)
    kr = kr.reshape(geo.B, m, geo.Hkv, stride * geo.D)
    return qr, kr, (geo.lengths + stride - 1) // stride


def antidiagonal_block_scores(q: jax.Array, k: jax.Array, geo: Geometry, stride: int) -> jax.Array:
    """float32 [B, Hq, nq, n]: XAttention's strided antidiagonal block scores (each valid query
    block's row sums to block/stride). Row-local: a window computes only its query rows."""
    qr, kr, valid_rows = antidiagonal_operands(q, k, geo, stride)
    return est.block_softmax_scores(qr, kr, geo, geo.block // stride, valid_rows,
                                    geo.scale / stride)


@dataclasses.dataclass(frozen=True)
class XAttention(Policy):
    """XAttention. Params: threshold (0.9), stride (16), block_size (128), key_columns (64)."""

    name = "xattention"
    rows_exact = True  # antidiagonal scores and the per-row threshold are row-local
    threshold: float = 0.9
    stride: int = 16
    n_last: int = 128  # the dense query tail (Policy.n_last); 0 gives the paper's layout
    key_columns: int = 64  # sharp single keys the antidiagonal blocks miss (module docstring)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.threshold <= 1:  # a share of each row's score mass
            raise ValueError(f"xattention: threshold must be in (0, 1] (1: every block), got "
                             f"{self.threshold}")
        if self.stride < 1:
            raise ValueError(f"xattention: stride must be >= 1, got {self.stride}")
        if self.block_size % self.stride:
            raise ValueError(f"xattention: block_size {self.block_size} is not a multiple of "
                             f"stride {self.stride}")

    def select(self, q: jax.Array, k: jax.Array, geo: Geometry, layer: int) -> jax.Array:
        scores = antidiagonal_block_scores(q, k, geo, self.stride)
        valid = jnp.broadcast_to(geo.causal(), scores.shape)
        return est.cumulative_keep(scores, valid, self.threshold, forced=geo.forced(),
                                   how=geo.estimation)
