"""Typed model configuration, built from a Hugging Face `config.json`, a GGUF header or YAML.

One `ModelConfig` describes every Llama-family decoder we run (Llama 2/3/3.1, Qwen2/2.5, Qwen3,
Mistral, SmolLM2). Differences between families are fields, not subclasses:

| family  | qkv_bias | o_bias | qk_norm | notes                              |
|---------|----------|--------|---------|------------------------------------|
| llama   | attention_bias | attention_bias | no | llama3 / linear / yarn RoPE scaling |
| mistral | no       | no     | no      | optional sliding window            |
| qwen2   | yes      | no     | no      |                                    |
| qwen3   | attention_bias | attention_bias | yes | explicit head_dim          |

Both spellings of RoPE settings in config.json are read: transformers 4 (`rope_theta` +
`rope_scaling`) and transformers 5 (`rope_parameters`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from typing import Any, Mapping

import yaml

# model_type -> the `architectures` entry transformers writes for it.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


class ConfigError(ValueError):
    """A model or run configuration that cannot be used; the message names the field."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings. `type` selects how inverse frequencies are rescaled."""

    type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES:
            raise ConfigError(f"rope type {self.type!r} is not supported; supported: {ROPE_TYPES}")
        if self.theta <= 0:
            raise ConfigError(f"rope theta must be positive, got {self.theta}")


