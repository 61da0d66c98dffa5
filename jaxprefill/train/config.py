"""Typed training configuration: one frozen dataclass per YAML section.

    cfg = TrainConfig.load("configs/train/tiny-cpu.yaml", ["optim.lr=1e-3", "steps=50"])

Every section rejects unknown keys and wrongly typed values with a `ConfigError` that names the
dotted key (`optim.lr`), so a typo never silently falls back to a default. Overrides are
`dotted.key=value` strings whose value is parsed as YAML (`1e-3`, `true`, `[a, b]`, `null`).
Relative paths (output_dir, data files, model files) resolve against the current directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from typing import Any, Mapping, Sequence

import yaml

from jaxprefill.config import ConfigError, read_yaml, yaml_problem
from jaxprefill.lora import TARGETS

DTYPES = ("float32", "bfloat16")
LORA_OVERRIDES = ("max_position_embeddings", "rope")  # model.overrides an adapter file carries
REMAT = ("none", "full", "dots")  # dots: keep matmul outputs, recompute elementwise ops


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which model to train. Exactly one of `config` (from scratch) or `pretrained` (continual)."""

    config: str | None = None         # a configs/models name ("tiny-llama") or a YAML path
    fields: dict = dataclasses.field(default_factory=dict)  # inline ModelConfig fields
    pretrained: str | None = None     # bundled name, HF safetensors dir or .gguf file
    overrides: dict = dataclasses.field(default_factory=dict)  # ModelConfig fields to change
    dtype: str = "bfloat16"           # compute dtype
    param_dtype: str = "float32"      # master weights (and optimizer state) dtype
    attention: str = "auto"           # AttentionSpec.impl
    remat: str = "none"

    def __post_init__(self) -> None:
        sources = [bool(self.config), bool(self.fields), bool(self.pretrained)]
        if sum(sources) != 1:
            raise ConfigError("model: set exactly one of model.config, model.fields or "
                              f"model.pretrained (got config={self.config!r}, "
                              f"fields={'set' if self.fields else 'empty'}, "
                              f"pretrained={self.pretrained!r})")
        _choice("model.dtype", self.dtype, DTYPES)
        _choice("model.param_dtype", self.param_dtype, DTYPES)
        _choice("model.remat", self.remat, REMAT)
        _choice("model.attention", self.attention, ("auto", "reference", "xla", "cudnn"))


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Where tokens come from and how rows are packed (see `jaxprefill.data`)."""

    format: str = "jsonl"             # text | jsonl | array_record | synthetic
    train: tuple[str, ...] = ()       # files or glob patterns
    validation: tuple[str, ...] = ()
    text_key: str = "text"            # JSONL field holding the document
    tokenizer: str = "byte"           # byte | model (the pretrained model's) | HF dir / .gguf / bundled
    seq_len: int = 256
    # concat_then_split | first_fit | none (one document per row, truncated, padded) | document
    # (one document per row; a longer one fills several rows: jaxprefill.data.pipeline). With
    # none and document the model runs plain causal attention: no [S, S] segment mask.
    packing: str = "concat_then_split"
    shuffle_seed: int = 0
    add_bos: bool = False
    add_eos: bool = True
    workers: int = 0                  # grain multiprocessing workers (0: in-process)
    synthetic_docs: bool = False      # synthetic only: random document boundaries (packed rows)
    # Loss weight of the tokens inside a JSONL row's `loss_spans` ([[start, end], ...] character
    # ranges of `text`, e.g. the answers of the data builder's retrieval rows); other tokens
    # weigh 1. 1.0 ignores the spans. Training rows only (validation stays unweighted); jsonl
    # with packing none or document.
    span_weight: float = 1.0

    def __post_init__(self) -> None:
        _choice("data.format", self.format, ("text", "jsonl", "array_record", "synthetic"))
        _choice("data.packing", self.packing, ("concat_then_split", "first_fit", "none", "document"))
        _positive("data.seq_len", self.seq_len)
        if not self.span_weight > 0:
            raise ConfigError(f"data.span_weight must be positive, got {self.span_weight}")
        if self.span_weight != 1.0 and (self.format != "jsonl"
                                        or self.packing not in ("none", "document")):
            raise ConfigError(f"data.span_weight={self.span_weight:g} needs data.format=jsonl "
                              f"and data.packing none or document (got {self.format}, "
                              f"{self.packing})")
        if self.format != "synthetic" and not self.train:
            raise ConfigError("data.train: list at least one file or glob (or data.format=synthetic)")
        if self.workers < 0:
            raise ConfigError(f"data.workers must be >= 0, got {self.workers}")


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """AdamW (or Muon) with linear warmup then cosine decay to `min_lr_ratio * lr`."""

    name: str = "adamw"               # adamw | muon
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    decay_steps: int | None = None    # default: run `steps`
    schedule: str = "cosine"          # cosine | constant (after warmup)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False    # norms and biases are never decayed
    clip_norm: float | None = 1.0
    grad_accum: int = 1

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, ("adamw", "muon"))
        _choice("optim.schedule", self.schedule, ("cosine", "constant"))
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _positive("optim.grad_accum", self.grad_accum)
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ConfigError(f"optim.clip_norm must be positive or null, got {self.clip_norm}")


@dataclasses.dataclass(frozen=True)
class LoRASection:
    """Low-rank adapters (`jaxprefill.lora`): every weight named in `targets` (all layers) gets
    W + alpha / rank * A @ B with A, B trainable and W frozen, dropout on the branch input while
    training. Only A, B (and norm scales / biases when asked) are in the optimizer and the
    checkpoints; the run ends by writing <output_dir>/adapter.safetensors."""

    targets: tuple[str, ...] = ()     # Llama: q k v o gate up down; DeepSeek: q_a q_b q kv_a kv_b o gate up down
    rank: int = 16
    alpha: float = 32.0               # the update is scaled by alpha / rank
    dropout: float = 0.0              # on the LoRA branch input, training only
    train_norms: bool = False         # also train the RMSNorm scales (a few K parameters)
    train_biases: bool = False        # also train the projection biases (q/k/v/o, MLP)
    # Start from a trained adapter (file, run directory or bundled adapter name) instead of
    # B = 0: same targets, rank and alpha; the optimizer starts fresh. A checkpoint of this run,
    # when there is one, still wins (resume).
    init_from: str | None = None

    def __post_init__(self) -> None:
        if not self.targets:
            raise ConfigError(f"lora.targets: list at least one projection, e.g. [q, k, v, o]; "
                              f"known names: {list(TARGETS)}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ConfigError(f"lora.targets: unknown name(s) {unknown}; known names: {list(TARGETS)} "
                              f"(which of them a model has depends on its family)")
        _positive("lora.rank", self.rank)
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Mesh axis sizes; `data: -1` takes every device not used by fsdp x tensor x sequence x
    expert. `expert` shards MoE expert weights (logical axis "expert"); the batch is split over it
    too. `sequence` > 1 splits each row's tokens over that many devices and runs attention as ring
    attention (context parallelism, docs/context_parallel.md) on the differentiable XLA kernel."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    sequence: int = 1

    def __post_init__(self) -> None:
        if self.data != -1:
            _positive("mesh.data", self.data)
        _positive("mesh.fsdp", self.fsdp)
        _positive("mesh.tensor", self.tensor)
        _positive("mesh.expert", self.expert)
        _positive("mesh.sequence", self.sequence)


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    enabled: bool = True              # false: no saves, no resume (throughput benchmarks)
    every: int = 1000                 # steps between saves (and one at the end)
    keep: int = 3                     # keep the last K checkpoints
    async_save: bool = True
    save_on_sigterm: bool = True
    export_at_end: bool = False       # also write <output_dir>/export (HF safetensors)
    export_dtype: str = "float32"     # dtype of the exported weights
    export_shard_mb: int | None = None  # split the export into safetensors shards of <= this

    def __post_init__(self) -> None:
        _positive("checkpoint.every", self.every)
        _positive("checkpoint.keep", self.keep)
        _choice("checkpoint.export_dtype", self.export_dtype, DTYPES)
        if self.export_shard_mb is not None:
            _positive("checkpoint.export_shard_mb", self.export_shard_mb)


@dataclasses.dataclass(frozen=True)
class LogSection:
    every: int = 10                   # steps between metric lines
    eval_every: int = 0               # 0: validation only at the end (if data.validation is set)
    eval_batches: int = 4
    tensorboard: bool = True
    progress: bool = True             # a tqdm bar on a terminal, else a progress line (below)
    progress_every: int | None = None  # steps between progress lines off a terminal; null: log.every

    def __post_init__(self) -> None:
        _positive("log.every", self.every)
        _positive("log.eval_batches", self.eval_batches)
        if self.progress_every is not None:
            _positive("log.progress_every", self.progress_every)
        if self.eval_every < 0:
            raise ConfigError(f"log.eval_every must be >= 0, got {self.eval_every}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole run. `batch_size` is global (all hosts) rows of `data.seq_len` tokens per step."""

    output_dir: str
    steps: int
    batch_size: int
    seed: int = 0
    # stop (save, validate, export as if finished) once training has run this long; the LR
    # schedule still follows `steps`, so set `steps` to about what fits (bounded-time recipes)
    time_limit_s: float | None = None
    model: ModelSection = dataclasses.field(default_factory=lambda: ModelSection(config="tiny-llama"))
    data: DataSection = dataclasses.field(default_factory=lambda: DataSection(format="synthetic"))
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    log: LogSection = dataclasses.field(default_factory=LogSection)
    lora: LoRASection | None = None   # null: train every parameter

    def __post_init__(self) -> None:
        _positive("steps", self.steps)
        _positive("batch_size", self.batch_size)
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ConfigError(f"time_limit_s must be positive or null, got {self.time_limit_s}")
        if self.batch_size % self.optim.grad_accum:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of "
                              f"optim.grad_accum ({self.optim.grad_accum})")
        if self.lora is not None:
            if self.optim.name != "adamw":
                raise ConfigError(f"optim.name: {self.optim.name!r} does not train LoRA factors; "
                                  f"use adamw with lora")
            extra = sorted(set(self.model.overrides) - set(LORA_OVERRIDES))
            if self.model.pretrained and extra:
                raise ConfigError(f"model.overrides: {extra} cannot change under lora (an adapter "
                                  f"file carries only {list(LORA_OVERRIDES)})")

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, resolve_paths: bool = True) -> "TrainConfig":
        cfg = _build(cls, d, "")
        return cfg.resolved() if resolve_paths else cfg

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: Sequence[str] = ()) -> "TrainConfig":
        """Read a YAML recipe and apply `key.sub=value` overrides."""
        d = read_yaml(path) or {}
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: a training config must be a YAML mapping")
        return cls.from_dict(apply_overrides(d, overrides))

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def resolved(self) -> "TrainConfig":
        """Relative paths made absolute against the current directory (globs kept as globs)."""
        def absolute(p: str | None) -> str | None:
            return None if p is None else os.path.abspath(os.path.expanduser(p))

        def maybe_path(p: str | None) -> str | None:  # a file path, or a name like "byte"
            return absolute(p) if p and (os.sep in p or os.path.exists(p)) else p

        model = dataclasses.replace(self.model, config=maybe_path(self.model.config),
                                    pretrained=maybe_path(self.model.pretrained))
        data = dataclasses.replace(self.data, train=tuple(absolute(p) for p in self.data.train),
                                   validation=tuple(absolute(p) for p in self.data.validation),
                                   tokenizer=maybe_path(self.data.tokenizer))
        return dataclasses.replace(self, output_dir=absolute(self.output_dir), model=model, data=data)


