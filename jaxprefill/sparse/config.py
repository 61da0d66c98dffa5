"""``SparseConfig``: which policy each layer uses, the dense-below length, block sizes.

Frozen and hashable: it sits in ``AttentionSpec`` (the model's static graph). Build one from a
policy name, a ``name:key=value,...`` spec, a policy object, a dict or a YAML file:

    SparseConfig.parse("flexprefill")                       # every layer, defaults
    SparseConfig.parse("xattention:threshold=0.95,stride=8")  # every layer, these parameters
    SparseConfig.parse("configs/sparse/smollm2.yaml")
    SparseConfig.from_dict({"min_length": 2048, "block_size": 64,
                            "layers": [{"range": [0, 4], "policy": "dense"},
                                       {"policy": "flexprefill", "params": {"gamma": 0.9}}]})

YAML/dict keys: ``policy`` + ``params`` (all layers) or ``layers`` (a list of rules, first match
wins; a rule without ``range`` matches every layer; ``range: [start, stop)``, stop may be null),
``min_length`` (rows shorter than this, and whole prefills shorter than this, are dense),
``block_size`` (overrides every policy's block size), ``heads`` ("q" | "kv", likewise),
``estimation`` (how every policy's estimation runs: an implementation name, auto | xla | triton
| mosaic_tpu | reference, or a mapping with ``impl``, ``interpret``, ``selection``, ``extent``: see
:class:`jaxprefill.sparse.Estimation`), ``kernel`` (the block-sparse implementation: auto | xla
| reference | triton | mosaic_gpu | mosaic_tpu; a named one that cannot run a call raises; or a
mapping ``{impl: mosaic_gpu, persistent: true, num_stages: 2, order: groups}`` that also sets
the Mosaic GPU kernel's tuning knobs, :class:`BlockSparseMosaicConfig`), ``recall_target`` /
``recall_probes`` (the recall guard of every policy: heads whose exact attention recall on probe
rows is below the target run dense; :mod:`jaxprefill.sparse.recall_guard`).
Layers no rule matches are dense. Unknown keys raise, naming them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any


from pallas_kernels import IMPLS as KERNELS
from pallas_kernels.gpu.block_sparse_mosaic import BlockSparseMosaicConfig
from jaxprefill.config import read_yaml
from jaxprefill.sparse import registry
from jaxprefill.sparse.base import Policy

_TOP_KEYS = {"policy", "params", "layers", "min_length", "block_size", "heads", "estimation",
             "kernel", "recall_target", "recall_probes"}
_RULE_KEYS = {"range", "policy", "params"}


@dataclasses.dataclass(frozen=True)
class LayerRule:
    """Layers ``start <= i < stop`` (stop None = to the end) use ``policy``."""

    start: int
    stop: int | None
    policy: Policy

    def matches(self, layer: int) -> bool:
        return layer >= self.start and (self.stop is None or layer < self.stop)


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """Sparse prefill configuration (see module docstring)."""

    rules: tuple[LayerRule, ...]
    min_length: int = 1024
    kernel: str = "auto"
    # The Mosaic GPU kernel's tuning knobs (None: its defaults); only with kernel "mosaic_gpu",
    # so that a config naming knobs never runs another backend without them.
    kernel_config: BlockSparseMosaicConfig | None = None

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"sparse kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.kernel_config is not None and self.kernel != "mosaic_gpu":
            raise ValueError(f"sparse kernel tuning knobs are for mosaic_gpu; name it "
                             f"(kernel: {{impl: mosaic_gpu, ...}}), not {self.kernel!r}")
        if self.min_length < 0:
            raise ValueError(f"min_length must be >= 0, got {self.min_length}")

    def policy_for(self, layer: int) -> Policy | None:
        """The policy of ``layer``, or None (dense)."""
        for rule in self.rules:
            if rule.matches(layer):
                return None if rule.policy.name == "dense" else rule.policy
        return None

    def layout_source(self, layer: int) -> int:
        """The layer whose layout ``layer`` runs: itself, or with the policy's ``share_layers``
        k > 1 the first layer of its group (layers j with j // k == layer // k) under the same
        rule, which builds the layout from its own q and k."""
        policy = self.policy_for(layer)
        k = 1 if policy is None else policy.share_layers
        for j in range(layer - layer % k, layer):
            if self.policy_for(j) is policy:
                return j
        return layer

    def with_estimation(self, **changes: Any) -> "SparseConfig":
        """This config with the given :class:`jaxprefill.sparse.Estimation` fields changed in
        every layer's policy (e.g. ``extent="bucket"``)."""
        rules = tuple(dataclasses.replace(r, policy=dataclasses.replace(
            r.policy, estimation=dataclasses.replace(r.policy.estimation, **changes)))
            for r in self.rules)
        return dataclasses.replace(self, rules=rules)

    def describe(self) -> str:
        parts = [f"[{r.start},{'' if r.stop is None else r.stop}) {r.policy.name}"
                 for r in self.rules]
        return f"sparse(min_length={self.min_length}: " + "; ".join(parts) + ")"

    # ------------------------------------------------------------------------------ builders
    @classmethod
    def parse(cls, spec: Any) -> "SparseConfig":
        """SparseConfig | Policy | policy name | ``name:key=value,...`` | YAML path | dict ->
        SparseConfig. In a spec each value is read as true / false, an int, a float, else a
        string."""
        if isinstance(spec, SparseConfig):
            return spec
        if isinstance(spec, Policy):
            return cls((LayerRule(0, None, spec),))
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        if isinstance(spec, (str, os.PathLike)):
            s = str(spec)
            if names_file(s):
                return cls.from_yaml(s)
            name, _, params = s.partition(":")
            return cls.from_dict({"policy": name, "params": _spec_params(params)})
        raise TypeError(f"cannot make a SparseConfig from {type(spec).__name__}")

    @classmethod
    def from_yaml(cls, path: str) -> "SparseConfig":
        if not os.path.exists(path):
            raise FileNotFoundError(f"sparse config {path} does not exist")
        data = read_yaml(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a sparse config must be a mapping")
        _resolve_head_configs(data, os.path.dirname(os.path.abspath(path)))
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from e

    @classmethod
    def from_dict(cls, data: dict) -> "SparseConfig":
        bad = sorted(set(data) - _TOP_KEYS)
        if bad:
            raise ValueError(f"unknown sparse config key(s) {bad}; known: {sorted(_TOP_KEYS)}")
        if ("policy" in data) == ("layers" in data):
            raise ValueError("a sparse config needs exactly one of 'policy' or 'layers'")
        common = {k: data[k] for k in ("block_size", "heads", "estimation", "recall_target",
                                       "recall_probes") if data.get(k) is not None}
        raw = data["layers"] if "layers" in data else [
            {"policy": data["policy"], "params": data.get("params") or {}}]
        rules = []
        for n, rule in enumerate(raw):
            bad = sorted(set(rule) - _RULE_KEYS)
            if bad:
                raise ValueError(f"layers[{n}]: unknown key(s) {bad}; known: {sorted(_RULE_KEYS)}")
            if "policy" not in rule:
                raise ValueError(f"layers[{n}]: missing 'policy'")
            start, stop = rule.get("range", (0, None))
            params = {**common, **(rule.get("params") or {})}
            rules.append(LayerRule(int(start), None if stop is None else int(stop),
                                   registry.get(rule["policy"], **params)))
        kernel, knobs = _kernel(data.get("kernel", "auto"))
        return cls(tuple(rules), int(data.get("min_length", 1024)), kernel, knobs)


def _kernel(value: Any) -> tuple[str, BlockSparseMosaicConfig | None]:
    """(implementation name, Mosaic GPU knobs or None) of a config's ``kernel`` entry: a name,
    or a mapping with ``impl`` and the fields of :class:`BlockSparseMosaicConfig`."""
    if not isinstance(value, dict):
        return value, None
    knobs = {f.name for f in dataclasses.fields(BlockSparseMosaicConfig)}
    bad = sorted(set(value) - knobs - {"impl"})
    if bad:
        raise ValueError(f"kernel: unknown key(s) {bad}; known: {sorted(knobs | {'impl'})}")
    fields = {k: v for k, v in value.items() if k != "impl"}
    try:
        return value.get("impl", "auto"), BlockSparseMosaicConfig(**fields) if fields else None
    except ValueError as e:
        raise ValueError(f"kernel: {e}") from e


def names_file(spec: str) -> bool:
    """Whether a string config names a YAML file rather than a policy (``name`` or
    ``name:key=value,...``, whose values may be paths)."""
    name, colon, _ = spec.partition(":")
    if colon and os.path.sep not in name:
        return False
    return spec.endswith((".yaml", ".yml")) or os.path.sep in spec


def _spec_params(text: str) -> dict[str, Any]:
    """{key: value} of the ``key=value,...`` part of a policy spec."""
    params: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        params[key] = _spec_value(value)
    return params


def _spec_value(text: str) -> Any:
    """'true' / 'false' -> bool, then int, float, else the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _resolve_head_configs(data: dict, base: str) -> None:
    """A relative ``head_config`` in a YAML file names a file beside that YAML (in place)."""
    rules = data.get("layers") if isinstance(data.get("layers"), list) else [data]
    for rule in rules:
        params = rule.get("params") if isinstance(rule, dict) else None
        path = params.get("head_config") if isinstance(params, dict) else None
        if isinstance(path, str) and not os.path.isabs(path):
            params["head_config"] = os.path.join(base, path)
