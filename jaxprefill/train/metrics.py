"""Run logs: JSONL lines and TensorBoard event files (written directly, no TensorFlow needed).

A TensorBoard events file is a sequence of records `[len u64][crc(len) u32][Event proto][crc u32]`
with masked CRC32C. We encode the few protobuf fields we need by hand: Event{wall_time=1 (double),
step=2 (int64), file_version=3 (string), summary=5 {value=1 {tag=1 (string), simple_value=2
(float)}}}. `read_events` decodes them back (tests, and for tools without TensorBoard).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from typing import Any, Iterator


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_bytes(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def encode_event(step: int, wall_time: float, scalars: dict[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
    msg = b"\x09" + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
    if file_version is not None:
        msg += _field_bytes(3, file_version.encode())
    if scalars:
        values = b"".join(_field_bytes(1, _field_bytes(1, tag.encode()) + b"\x15" + struct.pack("<f", v))
                          for tag, v in scalars.items())
        msg += _field_bytes(5, values)
    return msg


class TensorBoardWriter:
    def __init__(self, logdir: str) -> None:
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._f = open(self.path, "ab")
        self._write(encode_event(0, time.time(), file_version="brain.Event:2"))

    def _write(self, event: bytes) -> None:
        header = struct.pack("<Q", len(event))
        self._f.write(header + struct.pack("<I", masked_crc(header)) + event
                      + struct.pack("<I", masked_crc(event)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        values = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
        if values:
            self._write(encode_event(step, time.time(), values))
            self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_events(path: str) -> Iterator[tuple[int, dict[str, float]]]:
    """(step, {tag: value}) for each scalar event of an events file; checks every CRC."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (n,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[pos + 8:pos + 12])[0] != masked_crc(header):
            raise ValueError(f"bad length CRC at byte {pos}")
        event = data[pos + 12:pos + 12 + n]
        if struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] != masked_crc(event):
            raise ValueError(f"bad data CRC at byte {pos}")
        pos += 16 + n
        step, scalars = _decode_event(event)
        if scalars:
            yield step, scalars


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        x = b[i]
        n |= (x & 0x7F) << shift
        i += 1
        shift += 7
        if not x & 0x80:
            return n, i


def _fields(b: bytes) -> Iterator[tuple[int, int, Any]]:
    i = 0
    while i < len(b):
        key, i = _read_varint(b, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _read_varint(b, i)
        elif wire == 1:
            v, i = b[i:i + 8], i + 8
        elif wire == 5:
            v, i = b[i:i + 4], i + 4
        else:
            n, i = _read_varint(b, i)
            v, i = b[i:i + n], i + n
        yield num, wire, v


def _decode_event(event: bytes) -> tuple[int, dict[str, float]]:
    step, scalars = 0, {}
    for num, _, v in _fields(event):
        if num == 2:
            step = v
        elif num == 5:
            for vnum, _, value in _fields(v):
                if vnum != 1:
                    continue
                tag, x = None, None
                for fnum, _, fv in _fields(value):
                    if fnum == 1:
                        tag = fv.decode()
                    elif fnum == 2:
                        x = struct.unpack("<f", fv)[0]
                if tag is not None and x is not None:
                    scalars[tag] = x
    return step, scalars


class MetricsLog:
    """Appends JSON lines to <output_dir>/metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: str, *, tensorboard: bool = True, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tb = TensorBoardWriter(os.path.join(output_dir, "tensorboard")) if (enabled and tensorboard) else None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            self.tb.scalars(int(record["step"]), {k: v for k, v in record.items() if k != "step"})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
