"""Policy registry: ``sparse.get(name, **params)`` -> a typed, frozen, hashable policy.

    from jaxprefill import sparse
    policy = sparse.get("flexprefill", gamma=0.95, tau=0.1)
    layout = policy.build(q, k, layer=i)          # q [B,S,Hq,D], k [B,S,Hkv,D]

Unknown names and parameters raise with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any

_POLICIES: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: makes ``cls`` available as ``get(cls.name)``."""
    _POLICIES[cls.name] = cls
    return cls


def _load_all() -> None:
    # Import for the side effect of @register (kept lazy: no import cycle with base).
    from jaxprefill.sparse import (blasst, dense, flexprefill, minference, oracle,  # noqa: F401
                                   pbs, proxyattn, streaming, trianglemix, xattention)


def available() -> list[str]:
    """Registered policy names."""
    _load_all()
    return sorted(_POLICIES)


def param_names(name: str) -> list[str]:
    """The typed parameters of a policy (dataclass fields)."""
    return [f.name for f in dataclasses.fields(policy_class(name))]


def policy_class(name: str) -> type:
    _load_all()
    if name not in _POLICIES:
        raise ValueError(f"unknown sparse policy {name!r}; choose one of {sorted(_POLICIES)}")
    return _POLICIES[name]


def get(name: str, **params: Any):
    """The policy ``name`` with ``params`` (see each policy's docstring for defaults).

    Lists become tuples so the policy stays hashable (it is part of the jit cache key).
    """
    cls = policy_class(name)
    known = {f.name: f for f in dataclasses.fields(cls)}
    bad = sorted(set(params) - set(known))
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
