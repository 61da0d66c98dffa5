"""The model a run trains: from a config (from scratch) or from a checkpoint (continual pretraining).

Llama-family configs build a `Llama`; DeepSeek-family configs (`model_type` deepseek_v2,
deepseek_v3, kimi_k2: an `MLAConfig`) build a `DeepSeek` (MLA + MoE). Either way the result is
split once into a graphdef and pure dicts of arrays placed with the run's shardings; the training
step never touches the NNX object graph again.

With a `lora:` section the targeted weights are wrapped in `jaxprefill.lora.LoRAWeight`s before
the split, and the split has two parts: `params` (what trains: the LoRA factors, plus norm scales
or biases when asked) and `frozen` (everything else, passed to the step as an input but never
differentiated, updated or checkpointed). Without LoRA, `params` is every parameter and `frozen`
is None.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxprefill import lora
from jaxprefill.attention import AttentionSpec
from jaxprefill.config import (MLA_MODEL_TYPES, ConfigError, MLAConfig, ModelConfig,
                               config_from_hf_dict, read_yaml)
from jaxprefill.loading import BUNDLED_MODELS
from jaxprefill.loading.deepseek_weights import build_deepseek
from jaxprefill.loading.gguf_reader import bundled_gguf_path, read_gguf
from jaxprefill.loading.safetensors_io import SafetensorsCheckpoint
from jaxprefill.loading.adapter import apply_config_overrides, read_adapter
from jaxprefill.loading.deepseek_weights import mla_hf_name_map
from jaxprefill.loading.weights import WeightError, build_model, hf_name_map, to_ours
from jaxprefill.models import DeepSeek, Llama
from jaxprefill.parallel import ContextParallel
from jaxprefill.sharding import state_shardings
from jaxprefill.train.config import LoRASection, ModelSection

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


AnyConfig = ModelConfig | MLAConfig


def config_class(d: dict) -> type:
    """MLAConfig for the DeepSeek family (by `model_type`), else ModelConfig."""
    return MLAConfig if d.get("model_type") in MLA_MODEL_TYPES else ModelConfig


def model_class(cfg: AnyConfig) -> type:
    if isinstance(cfg, MLAConfig) and cfg.has_indexer:
        raise ConfigError("model: deepseek_v32 (DSA) cannot be trained from scratch here: its "
                          "indexer learns from its own loss, which is not implemented")
    return DeepSeek if isinstance(cfg, MLAConfig) else Llama


@dataclasses.dataclass
class SplitModel:
    config: AnyConfig
    graphdef: Any
    template: Any          # abstract nnx.State of the trainable Params (ShapeDtypeStructs)
    params: Any            # pure dict of the trainable arrays, placed with `shardings`
    shardings: Any         # pure dict of NamedSharding, same tree as params
    # LoRA runs only (else None): the frozen rest of the model, same three views
    frozen_template: Any = None
    frozen: Any = None
    frozen_shardings: Any = None
    lora: LoRASection | None = None


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
        d = read_yaml(path)
        cfg = config_class(d).from_dict(d)
    return with_overrides(cfg, section.overrides)


def pretrained_tensors(source: str) -> tuple[dict, Any]:
    """(HF config dict, HF-named tensor source) of a bundled model, HF directory or GGUF file."""
    if source.lower() in BUNDLED_MODELS:
        path = bundled_gguf_path(source.lower())
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"model.pretrained: {source!r} is neither a bundled model "
                              f"{BUNDLED_MODELS} nor an existing path")
    if path.is_dir():
        return json.loads((path / "config.json").read_text()), SafetensorsCheckpoint(path)
    contents = read_gguf(path)
    return contents.hf_config, contents.tensors


def build(section: ModelSection, mesh: Mesh, seed: int, lora_section: LoRASection | None = None,
          context: ContextParallel | None = None) -> SplitModel:
    """Create (scratch: random init inside jit, directly sharded) or load the model, attach the
    LoRA adapters when asked, then split. ``context``: ring attention over the mesh's `sequence`
    axis (its kernel must have a backward pass: `jaxprefill.parallel.backward`), or None."""
    dtype, param_dtype = DTYPES[section.dtype], DTYPES[section.param_dtype]
    # differentiable: no kernels without gradients
    spec = AttentionSpec(section.attention, differentiable=True, context=context)
    filters = (nnx.Param,) if lora_section is None else (
        lora.trainable_filter(lora_section.train_norms, lora_section.train_biases), nnx.Param)

    if section.pretrained:
        hf_config, tensors = pretrained_tensors(section.pretrained)
        cfg = with_overrides(config_from_hf_dict(hf_config), section.overrides)
        load = build_deepseek if isinstance(cfg, MLAConfig) else build_model
        model = load(cfg, tensors, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                     attention=spec, source=section.pretrained)
        if lora_section is not None:
            attach(model, lora_section, nnx.Rngs(seed))
            if lora_section.init_from:
                load_adapter_factors(model, lora_section, cfg, hf_config)
        graphdef, *states = nnx.split(model, *filters)
        templates = [_abstract(s) for s in states]
        check_trainable(templates[0], lora_section)
        shardings = [nnx.to_pure_dict(state_shardings(t, mesh)) for t in templates]
        arrays = [jax.device_put(nnx.to_pure_dict(s), sh) for s, sh in zip(states, shardings)]
    else:
        if lora_section is not None and lora_section.init_from:
            raise ConfigError("lora.init_from: starting from an adapter needs model.pretrained "
                              "(the base the adapter was trained on)")
        cfg = model_config(section)

        def create():
            rngs = nnx.Rngs(seed)
            model = model_class(cfg)(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                     attention=spec)
            return model if lora_section is None else attach(model, lora_section, rngs)

        graphdef, *templates = nnx.split(nnx.eval_shape(create), *filters)
        check_trainable(templates[0], lora_section)
        shardings = [nnx.to_pure_dict(state_shardings(t, mesh)) for t in templates]

        def init():
            return [nnx.to_pure_dict(s) for s in nnx.split(create(), *filters)[1:]]

        # Random init inside jit with out_shardings: each device materializes only its own shards.
        arrays = jax.jit(init, out_shardings=shardings)()
    split = SplitModel(cfg, graphdef, templates[0], arrays[0], shardings[0], lora=lora_section)
    if lora_section is not None:
        split.frozen_template, split.frozen, split.frozen_shardings = templates[1], arrays[1], shardings[1]
    return split


def attach(model: Llama | DeepSeek, section: LoRASection, rngs: nnx.Rngs) -> Llama | DeepSeek:
    return lora.attach(model, section.targets, rank=section.rank, alpha=section.alpha,
                       dropout=section.dropout, rngs=rngs)


def load_adapter_factors(model: Llama | DeepSeek, section: LoRASection,
                         cfg: ModelConfig | MLAConfig, base_hf_config: dict) -> None:
    """Set the attached LoRA factors (and any whole tensors the adapter replaces, e.g. trained
    norm scales) from the adapter ``section.init_from``, so that the model starts equal to
    ``jp.load(base, adapter=section.init_from)``. The adapter must carry exactly the run's
    targets with its rank and alpha, and have been trained with the run's context (RoPE and
    max_position_embeddings); anything else is a ConfigError naming the difference.
    base_hf_config: the base model's config.json dict (the adapter's overrides apply to it)."""
    where = f"lora.init_from {section.init_from}"
    try:
        ad = read_adapter(section.init_from)
    except (FileNotFoundError, WeightError) as e:
        raise ConfigError(f"{where}: {e}") from None
    rank, alpha = int(ad.meta["rank"]), float(ad.meta["alpha"])
    if (rank, alpha) != (section.rank, float(section.alpha)):
        raise ConfigError(f"{where}: the adapter has rank {rank} and alpha {alpha:g}, this run "
                          f"rank {section.rank} and alpha {section.alpha:g}")
    trained = config_from_hf_dict(apply_config_overrides(base_hf_config, ad.config_overrides,
                                                         where))
    for field in ("max_position_embeddings", "rope"):
        if getattr(trained, field) != getattr(cfg, field):
            raise ConfigError(f"{where}: the adapter was trained with {field} "
                              f"{getattr(trained, field)}, this run has {getattr(cfg, field)} "
                              f"(set model.overrides to match)")
    names = mla_hf_name_map(cfg) if isinstance(cfg, MLAConfig) else hf_name_map(cfg)
    pairs = dict(ad.pairs)
    for path, w in lora.lora_weights(model):
        name = names[path][0]
        if name not in pairs:
            raise ConfigError(f"{where}: no LoRA pair for {name} (the adapter adapts "
                              f"{len(ad.pairs)} weights; are lora.targets the same?)")
        a_hf, b_hf = pairs.pop(name)  # A [r, in], B [out, r]
        w.a[...] = jnp.asarray(a_hf.T.reshape(w.a.shape), w.a.dtype)
        w.b[...] = jnp.asarray(b_hf.T.reshape(w.b.shape), w.b.dtype)
    if pairs:
        raise ConfigError(f"{where}: the adapter also adapts {sorted(pairs)[0]} (and "
                          f"{len(pairs) - 1} more), which lora.targets does not")
    by_name = {n: (path, shape, kind) for path, (n, shape, kind) in names.items()}
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for name, value in ad.replace.items():
        if name not in by_name:
            raise ConfigError(f"{where}: the adapter replaces {name}, which this model lacks")
        path, _, kind = by_name[name]
        param = flat[path]
        param[...] = jnp.asarray(to_ours(kind, value, param.shape), param.dtype)


def check_trainable(template: nnx.State, section: LoRASection | None) -> None:
    """ConfigError when `lora.train_biases` finds no bias to train."""
    if section is None or not section.train_biases:
        return
    if not any(lora.is_bias(p) for p, _ in nnx.to_flat_state(template)):
        raise ConfigError("lora.train_biases: this model has no projection biases")


def _abstract(state: nnx.State) -> nnx.State:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def merged(split: SplitModel, params: Any | None = None) -> Llama | DeepSeek:
    """An NNX model over `params` (default: the split's) and, under LoRA, the frozen base (with
    its LoRAWeight modules: see `lora.merge` for plain weights), e.g. for export or generation."""
    state = jax.tree.map(lambda x: x, split.template)
    nnx.replace_by_pure_dict(state, split.params if params is None else params)
    if split.frozen_template is None:
        return nnx.merge(split.graphdef, state)
    frozen = jax.tree.map(lambda x: x, split.frozen_template)
    nnx.replace_by_pure_dict(frozen, split.frozen)
    return nnx.merge(split.graphdef, state, frozen)
