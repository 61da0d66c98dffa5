"""Policy registry: ``sparse.get(name, **params)`` -> a typed, frozen, hashable policy.

    from jaxprefill import sparse
    policy = sparse.get("flexprefill", gamma=0.95, tau=0.1)
    layout = policy.build(q, k, layer=i)          # q [B,S,Hq,D], k [B,S,Hkv,D]

The table below is the list of policies. Unknown names and parameters raise with the valid ones;
a value of the wrong type (a string for a number) raises naming the parameter.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import numpy as np

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
from jaxprefill.validate import is_int, is_number

POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (
    Dense, Streaming, MInference, FlexPrefill, XAttention, ProxyAttn, PBS, TriangleMix, Blasst,
    OracleTopK)}


def available() -> list[str]:
    """Registered policy names."""
    return sorted(POLICIES)


def param_names(name: str) -> list[str]:
    """The typed parameters a policy takes (its dataclass fields, less ``key_columns`` where
    the policy refuses it)."""
    cls = policy_class(name)
    return [f.name for f in dataclasses.fields(cls)
            if f.name != "key_columns" or cls.takes_key_columns]


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
    check_param_types(cls, params)
    return cls(**{k: _freeze(v) for k, v in params.items()})


# What a parameter of each plain field type accepts, and how a message names it.
_KINDS: dict[type, tuple[str, Any]] = {
    bool: ("true or false", lambda v: isinstance(v, (bool, np.bool_))),
    int: ("an integer", is_int),
    float: ("a number", is_number),
    str: ("a string", lambda v: isinstance(v, str)),
}


def check_param_types(cls: type[Policy], params: dict[str, Any]) -> None:
    """A ValueError naming the parameter when a value is not of its field's type (a string
    where a number belongs, from a YAML file or a command line), so it fails here and not deep
    inside jit. Fields of other types (``estimation``) check their own values."""
    hints = typing.get_type_hints(cls)
    for key, value in params.items():
        tp = hints[key]
        union = typing.get_origin(tp) in (typing.Union, types.UnionType)
        allowed = typing.get_args(tp) if union else (tp,)
        optional = type(None) in allowed
        kinds = [a for a in allowed if a is not type(None)]
        if (value is None and optional) or not all(k in _KINDS for k in kinds):
            continue
        if not any(_KINDS[k][1](value) for k in kinds):
            wanted = " or ".join(_KINDS[k][0] for k in kinds) + (" or null" if optional else "")
            raise ValueError(f"{cls.name}: {key} must be {wanted}, got {type(value).__name__} "
                             f"{value!r}")


def _freeze(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v
