"""Resumable JSONL batch jobs: prompts file in, completions file out.

Input lines: `{"id": ..., "prompt": "..."}` or `{"id": ..., "messages": [...]}`, optionally with
`max_new_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stop`. Each finished request is
appended to the output as one complete line and flushed (a crash loses at most the requests in
flight). A rerun reads the output first and skips ids already there, so after an interruption
every id ends up exactly once. Malformed lines, duplicate ids and over-long prompts go to the
errors file with the line number and reason; the job goes on.

Scale-out: `shard=(index, count)` keeps input lines whose position % count == index (a fixed
assignment, so a rerun of host i resumes exactly its own lines); run one process per host
(index = jax.process_index()) writing its own output, then `merge_outputs` (or `jaxprefill
infer-merge`) joins them: one line per id, in input order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from jaxprefill.infer.engine import Engine, Request, Result

SAMPLING_FIELDS = {"max_new_tokens": int, "temperature": (int, float), "top_p": (int, float),
                   "top_k": int, "seed": int}
KNOWN_FIELDS = {"id", "prompt", "messages", "stop", *SAMPLING_FIELDS}


@dataclasses.dataclass
class JobSummary:
    requests: int = 0           # completed in this run
    skipped: int = 0            # already in the output from an earlier run
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    ttft_s: list[float] = dataclasses.field(default_factory=list)

    def table(self) -> str:
        t = np.asarray(self.ttft_s) if self.ttft_s else np.zeros(1)
        tput = (self.prompt_tokens + self.completion_tokens) / max(self.wall_s, 1e-9)
        rows = [("requests completed", self.requests), ("skipped (already done)", self.skipped),
                ("errors", self.errors), ("prompt tokens", self.prompt_tokens),
                ("completion tokens", self.completion_tokens), ("wall time (s)", f"{self.wall_s:.2f}"),
                ("throughput (tok/s, prompt+completion)", f"{tput:.1f}"),
                ("decode throughput (tok/s)", f"{self.completion_tokens / max(self.wall_s, 1e-9):.1f}"),
                ("TTFT mean / p50 / p99 (s)",
                 f"{t.mean():.3f} / {np.percentile(t, 50):.3f} / {np.percentile(t, 99):.3f}")]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def parse_line(line: str, lineno: int) -> Request:
    """One input line -> Request; ValueError with the reason when it is malformed."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"line {lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"line {lineno}: expected a JSON object")
    if "id" not in obj or not isinstance(obj["id"], (str, int)):
        raise ValueError(f"line {lineno}: missing or non-scalar 'id'")
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
    for name, types in SAMPLING_FIELDS.items():
        if name in obj and (not isinstance(obj[name], types) or isinstance(obj[name], bool)):
            raise ValueError(f"line {lineno}: '{name}' has the wrong type")
    stop = obj.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise ValueError(f"line {lineno}: 'stop' must be a string or a list of strings")
    return Request(id=str(obj["id"]), prompt=obj["prompt"] if has_prompt else obj["messages"],
                   stop=stop, **{k: obj[k] for k in SAMPLING_FIELDS if k in obj})


def completed_ids(output: Path) -> set[str]:
    """Ids already in the output. A torn last line (crash mid-write) is cut off the file."""
    if not output.exists():
        return set()
    ids, good_bytes = set(), 0
    with open(output, "rb") as f:
        for raw in f:
            try:
                ids.add(str(json.loads(raw)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                break
            good_bytes += len(raw)
    if good_bytes != output.stat().st_size:
        with open(output, "r+b") as f:
            f.truncate(good_bytes)
    return ids


def run_job(engine: Engine, input_path: str | os.PathLike, output_path: str | os.PathLike,
            errors_path: str | os.PathLike | None = None, shard: tuple[int, int] = (0, 1),
            progress: bool = True) -> JobSummary:
    """Complete every request of input_path not yet in output_path; see the module docstring."""
    inp, out = Path(input_path), Path(output_path)
    err = Path(errors_path) if errors_path else out.with_name(out.stem + ".errors.jsonl")
    if not inp.exists():
        raise FileNotFoundError(f"input file {inp} does not exist")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = completed_ids(out)
    summary = JobSummary()
    seen: set[str] = set()

    with open(out, "a", encoding="utf-8") as fout, open(err, "a", encoding="utf-8") as ferr:
        def error(lineno: int | None, req_id: str | None, reason: str) -> None:
            summary.errors += 1
            ferr.write(json.dumps({"line": lineno, "id": req_id, "error": reason}) + "\n")
            ferr.flush()

        def requests() -> Iterator[Request]:
            with open(inp, encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip() or (lineno - 1) % shard[1] != shard[0]:
                        continue
                    try:
                        req = parse_line(line, lineno)
                    except ValueError as e:
                        error(lineno, None, str(e))
                        continue
                    if req.id in done:
                        summary.skipped += 1
                        continue
                    if req.id in seen:
                        error(lineno, req.id, f"line {lineno}: duplicate id {req.id!r}")
                        continue
                    seen.add(req.id)
                    yield req

        def on_result(r: Result) -> None:
            fout.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")  # one write per line
            fout.flush()
            os.fsync(fout.fileno())
            summary.requests += 1
            summary.prompt_tokens += r.prompt_tokens
            summary.completion_tokens += len(r.tokens)
            summary.ttft_s.append(r.ttft_s)

        pending = list(requests())
        t0 = time.perf_counter()
        engine.run(pending, on_result, on_error=lambda req, e: error(None, req.id, str(e)),
                   progress=progress)
        summary.wall_s = time.perf_counter() - t0
    return summary


def merge_outputs(parts: list[str | os.PathLike], output: str | os.PathLike,
                  input_path: str | os.PathLike | None = None) -> dict:
    """Join per-host outputs into one file: each id once (the first copy), complete lines only
    (a torn last line of a crashed host is skipped), ordered as in `input_path` when given (ids
    not in it follow, in part order). Written to a temporary file and renamed (atomic).
    Returns counts {"ids", "duplicates", "missing"} (missing: input ids without an output)."""
    rows: dict[str, str] = {}
    duplicates = 0
    for part in parts:
        with open(part, "rb") as f:
            for raw in f:
                try:
                    rid = str(json.loads(raw)["id"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn line (its request reruns when that host resumes)
                if rid in rows:
                    duplicates += 1
                    continue
                rows[rid] = raw.decode("utf-8").rstrip("\n")
    order: list[str] = []
    missing = 0
    if input_path is not None:
        with open(input_path, encoding="utf-8") as f:
            for line in f:
                try:
                    rid = str(json.loads(line)["id"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
                if rid in rows and rid not in order:
                    order.append(rid)
                elif rid not in rows:
                    missing += 1
    seen = set(order)
    order += [rid for rid in rows if rid not in seen]
    out = Path(output)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rid in order:
            f.write(rows[rid] + "\n")
    os.replace(tmp, out)
    return {"ids": len(order), "duplicates": duplicates, "missing": missing}