def apply_overrides(d: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A deep copy of `d` with each `a.b.c=value` set (value parsed as YAML)."""
    out = yaml.safe_load(yaml.safe_dump(dict(d)))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML "
                              f"({yaml_problem(e)})") from None
    return out


# ---- generic typed construction --------------------------------------------------------------

def _build(cls: type, d: Any, where: str):
    """Instantiate dataclass `cls` from mapping `d`, checking keys and value types recursively."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(d).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        names = [f"{where}.{k}" if where else k for k in unknown]
        raise ConfigError(f"unknown key(s) {names}; known keys in {where or 'the top level'}: "
                          f"{sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in d.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, key)
    missing = [n for n, f in known.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required key(s) {[f'{where}.{m}' if where else m for m in missing]}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - fields are checked above
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(typing.get_args(tp)[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .nan / .inf: never a setting (lr=.nan trains nans)
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")  # pragma: no cover


def _choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")


def _positive(key: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")


def config_diff(saved: Any, current: Any) -> list[str]:
    """`"key.sub: saved -> current"` for each leaf that differs, compared by value: both sides go
    through JSON first, so a tuple equals the list a checkpoint's JSON gives back."""
    def flat(x: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
        if isinstance(x, dict):
            for k, v in x.items():
                flat(v, f"{prefix}.{k}" if prefix else str(k), out)
        else:
            out[prefix] = x
        return out

    def show(d: dict[str, Any], k: str) -> str:
        return repr(d[k]) if k in d else "unset"

    a = flat(json.loads(json.dumps(saved)), "", {})
    b = flat(json.loads(json.dumps(current)), "", {})
    return [f"{k or 'config'}: {show(a, k)} -> {show(b, k)}" for k in sorted(set(a) | set(b))
            if k not in a or k not in b or a[k] != b[k]]


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
