"""Policy registry: ``sparse.get(name, **params)`` -> a typed, frozen, hashable policy.

    from jaxprefill import sparse
    policy = sparse.get("flexprefill", gamma=0.95, tau=0.1)
    layout = policy.build(q, k, layer=i)          # q [B,S,Hq,D], k [B,S,Hkv,D]

The table below is the list of policies. Unknown names and parameters raise with the valid ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxprefill.sparse.base import Policy
from jaxprefill.sparse.blasst import Blasst
from jaxprefill.sparse.dense import Dense
from jaxprefill.sparse.flexprefill import FlexPrefill
from jaxprefill.sparse.minference import MInference
from jaxprefill.sparse.oracle import OracleTopK
from jaxprefill.sparse.pbs import PBS
from jaxprefill.sparse.proxyattn import ProxyAttn
from jaxprefill.sparse.streaming import Streaming
from jaxprefill.sparse.trianglemix import TriangleMix
from jaxprefill.sparse.xattention import XAttention

POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (
    Dense, Streaming, MInference, FlexPrefill, XAttention, ProxyAttn, PBS, TriangleMix, Blasst,
    OracleTopK)}


def available() -> list[str]:
    """Registered policy names."""
    return sorted(POLICIES)


def param_names(name: str) -> list[str]:
    """The typed parameters of a policy (dataclass fields)."""
    return [f.name for f in dataclasses.fields(policy_class(name))]


def policy_class(name: str) -> type[Policy]:
    if name not in POLICIES:
        raise ValueError(f"unknown sparse policy {name!r}; choose one of {available()}")
    return POLICIES[name]


def get(name: str, **params: Any) -> Policy:
    """The policy ``name`` with ``params`` (see each policy's docstring for defaults).

    Lists become tuples so the policy stays hashable (it is part of the jit cache key).
    """
    cls = policy_class(name)
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(params) - known)
    if bad:
        raise ValueError(f"unknown parameter(s) {bad} for sparse policy {name!r}; "
                         f"known: {sorted(known)}")
    return cls(**{k: _freeze(v) for k, v in params.items()})


def _freeze(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v
