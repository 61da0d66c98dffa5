"""Lazy, memory-mapped reading of `*.safetensors` files (single or sharded checkpoints).

We parse the format ourselves (8-byte header length, JSON header, raw little-endian data) so
that bf16/fp8 tensors come back as numpy views via `ml_dtypes` and nothing is read until a slice
of it is asked for. `safetensors.numpy` cannot represent bf16.

Opening a checkpoint checks each file's header against its size, so a truncated or damaged file
is a WeightError naming the file and the expected and actual sizes, not a failed memmap later.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxprefill.loading.weights import WeightError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsCheckpoint:
    """All tensors of a checkpoint directory: `ckpt[name]` -> read-only numpy memmap view."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise WeightError(f"{index} is damaged: expected a JSON object with a "
                                  f"'weight_map' of tensor name -> file name "
                                  f"({type(e).__name__}: {e})") from None
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {self.directory}")
        self._entries: dict[str, tuple[Path, dict, int]] = {}
        for name in files:
            path = self.directory / name
            if not path.exists():
                raise FileNotFoundError(f"{path} is listed in model.safetensors.index.json but missing")
            header, data_start = _read_header(path)
            for key, info in header.items():
                if key != "__metadata__":
                    self._entries[key] = (path, info, data_start)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    def __getitem__(self, name: str) -> np.ndarray:
        path, info, data_start = self._entries[name]
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise WeightError(f"tensor {name!r} in {path} has unsupported dtype {info['dtype']}; "
                              f"supported: {sorted(DTYPES)}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == begin:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


def _read_header(path: Path) -> tuple[dict, int]:
    """(header, byte offset of the data section); WeightError if the file cannot hold them."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise WeightError(f"{path} is not a safetensors file (too short: {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise WeightError(f"{path} is not a safetensors file (header length {n})")
        if 8 + n > size:
            raise WeightError(f"{path} is truncated: its header needs {8 + n} bytes, the file has "
                              f"{size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightError(f"{path} has a corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise WeightError(f"{path} has a corrupt safetensors header: expected a JSON object")
    data_bytes = 0
    for key, info in header.items():
        if key != "__metadata__":
            data_bytes = max(data_bytes, _entry_end(path, key, info))
    if 8 + n + data_bytes > size:
        expected = 8 + n + data_bytes
        raise WeightError(f"{path} is truncated: its header describes {expected} bytes, the "
                          f"file has {size} ({expected - size} missing; an interrupted download "
                          f"or copy?)")
    return header, 8 + n


def _entry_end(path: Path, key: str, info) -> int:
    """End offset (in the data section) of one header entry, after checking the entry is whole."""
    try:
        begin, end = (int(x) for x in info["data_offsets"])
        shape = [int(d) for d in info["shape"]]
        dtype = info["dtype"]
    except (KeyError, TypeError, ValueError):
        raise WeightError(f"{path} has a corrupt safetensors header: entry {key!r} needs "
                          f"'dtype', 'shape' and two 'data_offsets', got {info!r}") from None
    if dtype in DTYPES and end - begin != math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize:
        raise WeightError(f"{path} has a corrupt safetensors header: tensor {key!r} ({dtype} "
                          f"{shape}) spans {end - begin} bytes, expected "
                          f"{math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize}")
    if not 0 <= begin <= end:
        raise WeightError(f"{path} has a corrupt safetensors header: tensor {key!r} has data "
                          f"offsets {[begin, end]}")
    return end