class _YamlConfig:
    """Shared I/O of the model config dataclasses: our own field names in dicts and YAML."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Inverse of `to_dict`; unknown keys are errors that name them."""
        d = dict(d)
        rope = d.pop("rope", {}) or {}
        check_keys(d, cls, f"{cls.__name__} fields")
        check_keys(rope, RopeConfig, "rope config")
        if "eos_token_ids" in d:
            d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return cls(rope=RopeConfig(**rope), **d)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike):
        return cls.from_dict(read_yaml(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class ModelConfig(_YamlConfig):
    """Shapes and options of a Llama-family decoder. Field names follow our code, not HF's."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(unsupported_message(self.model_type))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                              f"({self.num_kv_heads})")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA ratio)."""
        return self.num_heads // self.num_kv_heads

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Build from a transformers `config.json` dict (transformers 4 or 5 spelling)."""
        model_type = d.get("model_type")
        if model_type in MLA_MODEL_TYPES:
            raise ConfigError(f"model_type {model_type!r} is an MLA model: use MLAConfig.from_hf_dict "
                              f"or config_from_hf_dict")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = d.get("architectures") or []
            by_arch = {v: k for k, v in SUPPORTED_MODEL_TYPES.items()}
            model_type = next((by_arch[a] for a in archs if a in by_arch), None)
            if model_type is None:
                raise ConfigError(unsupported_message(d.get("model_type"), archs))
        with _hf_fields():
            hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
            bias = bool(d.get("attention_bias", False))
            eos = d.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
            return cls(
                model_type=model_type,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                qkv_bias=True if model_type == "qwen2" else bias,
                o_bias=False if model_type == "qwen2" else bias,
                mlp_bias=bool(d.get("mlp_bias", False)),
                qk_norm=model_type == "qwen3",
                sliding_window=_sliding_window(model_type, d),
                rope=rope_from_hf(d),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
            )

    @classmethod
    def from_hf_file(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read `config.json` (a file or the directory holding it)."""
        return cls.from_hf_dict(read_config_json(path))



def read_yaml(path: str | os.PathLike) -> Any:
    """The parsed content of a YAML file; ConfigError("<file>: not valid YAML: ...") in one
    line for a syntax error (every config file is read through here)."""
    with open(path) as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {yaml_problem(e)}") from None


def yaml_problem(e: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: the problem and where (line, column), without the
    excerpt of the text PyYAML adds (for `ConfigError("<file>: not valid YAML: ...")`)."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def unsupported_message(model_type: Any, architectures: Any = ()) -> str:
    supported = ", ".join(f"{k} ({v})" for k, v in
                          {**SUPPORTED_MODEL_TYPES, **MLA_MODEL_TYPES}.items())
    return (f"unsupported architecture: model_type={model_type!r}, architectures={list(architectures)}; "
            f"supported model types: {supported}")


def check_keys(d: Mapping[str, Any], cls: type, what: str) -> None:
    """Raise a ConfigError naming every key of `d` that is not a field of dataclass `cls`."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {what}; known keys: {sorted(known)}")


def rope_from_hf(d: Mapping[str, Any]) -> RopeConfig:
    """RoPE settings from either `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or {})
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    theta = merged.get("rope_theta", d.get("rope_theta", 10000.0))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"rope type {rope_type!r} is not supported; supported: {ROPE_TYPES}")
    max_pos = d.get("max_position_embeddings")
    orig = merged.get("original_max_position_embeddings") or d.get("original_max_position_embeddings")
    factor = merged.get("factor")
    if rope_type == "yarn" and factor is None and orig and max_pos:
        factor = max_pos / orig
    return RopeConfig(
        type=rope_type,
        theta=float(theta),
        factor=float(factor if factor is not None else 1.0),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(orig or max_pos) if (orig or max_pos) else None,
        beta_fast=float(merged.get("beta_fast") or 32.0),
        beta_slow=float(merged.get("beta_slow") or 1.0),
        attention_factor=merged.get("attention_factor"),
        mscale=merged.get("mscale"),
        mscale_all_dim=merged.get("mscale_all_dim"),
        truncate=bool(merged.get("truncate", True)),
    )


def _sliding_window(model_type: str, d: Mapping[str, Any]) -> int | None:
    window = d.get("sliding_window")
    if window is None:
        return None
    # Qwen2 ships a sliding_window value but only applies it when use_sliding_window is set.
    if model_type.startswith("qwen") and not d.get("use_sliding_window", False):
        return None
    return int(window)


# ---- DeepSeek MLA + MoE family ------------------------------------------------------------------

# model_type -> architecture name, for the MLA (multi-head latent attention) family.
MLA_MODEL_TYPES: dict[str, str] = {
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "kimi_k2": "DeepseekV3ForCausalLM",
    "deepseek_v32": "DeepseekV32ForCausalLM",  # + the DSA lightning indexer (models/dsa.py)
}
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclasses.dataclass(frozen=True)
class MLAConfig(_YamlConfig):
    """DeepSeek-V2/V3 and Kimi-K2: MLA attention (q/kv LoRA, decoupled RoPE) + DeepSeekMoE.

    Dims: H heads; d_n `qk_nope_head_dim`, d_r `qk_rope_head_dim`, d_v `v_head_dim`,
    d_c `kv_lora_rank` (the cached latent), d_q `q_lora_rank` (None: a plain `q_proj`, V2-Lite).
    MoE: layer i is a MoE layer iff n_routed_experts > 0, i >= first_k_dense_replace and
    i % moe_layer_freq == 0; otherwise a dense SwiGLU of `intermediate_size`.
    Routing: V2 softmax scores, top-k ("greedy") or group-limited (max per group); V3/K2 sigmoid
    scores + `e_score_correction_bias` for the choice only ("noaux_tc", group score = sum of the
    top-2 in each group); weights optionally renormalized, then x routed_scaling_factor.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    max_position_embeddings: int
    q_lora_rank: int | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    rope_interleave: bool = True
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    # DeepSeek-V3.2 sparse attention (deepseek_v32 only; 0 elsewhere): the lightning indexer's
    # heads and head width, and the tokens each query attends to (docs/methods/dsa.md)
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.model_type not in MLA_MODEL_TYPES:
            raise ConfigError(f"MLAConfig model_type must be one of {list(MLA_MODEL_TYPES)}, "
                              f"got {self.model_type!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "max_position_embeddings", "num_experts_per_tok", "moe_layer_freq",
                     "n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(f"scoring_func {self.scoring_func!r} is not supported; {SCORING_FUNCS}")
        if self.topk_method not in TOPK_METHODS:
            raise ConfigError(f"topk_method {self.topk_method!r} is not supported; {TOPK_METHODS}")
        if self.n_routed_experts:
            if self.n_routed_experts % self.n_group:
                raise ConfigError(f"n_routed_experts ({self.n_routed_experts}) must be a multiple "
                                  f"of n_group ({self.n_group})")
            if self.topk_group > self.n_group:
                raise ConfigError(f"topk_group ({self.topk_group}) > n_group ({self.n_group})")
            if self.num_experts_per_tok > self.n_routed_experts:
                raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) > "
                                  f"n_routed_experts ({self.n_routed_experts})")
            if self.moe_intermediate_size <= 0:
                raise ConfigError("moe_intermediate_size must be positive when n_routed_experts > 0")
        self._check_indexer()

    def _check_indexer(self) -> None:
        names = ("index_n_heads", "index_head_dim", "index_topk")
        if not self.has_indexer:
            if any(getattr(self, n) for n in names):
                raise ConfigError(f"{'/'.join(names)} are deepseek_v32 fields; model_type is "
                                  f"{self.model_type!r}")
            return
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer for deepseek_v32, got "
                                  f"{value!r}")
        if not self.q_lora_rank:
            raise ConfigError("deepseek_v32 needs q_lora_rank (the indexer reads the query latent)")
        d = self.index_head_dim
        if d & (d - 1) or d < self.qk_rope_head_dim:
            raise ConfigError(f"index_head_dim must be a power of two (its Hadamard rotation) and "
                              f">= qk_rope_head_dim ({self.qk_rope_head_dim}), got {d}")

    @property
    def has_indexer(self) -> bool:
        """DeepSeek-V3.2: every layer's attention runs on the indexer's top-k tokens."""
        return self.model_type == "deepseek_v32"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer: normalized latent (d_c) + roped shared key (d_r)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """tau = qk_head_dim^-0.5 * m^2, m = yarn mscale(factor, mscale_all_dim) (DeepSeek code
        and transformers' V3 class; the same scale is used by the absorbed decode path)."""
        scale = self.qk_head_dim ** -0.5
        r = self.rope
        if r.type != "default" and r.mscale_all_dim and r.factor > 1:
            m = 0.1 * r.mscale_all_dim * math.log(r.factor) + 1.0
            scale *= m * m
        return scale

    def is_moe_layer(self, i: int) -> bool:
        return (self.n_routed_experts > 0 and i >= self.first_k_dense_replace
                and i % self.moe_layer_freq == 0)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "MLAConfig":
        """Build from a DeepSeek-V2/V3/Kimi-K2 `config.json` dict (transformers 4 or 5 spelling)."""
        model_type = d.get("model_type")
        if model_type not in MLA_MODEL_TYPES:
            raise ConfigError(unsupported_message(model_type, d.get("architectures") or []))
        v3 = model_type in ("deepseek_v3", "kimi_k2", "deepseek_v32")
        v32 = model_type == "deepseek_v32"  # rope_interleave is not a V3.2 field: always on
        with _hf_fields():
            eos = d.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
            q_lora = d.get("q_lora_rank")
            n_exp = int(d.get("n_routed_experts") or 0)
            cfg = cls(
                model_type=model_type,
                vocab_size=int(d["vocab_size"]),
                hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=int(d["num_attention_heads"]),
                kv_lora_rank=int(d["kv_lora_rank"]),
                qk_nope_head_dim=int(d["qk_nope_head_dim"]),
                qk_rope_head_dim=int(d["qk_rope_head_dim"]),
                v_head_dim=int(d["v_head_dim"]),
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                q_lora_rank=None if q_lora is None else int(q_lora),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", False)),
                rope=rope_from_hf(d),
                rope_interleave=bool(d.get("rope_interleave", True)) if v3 and not v32 else True,
                n_routed_experts=n_exp,
                n_shared_experts=int(d.get("n_shared_experts") or 0),
                num_experts_per_tok=int(d.get("num_experts_per_tok") or 1),
                moe_intermediate_size=int(d.get("moe_intermediate_size") or 0),
                first_k_dense_replace=int(d.get("first_k_dense_replace") or 0),
                moe_layer_freq=int(d.get("moe_layer_freq") or 1),
                routed_scaling_factor=float(d.get("routed_scaling_factor") or 1.0),
                scoring_func=d.get("scoring_func") or ("sigmoid" if v3 else "softmax"),
                topk_method=d.get("topk_method") or ("noaux_tc" if v3 else "greedy"),
                n_group=int(d.get("n_group") or 1),
                topk_group=int(d.get("topk_group") or 1),
                norm_topk_prob=bool(d.get("norm_topk_prob", v3)),
                index_n_heads=int(d.get("index_n_heads", 64)) if v32 else 0,
                index_head_dim=int(d.get("index_head_dim", 128)) if v32 else 0,
                index_topk=int(d.get("index_topk", 2048)) if v32 else 0,
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
            )
        kinds = d.get("mlp_layer_types")  # V3.2 spelling of first_k_dense_replace
        if kinds is not None and list(kinds) != [
                "sparse" if cfg.is_moe_layer(i) else "dense" for i in range(cfg.num_layers)]:
            raise ConfigError(f"mlp_layer_types {list(kinds)} is not the pattern of "
                              f"first_k_dense_replace={cfg.first_k_dense_replace} and "
                              f"moe_layer_freq={cfg.moe_layer_freq}")
        return cfg



def config_from_hf_dict(d: Mapping[str, Any]) -> "ModelConfig | MLAConfig":
    """Route a `config.json` dict by model_type: MLA family -> MLAConfig, else ModelConfig."""
    if d.get("model_type") in MLA_MODEL_TYPES:
        return MLAConfig.from_hf_dict(d)
    return ModelConfig.from_hf_dict(d)


@contextlib.contextmanager
def _hf_fields():
    """Turns a missing or malformed config.json field into a ConfigError that names it."""
    try:
        yield
    except ConfigError:
        raise
    except KeyError as e:
        raise ConfigError(f"config.json is missing the required field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.json has a malformed field: {e}") from None


def config_from_hf_file(path: str | os.PathLike) -> "ModelConfig | MLAConfig":
    """`config_from_hf_dict` of a `config.json` file (or the directory holding it)."""
    return config_from_hf_dict(read_config_json(path))


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """The dict in `config.json` (a file or the directory holding it); clear errors when the file
    is missing, not JSON, or not an object."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(d).__name__}")
    return d
