"""Adapter files: LoRA factors (plus any whole replaced tensors and config overrides) that
`jp.load(base, adapter=...)` applies to a base model while it loads.

One safetensors file. Tensor names and layouts are PEFT's:
    base_model.model.<module>.lora_A.weight   [r, in]    one pair per adapted HF weight
    base_model.model.<module>.lora_B.weight   [out, r]   <module>.weight, e.g. model.layers.0.self_attn.q_proj
    base_model.model.<tensor name>            a whole tensor replacing the base's (trained norms, biases)
The safetensors metadata entry "jaxprefill.adapter" holds JSON:
    {"format": 1, "kind": "lora", "base_model": "smollm2-135m-instruct", "model_type": "llama",
     "targets": ["q", ...], "rank": 16, "alpha": 32.0,
     "config_overrides": {"max_position_embeddings": 32768, "rope_theta": 100000.0,
                          "rope_scaling": {"rope_type": "yarn", "factor": 4.0, ...} or null}}

Applying it works in HF space, before weights are converted to our layout, so it serves every
base `jp.load` reads (safetensors directories and GGUF files, Llama and DeepSeek families):
each adapted tensor becomes W + (alpha / rank) * B @ A (float32), each replaced tensor is taken
as is, and `config_overrides` (config.json spelling) replace the base config's fields.
`apply_config_overrides` also serves training-free context extension: `jp.load(base,
overrides={"rope_scaling": {"rope_type": "dynamic", "factor": 4.0, ...}})`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxprefill.config import ConfigError
from jaxprefill.loading.safetensors_io import DTYPES, _read_header
from jaxprefill.loading.weights import TensorSource, WeightError
from jaxprefill.validate import is_int, is_number

PREFIX = "base_model.model."
METADATA_KEY = "jaxprefill.adapter"
ADAPTER_FILE = "adapter.safetensors"  # the name a training run writes in its output_dir
# config.json fields an adapter (or `jp.load(overrides=...)`) may change: none changes a shape
OVERRIDABLE = ("max_position_embeddings", "rope_theta", "rope_scaling")

# Bundled names that are a bundled base model + an adapter shipped in jaxprefill/assets/:
# name -> (base model name, adapter file name, the recipe that trains it)
BUNDLED_ADAPTERS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-32k": ("smollm2-135m-instruct", "smollm2-135m-32k.safetensors",
                         "configs/train/smollm2-32k-lora.yaml, then "
                         "configs/train/smollm2-32k-lora-stage2.yaml"),
}
ASSET_DIR = Path(__file__).resolve().parents[1] / "assets"


def bundled_adapter_path(name: str) -> Path:
    """The asset file of a bundled adapter name; FileNotFoundError (one line) when it is not in
    this installation."""
    _, filename, recipe = BUNDLED_ADAPTERS[name]
    path = ASSET_DIR / filename
    if not path.is_file():
        raise FileNotFoundError(f"{name!r} needs the adapter file jaxprefill/assets/{filename}, "
                                f"which is not in this installation (it is trained with {recipe})")
    return path


def resolve_adapter(adapter: str | os.PathLike) -> Path:
    """A bundled adapter name, a .safetensors file, or a directory holding adapter.safetensors
    (a training run's output_dir) -> the file."""
    name = os.fspath(adapter)
    if name.lower() in BUNDLED_ADAPTERS:
        return bundled_adapter_path(name.lower())
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"adapter {name!r} is neither a bundled adapter "
                                f"{sorted(BUNDLED_ADAPTERS)}, a .safetensors file, nor a directory "
                                f"holding {ADAPTER_FILE}")
    return path


@dataclasses.dataclass
class Adapter:
    """A parsed adapter file (module docstring)."""

    path: Path
    meta: dict[str, Any]
    pairs: dict[str, tuple[np.ndarray, np.ndarray]]   # HF weight name -> (A [r, in], B [out, r])
    replace: dict[str, np.ndarray]                    # HF tensor name -> whole tensor

    @property
    def scale(self) -> float:
        return float(self.meta["alpha"]) / int(self.meta["rank"])

    @property
    def config_overrides(self) -> dict[str, Any]:
        return dict(self.meta.get("config_overrides") or {})


