"""EngineConfig: the knobs of the batch inference engine (typed, YAML-loadable)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


from jaxprefill.config import ConfigError, check_keys, read_yaml
from jaxprefill.validate import check_sampling, is_int


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static capacities of the engine; everything inside jit is shaped by these.

    Prefill runs in rows of `prefill_tokens` tokens: short prompts are bin-packed into a row
    (prepacking, segment ids + restarted positions), longer ones are split into chunks of
    `prefill_tokens` (SARATHI) that attend to their cached prefix. Decode runs `max_batch` slots;
    a finished slot is refilled from the queue at the next step (continuous batching).
    """

    max_batch: int = 8             # decode slots
    prefill_tokens: int = 512      # tokens per prefill row (chunk size for long prompts)
    prefill_rows: int = 2          # packed prefill rows per step
    page_size: int = 64            # tokens per KV-cache page
    num_pages: int = 256           # pages in the cache pool (shared by all sequences)
    max_seq_len: int | None = None  # prompt + completion cap; default: the model's context
    max_new_tokens: int = 128      # default per request
    temperature: float = 0.0       # defaults; a request may override them
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    chat: bool = True              # render text prompts through the chat template
    packing: bool = True           # False: one prompt per prefill row (padded; for comparison)
    bucket: int = 256              # cache-view lengths are rounded up to this (bounds recompiles)
    data_parallel: int = 1         # engine replicas, one per local device (data_parallel.py)
    # Sparse prefill (jaxprefill.sparse): a policy name, a name:key=value,... spec, a YAML path,
    # a dict or a SparseConfig.
    # Applies per prefill chunk and to prompts that fill a packed row alone; prompts shorter
    # than its min_length stay dense; decode stays dense. None: dense prefill.
    sparse: Any = None
    # TPLA decode for MLA models, DeepSeek-V3.2 included: {"tensor": g, "transform": "none" |
    # "hadamard", "rope": "replicated" | "split", "logit_scale": "1" | "g"} (jaxprefill.mla.tpla);
    # DeepSeek-V3.2 also "index_keys": "replicated" | "sharded" (its indexer's keys on every
    # device or split by page slot: jaxprefill.mla.dsa_index_shards). None: MLA decode.
    tpla: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch", "prefill_tokens", "prefill_rows", "page_size", "num_pages",
                     "max_new_tokens", "bucket", "data_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"engine config: {name} must be a positive integer, got {value!r}")
        if self.bucket % self.page_size:
            raise ConfigError(f"engine config: bucket ({self.bucket}) must be a multiple of "
                              f"page_size ({self.page_size})")
        if self.max_seq_len is not None and not (is_int(self.max_seq_len)
                                                 and self.max_seq_len >= 1):
            raise ConfigError(f"engine config: max_seq_len must be a positive integer or null, "
                              f"got {self.max_seq_len!r}")
        # types too: a string temperature would fail inside the engine, after the model loads
        check_sampling(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                       seed=self.seed, where="engine config")
        for name in ("chat", "packing"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"engine config: {name} must be true or false, got "
                                  f"{getattr(self, name)!r}")
        if self.tpla is not None:
            keys = {"tensor", "transform", "rope", "norm", "logit_scale", "axis", "index_keys"}
            if not isinstance(self.tpla, Mapping) or set(self.tpla) - keys:
                raise ConfigError(f"engine config: tpla must be a mapping with keys from "
                                  f"{sorted(keys)}, got {self.tpla!r}")
            g = self.tpla.get("tensor", 1)
            if not isinstance(g, int) or isinstance(g, bool) or g < 1:
                raise ConfigError(f"engine config: tpla.tensor must be a positive integer, got {g!r}")
            layout = self.tpla.get("index_keys", "replicated")
            if layout not in ("replicated", "sharded"):
                raise ConfigError(f"engine config: tpla.index_keys must be 'replicated' or "
                                  f"'sharded', got {layout!r}")
            object.__setattr__(self, "tpla", tuple(sorted(self.tpla.items())))  # hashable
            if self.data_parallel > 1:
                raise ConfigError("engine config: tpla with data_parallel > 1 is not supported "
                                  "yet (each replica would need its own tensor group)")
        if self.sparse is not None:
            from jaxprefill.sparse import SparseConfig

            try:
                sparse = SparseConfig.parse(self.sparse)
            except (ValueError, TypeError, OSError) as e:
                raise ConfigError(f"engine config: sparse: {e}") from e
            object.__setattr__(self, "sparse", sparse)
            for rule in sparse.rules:
                blk = rule.policy.block_size
                if self.prefill_tokens % blk or self.bucket % blk:
                    # chunk starts and cache views on block boundaries: each chunk query block
                    # is one block of the policy's whole-prompt layout (no straddling unions)
                    raise ConfigError(
                        f"engine config: prefill_tokens ({self.prefill_tokens}) and bucket "
                        f"({self.bucket}) must be multiples of the sparse policy's block_size "
                        f"({blk}, policy {rule.policy.name!r})")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EngineConfig":
        check_keys(d, cls, "engine config")
        return cls(**d)



@dataclasses.dataclass(frozen=True)
class InferConfig:
    """A batch job: which model, its dtype and attention backend, the engine settings, and for
    DeepSeek-V3.2 models the indexer's options (`dsa`: index_impl, sparse_impl, fp8; see
    `jaxprefill.models.dsa.DSAOptions`, checked when the model loads)."""

    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    attention: str = "auto"
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    dsa: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("model", "dtype", "attention"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ConfigError(f"infer config: {name} must be a string, got {value!r}")
        if self.dsa is not None:
            known = {"index_impl", "sparse_impl", "fp8"}
            if not isinstance(self.dsa, Mapping) or set(self.dsa) - known:
                raise ConfigError(f"infer config: dsa must be a mapping with keys from "
                                  f"{sorted(known)}, got {self.dsa!r}")
            object.__setattr__(self, "dsa", tuple(sorted(self.dsa.items())))  # hashable

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InferConfig":
        d = dict(d)
        check_keys(d, cls, "infer config")
        engine = d.pop("engine", None) or {}
        if not isinstance(engine, Mapping):
            raise ConfigError(f"infer config: engine must be a mapping of engine settings, got "
                              f"{engine!r}")
        return cls(engine=EngineConfig.from_dict(engine), **d)

    @classmethod
    def from_yaml(cls, path) -> "InferConfig":
        d = read_yaml(path) or {}
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a mapping")
        return cls.from_dict(d)
