"""Resumable JSONL batch jobs: prompts file in, completions file out.

Input lines: `{"id": ..., "prompt": "..."}` or `{"id": ..., "messages": [...]}`, optionally with
`max_new_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stop`. Lines are decoded one at a
time: a line that is not UTF-8, not valid, or repeats an id, and a request the engine rejects
(e.g. a prompt over the length limit), goes to the errors file with its line number and the
reason, and the job goes on.

Each finished request is appended to the output as one line, written whole and fsynced. A rerun
first repairs the output (job_files.repair_output: damaged lines moved aside, never a valid line
dropped), then skips the ids already there, so after any interruption every id ends up exactly
once. One job per output at a time (job_lock.OutputLock, `<output>.lock`). SIGTERM or SIGINT
stops the job between two output lines (JobInterrupted, carrying the summary).

Scale-out: `shard=(index, count)` keeps input lines whose position % count == index (a fixed
assignment, so a rerun of host i resumes exactly its own lines); run one process per host
(index = jax.process_index()) writing its own output, then `merge_outputs` (or `jaxprefill
infer-merge`) joins them: one line per id, in input order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np

from jaxprefill.infer.engine import Request, Result
from jaxprefill.infer.job_files import (BadLine, ErrorLog, JobError, atomic_write, iter_lines,
                                        json_line, repair_output, result_id, warn_stderr)
from jaxprefill.infer.job_lock import OutputLock, lock_path
from jaxprefill.validate import InputError, check_id, check_sampling

SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed")
KNOWN_FIELDS = {"id", "prompt", "messages", "stop", *SAMPLING_FIELDS}
RESUME_HINT = "rerun the same command to resume"


class JobEngine(Protocol):
    """What a job needs of an engine (`Engine`, `DataParallelEngine`, or a test double): call
    `on_result` once per finished request, `on_error(request, exc)` for a rejected one."""

    def run(self, requests: list[Request], on_result: Callable[[Result], None],
            on_error: Callable[[Request, Exception], None] | None = None,
            progress: bool = False) -> None: ...


class JobInterrupted(BaseException):
    """The job stopped on a signal between two output lines; `summary` holds what it did.

    A BaseException (like KeyboardInterrupt) so that no `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.summary: JobSummary | None = None


@dataclasses.dataclass
class JobSummary:
    """What one run of a job did; `table()` is the end-of-job report."""

    requests: int = 0           # completed in this run
    skipped: int = 0            # already in the output from an earlier run
    errors: int = 0             # found in this run (input lines and engine rejections)
    errors_new: int = 0         # of which not already in the errors file
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    ttft_s: list[float] = dataclasses.field(default_factory=list)
    output: str = ""
    errors_path: str | None = None    # set when the errors file has this run's errors
    interrupted: str | None = None    # signal name when the job was stopped

    def table(self) -> str:
        t = np.asarray(self.ttft_s) if self.ttft_s else np.zeros(1)
        tput = (self.prompt_tokens + self.completion_tokens) / max(self.wall_s, 1e-9)
        errors = str(self.errors)
        if self.errors:
            errors += f" ({self.errors_new} new) in {self.errors_path}"
        rows = [("requests completed", self.requests), ("skipped (already done)", self.skipped),
                ("errors", errors), ("prompt tokens", self.prompt_tokens),
                ("completion tokens", self.completion_tokens), ("wall time (s)", f"{self.wall_s:.2f}"),
                ("throughput (tok/s, prompt+completion)", f"{tput:.1f}"),
                ("decode throughput (tok/s)", f"{self.completion_tokens / max(self.wall_s, 1e-9):.1f}"),
                ("TTFT mean / p50 / p99 (s)",
                 f"{t.mean():.3f} / {np.percentile(t, 50):.3f} / {np.percentile(t, 99):.3f}")]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        if self.interrupted:
            lines.append(f"interrupted by {self.interrupted}: {self.requests} results written to "
                         f"{self.output} this run; {RESUME_HINT}")
        return "\n".join(lines)


def parse_line(line: str, lineno: int) -> Request:
    """One input line -> Request; ValueError with the reason when it is malformed."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"line {lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"line {lineno}: expected a JSON object")
    if "id" not in obj:
        raise ValueError(f"line {lineno}: missing 'id'")
    unknown = sorted(set(obj) - KNOWN_FIELDS)
    if unknown:
        raise ValueError(f"line {lineno}: unknown field(s) {unknown}")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise ValueError(f"line {lineno}: give exactly one of 'prompt' or 'messages'")
    if has_prompt and not isinstance(obj["prompt"], str):
        raise ValueError(f"line {lineno}: 'prompt' must be a string")
    if has_messages and not (isinstance(obj["messages"], list) and obj["messages"] and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in obj["messages"])):
        raise ValueError(f"line {lineno}: 'messages' must be a non-empty list of "
                         f"{{'role', 'content'}} objects")
    stop = obj.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    try:  # the same checks (field, allowed range) as jp.generate and the engine
        check_id(obj["id"], "'id'")
        check_sampling(stop=stop, **{k: obj[k] for k in SAMPLING_FIELDS if k in obj})
    except InputError as e:
        raise ValueError(f"line {lineno}: {e}") from None
    return Request(id=str(obj["id"]), prompt=obj["prompt"] if has_prompt else obj["messages"],
                   stop=stop, **{k: obj[k] for k in SAMPLING_FIELDS if k in obj})


def default_errors_path(output: Path) -> Path:
    """`out.jsonl` -> `out.errors.jsonl`."""
    return output.with_name(output.stem + ".errors.jsonl")


def check_input(path: str | os.PathLike) -> Path:
    """The input file, checked to exist and be readable (JobError naming the problem)."""
    p = Path(path)
    if not p.exists():
        raise JobError(f"input file {p} does not exist")
    if p.is_dir():
        raise JobError(f"input file {p} is a directory, expected a JSONL file")
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise JobError(f"input file {p} is not readable ({e.strerror})") from None
    return p


def check_output(path: str | os.PathLike, what: str = "output",
                 input_path: str | os.PathLike | None = None) -> Path:
    """An output file path: not a directory, not the input, its directory created."""
    p = Path(path)
    if p.is_dir():
        raise JobError(f"{what} {p} is a directory, expected a file path")
    if input_path is not None and p.exists() and os.path.samefile(p, input_path):
        raise JobError(f"{what} {p} is the input file")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JobError(f"cannot create the directory of {what} {p} ({e.strerror})") from None
    return p


class _StopOnSignal:
    """SIGTERM / SIGINT -> JobInterrupted, never while a line is being written.

    The handler raises at once, unless a line is being written (inside `critical()`): then the
    exception is raised right after that line is complete. Later signals are ignored while the
    job unwinds. Installs only in the main thread (Python's rule); restores the previous
    handlers on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.enabled = threading.current_thread() is threading.main_thread()
        self._previous: dict = {}
        self._writing = False
        self._fired = False
        self._pending: int | None = None

    def __enter__(self) -> "_StopOnSignal":
        if self.enabled:
            for s in self.SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:  # e.g. SIGINT of a `cmd &` job
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame) -> None:
        if self._fired:
            return
        self._fired = True
        if self._writing:
            self._pending = signum
        else:
            raise JobInterrupted(signum)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """Write one line here: a signal waits until it is complete."""
        self._writing = True
        try:
            yield
        finally:
            self._writing = False
        if self._pending is not None:
            signum, self._pending = self._pending, None
            raise JobInterrupted(signum)


def _read_requests(inp: Path, shard: tuple[int, int], done: set[str],
                   record: Callable[[int, str | None, str], None],
                   summary: JobSummary) -> tuple[list[Request], dict[str, int]]:
    """This shard's valid requests not yet done, and each pending id's input line number.
    Lines are read as bytes and decoded one at a time, so one bad line is one error."""
    index, count = shard
    pending: list[Request] = []
    line_of: dict[str, int] = {}
    seen: set[str] = set()
    with open(inp, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if (lineno - 1) % count != index or not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                record(lineno, None, f"line {lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} "
                                     f"at column {e.start + 1})")
                continue
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte order mark some editors write
            try:
                req = parse_line(line, lineno)
            except ValueError as e:
                record(lineno, None, str(e))
                continue
            if req.id in seen:  # checked before `done`, so a rerun reports it again the same way
                record(lineno, req.id, f"line {lineno}: duplicate id {req.id!r}")
                continue
            seen.add(req.id)
            if req.id in done:
                summary.skipped += 1
                continue
            pending.append(req)
            line_of[req.id] = lineno
    return pending, line_of


def run_job(engine: JobEngine, input_path: str | os.PathLike, output_path: str | os.PathLike,
            errors_path: str | os.PathLike | None = None, shard: tuple[int, int] = (0, 1),
            progress: bool = True, *, lock: OutputLock | None = None,
            warn: Callable[[str], None] = warn_stderr) -> JobSummary:
    """Complete every request of input_path not yet in output_path; see the module docstring.

    lock: an OutputLock the caller already holds for output_path (the CLI takes it before it
    loads the model); by default run_job takes and releases it. warn: where repair and stale
    lock warnings go (default: stderr). Raises JobError (missing input, output in use, ...)
    before any request, and JobInterrupted (its `.summary` filled in) on SIGTERM / SIGINT.
    """
    inp = check_input(input_path)
    out = check_output(output_path, "output", inp)
    err = check_output(errors_path or default_errors_path(out), "errors file", inp)
    if not 0 <= shard[0] < shard[1]:
        raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
    summary = JobSummary(output=str(out))
    t0 = None
    with contextlib.ExitStack() as stack:
        if lock is None:
            lock = stack.enter_context(OutputLock(out, warn))
        elif not (lock.held and lock.path == lock_path(out)):
            raise ValueError(f"run_job got a lock that is not held for {out}")
        stop = stack.enter_context(_StopOnSignal())
        errors = stack.enter_context(ErrorLog(err))

        def record(line: int | None, req_id: str | None, reason: str) -> None:
            with stop.critical():
                errors.add(line, req_id, reason)

        try:
            with stop.critical():  # short, and no torn record in <output>.damaged
                done = repair_output(out, warn).ids
            pending, line_of = _read_requests(inp, shard, done, record, summary)
            with open(out, "ab") as fout:
                def on_result(r: Result) -> None:
                    data = json_line(r.to_json())
                    with stop.critical():
                        fout.write(data)
                        fout.flush()
                        os.fsync(fout.fileno())
                        summary.requests += 1
                        summary.prompt_tokens += r.prompt_tokens
                        summary.completion_tokens += len(r.tokens)
                        summary.ttft_s.append(r.ttft_s)

                def on_error(req: Request, e: Exception) -> None:
                    line = line_of.get(req.id)
                    record(line, req.id, f"line {line}: {e}" if line else str(e))

                t0 = time.perf_counter()
                engine.run(pending, on_result, on_error=on_error, progress=progress)
        except JobInterrupted as e:
            summary.interrupted = signal.Signals(e.signum).name
            e.summary = summary
            raise
        finally:
            summary.wall_s = time.perf_counter() - t0 if t0 is not None else 0.0
            summary.errors, summary.errors_new = errors.found, errors.new
            summary.errors_path = str(err) if errors.found else None
    return summary


def merge_outputs(parts: list[str | os.PathLike], output: str | os.PathLike,
                  input_path: str | os.PathLike | None = None,
                  warn: Callable[[str], None] = warn_stderr) -> dict:
    """Join per-host outputs into one file: each id once (the first copy), every valid line
    kept wherever damaged lines sit (those are skipped and left in the part files, with a
    warning per part), ordered as in `input_path` when given (ids not in it follow, in part
    order). Written to a temporary file and renamed (atomic).

    Returns counts {"ids", "duplicates", "damaged", "missing"}; missing: valid input requests
    without an output (not yet run, or rejected by the engine: see the errors files)."""
    rows: dict[str, bytes] = {}
    duplicates = damaged = 0
    for part in map(Path, parts):
        if not part.is_file():
            raise JobError(f"part file {part} does not exist")
        bad = 0
        for _, raw in iter_lines(part):
            body = raw[:-1] if raw.endswith(b"\n") else raw
            try:
                rid = result_id(body)
            except BadLine:
                bad += 1
                continue
            if rid in rows:
                duplicates += 1
                continue
            rows[rid] = body + b"\n"
        if bad:
            warn(f"{part}: skipped {bad} damaged or torn line(s), left in place (rerunning that "
                 f"shard's job moves them aside and reruns their ids)")
        damaged += bad
    order: list[str] = []
    placed: set[str] = set()
    missing = 0
    if input_path is not None:
        seen: set[str] = set()
        with open(check_input(input_path), "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    rid = parse_line(raw.decode("utf-8").removeprefix("\ufeff"), lineno).id
                except ValueError:  # UnicodeDecodeError too: a line the job rejects
                    continue
                if rid in seen:
                    continue
                seen.add(rid)
                if rid in rows:
                    order.append(rid)
                    placed.add(rid)
                else:
                    missing += 1
    order += [rid for rid in rows if rid not in placed]
    atomic_write(check_output(output, "output"), (rows[rid] for rid in order))
    return {"ids": len(order), "duplicates": duplicates, "damaged": damaged, "missing": missing}
