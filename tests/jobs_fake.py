"""A fake batch engine for job tests: the job loop's engine seam (`jobs.JobEngine`) without a model.

It rejects prompts containing "TOO LONG" through `on_error` (as the real engine rejects an
over-long prompt), completes the others in a shuffled order (the real engine finishes requests
out of order too) with deterministic results, and can stop after `kill_after` results by
raising `Killed`, a stand-in for the process dying there.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from jaxprefill.infer.engine import Request, Result


class Killed(BaseException):
    """A simulated kill: the job loop stops where it is, nothing after it runs."""


def fake_result(req: Request) -> Result:
    """The same Result for the same request, run after run."""
    prompt = req.prompt if isinstance(req.prompt, str) else json.dumps(req.prompt)
    return Result(req.id, text=f"answer to {prompt[:40]} ü", tokens=[1, 2, 3],
                  prompt_tokens=len(prompt), finish_reason="length", ttft_s=0.01,
                  decode_tok_s=100.0)


class FakeEngine:
    def __init__(self, kill_after: int | None = None, delay: float = 0.0, order_seed: int = 0):
        self.kill_after, self.delay, self.order_seed = kill_after, delay, order_seed
        self.completed: list[str] = []   # ids passed to on_result, in order

    def run(self, requests, on_result, on_error=None, progress=False) -> None:
        ready = []
        for req in requests:
            if "TOO LONG" in str(req.prompt):
                e = ValueError(f"request {req.id!r}: prompt over the length limit")
                if on_error is None:
                    raise e
                on_error(req, e)
                continue
            ready.append(req)
        random.Random(self.order_seed).shuffle(ready)
        for i, req in enumerate(ready):
            if self.kill_after is not None and i >= self.kill_after:
                raise Killed
            if self.delay:
                time.sleep(self.delay)
            self.completed.append(req.id)
            on_result(fake_result(req))


def write_prompts(path: Path, ids: list[str], extra_lines: dict[int, bytes] | None = None) -> None:
    """One prompt line per id; extra_lines {position: raw line} inserted (bad lines)."""
    lines = [json.dumps({"id": i, "prompt": f"question {i}"}).encode() for i in ids]
    for pos, raw in sorted((extra_lines or {}).items()):
        lines.insert(pos, raw)
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def is_result_line(line: bytes) -> bool:
    """The test's own idea of a valid output line (independent of job_files)."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return (isinstance(obj, dict) and isinstance(obj.get("id"), (str, int))
            and not isinstance(obj.get("id"), bool) and isinstance(obj.get("text"), str))


def output_ids(path: Path) -> list[str]:
    return [str(json.loads(line)["id"]) for line in path.read_bytes().splitlines()]