def read_adapter(adapter: str | os.PathLike) -> Adapter:
    """Parse and check an adapter (`resolve_adapter` names); WeightError naming the file and the
    problem for a malformed one."""
    path = resolve_adapter(adapter)
    header, data_start = _read_header(path)
    raw_meta = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if raw_meta is None:
        raise WeightError(f"{path} is not a jaxprefill adapter: its safetensors metadata has no "
                          f"{METADATA_KEY!r} entry")
    try:
        meta = json.loads(raw_meta)
        rank, alpha = int(meta["rank"]), float(meta["alpha"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise WeightError(f"{path}: malformed {METADATA_KEY!r} metadata "
                          f"({type(e).__name__}: {e})") from None
    if rank < 1 or not np.isfinite(alpha):
        raise WeightError(f"{path}: rank must be >= 1 and alpha finite, got rank={rank}, "
                          f"alpha={alpha}")
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not key.startswith(PREFIX):
            raise WeightError(f"{path}: tensor {key!r} does not start with {PREFIX!r}")
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise WeightError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        begin, _ = info["data_offsets"]
        tensors[key[len(PREFIX):]] = np.asarray(np.memmap(
            path, dtype=dtype, mode="r", offset=data_start + begin, shape=tuple(info["shape"])),
            np.float32)
    pairs, replace = {}, {}
    for name, value in tensors.items():
        if name.endswith(".lora_B.weight"):
            continue
        if name.endswith(".lora_A.weight"):
            module = name[:-len(".lora_A.weight")]
            b = tensors.get(f"{module}.lora_B.weight")
            if b is None:
                raise WeightError(f"{path}: {PREFIX}{name} has no matching lora_B tensor")
            if value.ndim != 2 or b.ndim != 2 or value.shape[0] != rank or b.shape[1] != rank:
                raise WeightError(f"{path}: {module} has lora_A {value.shape} and lora_B "
                                  f"{b.shape}; expected [rank, in] and [out, rank] with rank {rank}")
            pairs[f"{module}.weight"] = (value, b)
        else:
            replace[name] = value
    orphans = [n for n in tensors if n.endswith(".lora_B.weight")
               and f"{n[:-len('.lora_B.weight')]}.weight" not in pairs]
    if orphans:
        raise WeightError(f"{path}: {PREFIX}{orphans[0]} has no matching lora_A tensor")
    overrides = meta.get("config_overrides") or {}
    if not isinstance(overrides, dict):
        raise WeightError(f"{path}: config_overrides must be a JSON object, got {overrides!r}")
    check_overrides(overrides, f"{path} config_overrides")
    return Adapter(path, meta, pairs, replace)


class AdaptedTensors:
    """A TensorSource: the base's HF-named tensors with the adapter applied on read."""

    def __init__(self, base: TensorSource, adapter: Adapter, source: str = "the base model"):
        missing = [n for n in [*adapter.pairs, *adapter.replace] if n not in base]
        if missing:
            raise WeightError(f"adapter {adapter.path} changes {missing[0]!r}, which {source} does "
                              f"not have ({len(missing)} such tensor(s)): another base model?")
        self.base, self.adapter = base, adapter

    def keys(self):
        return self.base.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def __getitem__(self, name: str) -> np.ndarray:
        ad = self.adapter
        if name in ad.replace:
            value = ad.replace[name]
            want = tuple(self.base[name].shape)
            if value.shape != want:
                raise WeightError(f"adapter {ad.path}: {name!r} has shape {value.shape}, the base "
                                  f"tensor {want}")
            return value
        if name in ad.pairs:
            a, b = ad.pairs[name]
            w = np.asarray(self.base[name], np.float32)
            if w.shape != (b.shape[0], a.shape[1]):
                raise WeightError(f"adapter {ad.path}: {name!r} is {w.shape} in the base, the "
                                  f"adapter's B @ A is {(b.shape[0], a.shape[1])}")
            return w + np.float32(ad.scale) * (b @ a)
        return self.base[name]


def check_overrides(overrides: Mapping[str, Any], where: str) -> None:
    """ConfigError for a field that is not overridable, a max_position_embeddings that is not a
    positive integer, a rope_theta that is not a positive number, or a malformed rope_scaling."""
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ConfigError(f"{where}: cannot override {unknown}; overridable: {list(OVERRIDABLE)}")
    length = overrides.get("max_position_embeddings")
    if "max_position_embeddings" in overrides and not (is_int(length) and length > 0):
        raise ConfigError(f"{where}: max_position_embeddings must be a positive integer, got "
                          f"{length!r}")
    theta = overrides.get("rope_theta")
    if "rope_theta" in overrides and not (is_number(theta) and theta > 0):
        raise ConfigError(f"{where}: rope_theta must be a positive number, got {theta!r}")
    scaling = overrides.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, Mapping):
        raise ConfigError(f"{where}: rope_scaling must be a mapping or null, got {scaling!r}")


def apply_config_overrides(hf_config: Mapping[str, Any], overrides: Mapping[str, Any],
                           where: str = "overrides") -> dict[str, Any]:
    """A copy of a config.json dict with `overrides` (OVERRIDABLE fields) set.

    A transformers 5 `rope_parameters` entry is first rewritten as `rope_theta` + `rope_scaling`
    (it would otherwise win over them), so a rope override always takes effect.
    """
    check_overrides(overrides, where)
    d = dict(hf_config)
    if any(k in overrides for k in ("rope_theta", "rope_scaling")) and "rope_parameters" in d:
        params = dict(d.pop("rope_parameters") or {})
        if "rope_theta" in params:
            d["rope_theta"] = params.pop("rope_theta")
        kind = params.get("rope_type") or params.get("type") or "default"
        d["rope_scaling"] = params if kind != "default" else None
    d.update(overrides)
    scaling = d.get("rope_scaling")
    if ("max_position_embeddings" in overrides and isinstance(scaling, Mapping)
            and not scaling.get("original_max_position_embeddings")
            and hf_config.get("max_position_embeddings")):
        # a scaling without its original length would take the new maximum as the original
        d["rope_scaling"] = {**scaling, "original_max_position_embeddings":
                             hf_config["max_position_embeddings"]}
    return d


__all__ = ["ADAPTER_FILE", "Adapter", "AdaptedTensors", "BUNDLED_ADAPTERS", "METADATA_KEY",
           "OVERRIDABLE", "PREFIX", "apply_config_overrides", "bundled_adapter_path",
           "read_adapter", "resolve_adapter"]
