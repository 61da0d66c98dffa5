"""A job's files on disk: result lines, repair of a damaged output, the errors file.

Output: one result per line, `{"id": ..., "text": ..., ...}` (`Result.to_json`), each written
whole and fsynced. `repair_output` runs before a job (re)starts, under the output lock:
  - every valid line is kept, wherever it sits;
  - damaged lines (not UTF-8, not JSON, not an object with a scalar `id` and a string `text`)
    are moved to `<output>.damaged`, one JSON record each with its byte offset in the file as it
    was, the reason, and the line (its exact bytes in base64 when they are not UTF-8);
  - a second, identical line for an id is dropped; a second line for an id that differs from
    the kept one is moved aside like a damaged line;
  - a torn last line (no trailing newline, unparseable: a crash mid-write) is cut (its bytes
    recorded in `<output>.damaged` as well);
  - the repaired file replaces the old one atomically (temp file beside it, fsync, rename), and
    the records go to `<output>.damaged` (fsynced) before that, so a crash at any point loses
    nothing: the old file stays whole until the rename.

Errors file (`ErrorLog`): one JSONL record `{"line", "id", "error"}` per (line, reason) across
reruns, created at the first error.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import errno
import glob
import hashlib
import json
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator


class JobError(Exception):
    """An ordinary problem with a job's files (missing input, output in use, ...): one line."""


def warn_stderr(message: str) -> None:
    """The default warning channel of jobs: one `warning: ...` line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


class BadLine(ValueError):
    """A line that is not a result; `unparseable` if it is not even UTF-8 JSON text."""

    def __init__(self, reason: str, unparseable: bool) -> None:
        super().__init__(reason)
        self.unparseable = unparseable


def result_id(raw: bytes) -> str:
    """The id of one output line (bytes, newline or not); BadLine with the reason otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                      True) from None
    if not text.strip():
        raise BadLine("blank line", True)
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise BadLine(f"not valid JSON ({getattr(e, 'msg', type(e).__name__)})", True) from None
    if not isinstance(obj, dict):
        raise BadLine("not a JSON object", False)
    rid = obj.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise BadLine("no string or integer 'id'", False)
    if not isinstance(obj.get("text"), str):
        raise BadLine("no 'text' string", False)
    return str(rid)


