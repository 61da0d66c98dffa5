"""Run logs: JSONL lines and TensorBoard event files (written directly, no TensorFlow needed).

A TensorBoard events file is a sequence of records `[len u64][crc(len) u32][Event proto][crc u32]`
with masked CRC32C. We encode the few protobuf fields we need by hand: Event{wall_time=1 (double),
step=2 (int64), file_version=3 (string), summary=5 {value=1 {tag=1 (string), simple_value=2
(float)}}}. `read_events` decodes them back (tests, and for tools without TensorBoard).
"""

from __future__ import annotations

import json
import os
import datetime
import socket
import struct
import time
from typing import Any, Callable, Iterator


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
    """Appends JSON lines to <output_dir>/metrics.jsonl and mirrors scalars to TensorBoard.

    Every record has a "step": training records (loss, lr, ...) one per step in step order,
    validation records (val_loss) and events ("event": "first_step" | "resume") beside them.
    """

    def __init__(self, output_dir: str, *, tensorboard: bool = True, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tb = TensorBoardWriter(os.path.join(output_dir, "tensorboard")) if (enabled and tensorboard) else None

    def set_aside(self) -> str | None:
        """Rename a metrics.jsonl left by an earlier run to metrics.<n>.jsonl (the first free n),
        so a run starting from scratch writes its steps into a file of its own; returns the new
        path, or None when there was nothing to move."""
        if not self.enabled or not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
            return None
        n = 1
        while os.path.exists(old := self.path[:-len(".jsonl")] + f".{n}.jsonl"):
            n += 1
        os.replace(self.path, old)
        return old

    def drop_after(self, step: int) -> tuple[int, int]:
        """Remove the records of steps > `step` (a resume from `step` replays and rewrites them,
        so each step keeps one record) and any torn line a killed run left. Returns (records
        dropped, torn lines dropped). The file is rewritten atomically (temp file + rename)."""
        if not self.enabled or not os.path.exists(self.path):
            return 0, 0
        kept, dropped, torn = [], 0, 0
        with open(self.path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    torn += 1
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
                    dropped += 1
                else:
                    kept.append(line if line.endswith("\n") else line + "\n")
        if dropped or torn:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        return dropped, torn

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


class ProgressLine:
    """Progress for logs that are not terminals (no tqdm bar there): every `every` steps one line
    `step 40/60 (67%): loss 2.3456, 12,345 tokens/s, ETA 0:00:12` through `say`.

    Tokens/s and ETA cover the steps since the previous line, timed from `start` (call it after
    the first step, which includes compilation); `loss` is the step's own loss.
    """

    def __init__(self, say: Callable[[str], None], *, total: int, every: int, tokens_per_step: int) -> None:
        self.say, self.total, self.every, self.tokens_per_step = say, total, every, tokens_per_step
        self._t: float | None = None
        self._step = 0

    def start(self, step: int) -> None:
        self._t, self._step = time.perf_counter(), step

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    def log(self, step: int, loss: float) -> str:
        """Say (and return) the line for `step`; the caller has waited for the step's loss."""
        line = f"step {step}/{self.total} ({100 * step // self.total}%): loss {loss:.4f}"
        now = time.perf_counter()
        if self._t is not None and step > self._step:
            per_step = (now - self._t) / (step - self._step)
            line += f", {self.tokens_per_step / per_step:,.0f} tokens/s"
            line += f", ETA {datetime.timedelta(seconds=round(per_step * (self.total - step)))}"
            self._t, self._step = now, step
        self.say(line)
        return line
