"""``proxyattn``: ProxyAttn (ICLR'26), pooled proxy heads rank blocks, per-head budgets size them.

The official repository was not retrievable; this follows the paper's description
(docs/methods/proxyattn.md), defaults marked "ours" are unverified:
1. One proxy head per GQA group: Q_g = mean of the group's query heads, K_g = the group's KV
   head. Token scores softmax(Q_g K_g^T / sqrt(D)) on every ``stride``-th token (the first of
   each stride window; cost ~ 1/stride^2 of one head's attention per group), max-pooled into
   blocks: one block ranking A_g shared by the group.
2. Per query head i: a = softmax(Q_i[last block] K^T / sqrt(D)) summed into key blocks; budget
   ratio r_i = (fewest blocks whose mass reaches gamma) / (blocks of the row).
3. Query block m of head i keeps the top max(min_blocks, ceil(r_i * (m + 1))) blocks of A_g[m].
4. (ours, ``last_block_exact``) The last query block, the one whose final token generates,
   also keeps the blocks of its own exact selection from step 2 (the fewest blocks holding
   gamma of head i's mass over the last ``block`` queries): the group proxy averages the query
   heads, and a retrieval head's
   needle block can fall outside the proxy's top blocks. Free: step 2 computed that mass.

Defaults (ours): gamma 0.95, stride 16, min_blocks 2, block 128. gamma >= 1 gives dense.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxprefill.sparse import estimators as est
from jaxprefill.sparse.base import Geometry, Policy


def proxy_block_scores(q: jax.Array, k: jax.Array, geo: Geometry, stride: int,
                       key_stride: int | None = None) -> jax.Array:
    """float32 [B, Hkv, nq, n]: strided proxy-head attention max-pooled to blocks (row-local).
    Queries are sampled every ``stride`` tokens, keys every ``key_stride`` (default: stride)."""
    key_stride = stride if key_stride is None else key_stride
    qg = q.astype(jnp.float32).reshape(geo.B, q.shape[1], geo.Hkv, geo.G, geo.D).mean(axis=3)
    proxy_geo = dataclasses.replace(geo, Hq=geo.Hkv)
    # first token of each stride window (a window starts on a block, a multiple of stride)
    qs = est.padded_queries(qg, proxy_geo)[:, ::stride]
    ks = est.padded(k, geo)[:, ::key_stride]
    valid_rows = (geo.lengths + stride - 1) // stride
    valid_cols = (geo.lengths + key_stride - 1) // key_stride
    return est.block_softmax_scores(qs, ks, proxy_geo, geo.block // stride, valid_rows,
                                    geo.scale, pool="max", rk=geo.block // key_stride,
                                    valid_cols=valid_cols)


@dataclasses.dataclass(frozen=True)
class ProxyAttn(Policy):
    """ProxyAttn. Params: gamma (0.95), stride (16), key_stride (None: = stride; 1 scores every
    key, so a needle between sampled keys is not missed, at 1/stride of a group attention's
    cost instead of 1/stride^2: ours, not the paper's), min_blocks (2), last_block_exact
    (False; True adds each head's exact gamma-selection to the last query block: ours, see the
    module docstring), block_size (128)."""

    name = "proxyattn"
    rows_exact = True  # proxy scores are row-local; budgets come from the last query block
    gamma: float = 0.95
    stride: int = 16
    key_stride: int | None = None
    min_blocks: int = 2
    last_block_exact: bool = False
    n_last: int = 128  # the dense query tail (Policy.n_last); 0 gives the paper's layout

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.gamma <= 1:  # a share of the last query block's attention mass
            raise ValueError(f"proxyattn: gamma must be in (0, 1], got {self.gamma}")
        if self.stride < 1:
            raise ValueError(f"proxyattn: stride must be >= 1, got {self.stride}")
        if self.block_size % self.stride:
            raise ValueError(f"proxyattn: block_size {self.block_size} is not a multiple of "
                             f"stride {self.stride}")
        if self.key_stride is not None and (self.key_stride < 1 or self.stride % self.key_stride):
            raise ValueError(f"proxyattn: key_stride {self.key_stride} must divide stride "
                             f"{self.stride}")

    def select(self, q: jax.Array, k: jax.Array, geo: Geometry, layer: int) -> jax.Array:
        a_g = proxy_block_scores(q, k, geo, self.stride, self.key_stride)  # [B, Hkv, nq, n]
        a = jnp.repeat(a_g, geo.G, axis=1)  # ranking shared by the group's query heads
        vert, _ = est.last_q_sums(q, k, geo, geo.block, slash=False)  # [B, Hq, S]
        mass = est.block_sum(vert, geo)  # [B, Hq, n]
        nb = geo.row_blocks()[:, None]
        blk_ok = jnp.arange(geo.n)[None, None, :] < nb[:, :, None]
        exact = est.cumulative_keep(mass, blk_ok, self.gamma, how=geo.estimation)  # [B, Hq, n] last block's own
        need = exact.sum(-1)  # [B, Hq]
        ratio = need / nb  # [B, Hq]
        row_len = geo.query_rows()[:, None, :] + 1  # causal blocks of query block m
        count = jnp.maximum(self.min_blocks, jnp.ceil(ratio[:, :, None] * row_len)).astype(
            jnp.int32)
        valid = jnp.broadcast_to(geo.causal(), a.shape)
        keep = est.topk_mask(a, valid, count, how=geo.estimation)
        if self.last_block_exact:
            last = geo.query_rows()[:, None, :, None] == (nb - 1)[:, :, None, None]  # [B,1,nq,1]
            keep = keep | (last & exact[:, :, None, :])
        return keep