def json_line(obj: dict) -> bytes:
    """One JSONL line as UTF-8 bytes. Text that UTF-8 cannot carry (a lone surrogate from a
    `\\ud800` escape in the input) is written as JSON escapes instead of failing the write."""
    try:
        return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(obj) + "\n").encode("ascii")


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line bytes including its newline) for each line of a file."""
    offset = 0
    with open(path, "rb") as f:
        for raw in f:
            yield offset, raw
            offset += len(raw)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a directory; the rename still happened
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write(path: Path, chunks: Iterable[bytes]) -> None:
    """Replace `path` by the concatenated chunks: a temp file beside it, fsync, rename. A
    symlink stays a symlink: its target is replaced."""
    path = Path(os.path.realpath(path))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def damaged_path(output: Path) -> Path:
    """`<output>.damaged`: lines a repair moved out of the output."""
    return Path(f"{output}.damaged")


@dataclasses.dataclass
class Repair:
    """What `repair_output` found: the ids done, and what it changed."""

    ids: set[str]
    moved: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (offset, reason)
    duplicates: int = 0     # identical copies of a kept line, dropped
    torn_bytes: int = 0     # size of the torn last line that was cut
    newline_added: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.moved or self.duplicates or self.torn_bytes or self.newline_added)

    def message(self, output: Path) -> str:
        parts = []
        if self.moved:
            offsets = ", ".join(str(o) for o, _ in self.moved[:5])
            more = f", ... ({len(self.moved)} in all)" if len(self.moved) > 5 else ""
            parts.append(f"moved {len(self.moved)} damaged line(s) to {damaged_path(output)} "
                         f"(byte offsets {offsets}{more}; their ids rerun)")
        if self.duplicates:
            parts.append(f"dropped {self.duplicates} duplicate line(s) of ids already present")
        if self.torn_bytes:
            parts.append(f"cut a torn last line ({self.torn_bytes} bytes, recorded in "
                         f"{damaged_path(output).name}; its id reruns)")
        if self.newline_added:
            parts.append("added the missing newline after the last line")
        return f"repaired {output}: " + "; ".join(parts) + f"; kept {len(self.ids)} results"


def scan_output(output: Path) -> tuple[Repair, dict[int, BadLine | None]]:
    """Classify every line: (Repair with ids and counts, {offset: reason, or None for an
    identical duplicate} of the lines to take out)."""
    repair = Repair(ids=set())
    kept: dict[str, bytes] = {}     # id -> digest of its kept line
    drop: dict[int, BadLine | None] = {}
    last: bytes = b""
    for offset, raw in iter_lines(output):
        last = raw
        body = raw[:-1] if raw.endswith(b"\n") else raw
        try:
            rid = result_id(body)
        except BadLine as bad:
            if bad.unparseable and not raw.endswith(b"\n"):
                repair.torn_bytes = len(raw)
                drop[offset] = BadLine(f"torn last line, cut ({bad})", True)
            else:
                drop[offset] = bad
                repair.moved.append((offset, str(bad)))
            continue
        digest = hashlib.blake2b(body, digest_size=16).digest()
        if rid not in kept:
            kept[rid] = digest
        elif kept[rid] == digest:
            drop[offset] = None
            repair.duplicates += 1
        else:
            bad = BadLine(f"a second, different line for id {rid!r} (the first one is kept)", False)
            drop[offset] = bad
            repair.moved.append((offset, str(bad)))
    repair.ids = set(kept)
    repair.newline_added = bool(last) and not repair.torn_bytes and not last.endswith(b"\n")
    return repair, drop


def _damaged_record(offset: int, raw: bytes, reason: str, when: str) -> bytes:
    body = raw[:-1] if raw.endswith(b"\n") else raw
    rec = {"offset": offset, "reason": reason, "repaired_at": when,
           "line": body.decode("utf-8", "backslashreplace")}
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:  # keep the exact bytes too
        rec["base64"] = base64.b64encode(body).decode("ascii")
    return json_line(rec)


def repair_output(output: Path, warn: Callable[[str], None]) -> Repair:
    """Make `output` a file of valid result lines, one per id; see the module docstring. Call
    only while holding the output's lock. Returns what it found; warns once if it changed the
    file."""
    for stale in output.parent.glob(f".{glob.escape(output.name)}.*.tmp"):  # a repair cut short by a crash
        stale.unlink(missing_ok=True)
    if not output.exists():
        return Repair(ids=set())
    repair, drop = scan_output(output)
    if not repair.changed:
        return repair
    moved = {o: bad for o, bad in drop.items() if bad is not None}
    if moved:  # records first (fsynced): a crash before the rename below leaves both files
        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with open_append(damaged_path(output)) as f:
            for offset, raw in iter_lines(output):
                if offset in moved:
                    f.write(_damaged_record(offset, raw, str(moved[offset]), when))
            f.flush()
            os.fsync(f.fileno())

    def kept_lines() -> Iterator[bytes]:
        for offset, raw in iter_lines(output):
            if offset not in drop:
                yield raw if raw.endswith(b"\n") else raw + b"\n"

    atomic_write(output, kept_lines())
    warn(repair.message(output))
    return repair


class ErrorLog:
    """The errors file of a job: one record `{"line", "id", "error"}` per (line, reason).

    Records already in the file (from earlier runs) are not written again; the file is created
    at the first new record. `found` counts this run's errors, `new` those written this run.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.found = 0
        self.new = 0
        self._known: set[tuple[int | None, str]] = set()
        self._file = None
        if path.exists():
            for _, raw in iter_lines(path):
                try:
                    rec = json.loads(raw)
                    self._known.add((rec["line"], rec["error"]))
                except (ValueError, KeyError, TypeError, RecursionError):
                    continue  # a torn or foreign line: ignored, left in place

    def add(self, line: int | None, req_id: str | None, reason: str) -> None:
        """Record one error (line: 1-based input line number; None only if unknown)."""
        self.found += 1
        if (line, reason) in self._known:
            return
        if self._file is None:
            self._file = open_append(self.path)
        rec = {"line": line, "id": req_id, "error": reason}
        self._file.write(json_line(rec))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._known.add((line, reason))
        self.new += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "ErrorLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_append(path: Path) -> BinaryIO:
    """Open a JSONL file for appending records; after a torn last record (a crash mid-write)
    start on a line of our own, so the new record stays readable."""
    f = open(path, "ab")
    if f.tell():
        with open(path, "rb") as r:
            r.seek(-1, os.SEEK_END)
            if r.read(1) != b"\n":
                f.write(b"\n")
    return f
