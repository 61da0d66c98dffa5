"""Sparse prefill: training-free policies turning one layer's (q, k) into a block-sparse layout.

    from jaxprefill import sparse
    policy = sparse.get("flexprefill", gamma=0.95, tau=0.1)
    layout = policy.build(q, k, layer=i)      # q [B,S,Hq,D], k [B,S,Hkv,D] -> BlockSparseLayout

    cfg = sparse.SparseConfig.parse("configs/sparse/smollm2.yaml")   # per-layer policies
    jp.generate(model, tok, prompts, sparse=cfg)                      # or sparse="flexprefill"

Policies: dense, streaming, minference (vertical lines on the kernels' column path), flexprefill,
xattention, proxyattn, trianglemix, blasst (in-kernel skip: dense layout + a kernel threshold),
oracle_topk, pbs (permuted block-sparse, causal by construction; see each module).
"""

from jaxprefill.sparse.base import Geometry, Policy
from jaxprefill.sparse.config import LayerRule, SparseConfig
from jaxprefill.sparse.estimation import Estimation
from jaxprefill.sparse.prefill import Prefill
from jaxprefill.sparse.registry import available, get, param_names

__all__ = ["Estimation", "Geometry", "LayerRule", "Policy", "Prefill", "SparseConfig",
           "available", "get", "param_names"]
