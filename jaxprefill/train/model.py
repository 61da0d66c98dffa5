"""The model a run trains: from a config (from scratch) or from a checkpoint (continual pretraining).

Llama-family configs build a `Llama`; DeepSeek-family configs (`model_type` deepseek_v2,
deepseek_v3, kimi_k2: an `MLAConfig`) build a `DeepSeek` (MLA + MoE). Either way the result is split once into (graphdef, abstract Param state, params as a pure dict
placed with the run's shardings); the training step never touches the NNX object graph again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxprefill.attention import AttentionSpec
from jaxprefill.config import MLA_MODEL_TYPES, ConfigError, MLAConfig, ModelConfig, config_from_hf_dict
from jaxprefill.models import DeepSeek, Llama
from jaxprefill.sharding import state_shardings
from jaxprefill.train.config import ModelSection

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


AnyConfig = ModelConfig | MLAConfig


def config_class(d: dict) -> type:
    """MLAConfig for the DeepSeek family (by `model_type`), else ModelConfig."""
    return MLAConfig if d.get("model_type") in MLA_MODEL_TYPES else ModelConfig


def model_class(cfg: AnyConfig) -> type:
    return DeepSeek if isinstance(cfg, MLAConfig) else Llama


@dataclasses.dataclass
class SplitModel:
    config: AnyConfig
    graphdef: Any
    template: Any          # abstract nnx.State of the Params (ShapeDtypeStructs)
    params: Any            # pure dict of arrays, placed with `shardings`
    shardings: Any         # pure dict of NamedSharding, same tree as params


def with_overrides(cfg: AnyConfig, overrides: dict) -> AnyConfig:
    """`cfg` with config fields replaced; a nested `rope` mapping merges into cfg.rope."""
    if not overrides:
        return cfg
    d = cfg.to_dict()
    for key, value in overrides.items():
        if key == "rope" and isinstance(value, dict):
            d["rope"] = {**d["rope"], **value}
        else:
            d[key] = value
    try:
        return type(cfg).from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"model.overrides: {e}") from None


def model_config(section: ModelSection) -> AnyConfig:
    """The config of a from-scratch run (`model.config` name/path or `model.fields`); an
    MLAConfig when its model_type is a DeepSeek type."""
    if section.fields:
        try:
            cfg = config_class(section.fields).from_dict(section.fields)
        except ConfigError as e:
            raise ConfigError(f"model.fields: {e}") from None
    else:
        path = Path(section.config)
        if not path.exists():
            path = CONFIG_DIR / f"{section.config}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            raise ConfigError(f"model.config: {section.config!r} is neither a file nor one of {known}")
        import yaml

        with open(path) as f:
            d = yaml.safe_load(f)
        cfg = config_class(d).from_dict(d)
    return with_overrides(cfg, section.overrides)


def pretrained_tensors(source: str) -> tuple[dict, Any]:
    """(HF config dict, HF-named tensor source) of a bundled model, HF directory or GGUF file."""
    from jaxprefill.loading import BUNDLED_MODELS
    from jaxprefill.loading.gguf_reader import bundled_gguf_path, read_gguf

    if source.lower() in BUNDLED_MODELS:
        path = bundled_gguf_path(source.lower())
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"model.pretrained: {source!r} is neither a bundled model "
                              f"{BUNDLED_MODELS} nor an existing path")
    if path.is_dir():
        import json

        from jaxprefill.loading.safetensors_io import SafetensorsCheckpoint

        return json.loads((path / "config.json").read_text()), SafetensorsCheckpoint(path)
    contents = read_gguf(path)
    return contents.hf_config, contents.tensors


def build(section: ModelSection, mesh: Mesh, seed: int) -> SplitModel:
    """Create (scratch: random init inside jit, directly sharded) or load the model, then split."""
    from jaxprefill.loading.weights import build_model

    dtype, param_dtype = DTYPES[section.dtype], DTYPES[section.param_dtype]
    spec = AttentionSpec(section.attention, differentiable=True)  # no kernels without gradients
    if section.pretrained:
        hf_config, tensors = pretrained_tensors(section.pretrained)
        cfg = with_overrides(config_from_hf_dict(hf_config), section.overrides)
        if isinstance(cfg, MLAConfig):
            from jaxprefill.loading.deepseek_weights import build_deepseek as build_model
        model = build_model(cfg, tensors, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                            attention=spec, source=section.pretrained)
        graphdef, state = nnx.split(model, nnx.Param)
        template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        shardings = nnx.to_pure_dict(state_shardings(template, mesh))
        params = jax.device_put(nnx.to_pure_dict(state), shardings)
        return SplitModel(cfg, graphdef, template, params, shardings)

    cfg = model_config(section)

    def create():
        return model_class(cfg)(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype, attention=spec)

    graphdef, template = nnx.split(nnx.eval_shape(create), nnx.Param)
    shardings = nnx.to_pure_dict(state_shardings(template, mesh))

    def init():
        return nnx.to_pure_dict(nnx.state(create(), nnx.Param))

    # Random init inside jit with out_shardings: each device materializes only its own shards.
    params = jax.jit(init, out_shardings=shardings)()
    return SplitModel(cfg, graphdef, template, params, shardings)


def merged(split: SplitModel, params: Any | None = None) -> Llama | DeepSeek:
    """An NNX model over `params` (default: the split's), e.g. for export or generation."""
    state = jax.tree.map(lambda x: x, split.template)
    nnx.replace_by_pure_dict(state, split.params if params is None else params)
    return nnx.merge(split.graphdef, state)
