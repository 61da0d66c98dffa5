"""Fault injection for resumable jobs: random damage to the output and kills at random points,
then reruns; every trial must end with each input id exactly once and no valid line lost.

Driven by the fake engine (tests/jobs_fake.py) through the job loop's engine seam, so each
trial takes milliseconds; the real engine runs in tests/test_jobs.py.
"""

import json
import os
import random
import socket

from jaxprefill.infer import jobs
from jaxprefill.infer.job_files import damaged_path
from jaxprefill.infer.job_lock import lock_path
from jobs_fake import FakeEngine, Killed, is_result_line, output_ids, write_prompts

TRIALS = 60
BAD_INPUT = {1: b"{not json", 3: b'{"id": "u", "prompt": "caf\xe9"}',
             5: b'{"id": "long", "prompt": "TOO LONG"}', 7: b'{"id": "r0", "prompt": "again"}'}


def split(data: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines (without newline) and the unterminated tail (b"" if none)."""
    *lines, tail = data.split(b"\n")
    return lines, tail


def join(lines: list[bytes], tail: bytes) -> bytes:
    return b"".join(line + b"\n" for line in lines) + tail


def damage(path, rng: random.Random) -> None:
    """1-4 random faults: garbage, id-less JSON, non-UTF-8 or blank lines anywhere, duplicated
    lines, a line corrupted in place, a torn tail, a missing final newline."""
    lines, tail = split(path.read_bytes()) if path.exists() else ([], b"")
    valid = [line for line in lines if is_result_line(line)]
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["garbage", "no_id", "non_utf8", "blank", "duplicate", "corrupt",
                           "torn", "unterminated"])
        pos = rng.randint(0, len(lines))
        if kind == "garbage":
            lines.insert(pos, bytes(rng.choice(b"{}[]\":,ab01 \t\r") for _ in range(rng.randint(1, 30))))
        elif kind == "no_id":
            lines.insert(pos, json.dumps({"text": "orphan", "n": pos}).encode())
        elif kind == "non_utf8":
            lines.insert(pos, b'{"id": "x", "text": "\xff\xfe bad"}')
        elif kind == "blank":
            lines.insert(pos, b"   ")
        elif kind == "duplicate" and valid:
            lines.insert(pos, rng.choice(valid))
        elif kind == "corrupt" and lines:
            i = rng.randrange(len(lines))
            if len(lines[i]) > 2:
                cut = rng.randrange(1, len(lines[i]) - 1)
                lines[i] = lines[i][:cut] + rng.choice([b"\xff", b""])
        elif kind == "torn" and valid and not tail:
            line = rng.choice(valid)
            tail = line[:rng.randrange(1, len(line))]
        elif kind == "unterminated" and lines and not tail:
            tail = lines.pop()
    path.write_bytes(join(lines, tail))


def parses(line: bytes) -> bool:
    try:
        json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return True


def expected_records(data: bytes) -> tuple[list[int], int]:
    """Byte offsets of the lines a repair must record in <output>.damaged, and how many of them
    it moves aside (invalid complete lines, and an unterminated last line that parses but is
    not a result); the other one, an unparseable unterminated last line, is torn: cut."""
    offsets, offset = [], 0
    lines, tail = split(data)
    for line in lines:
        if not is_result_line(line):
            offsets.append(offset)
        offset += len(line) + 1
    moved = len(offsets)
    if tail and not is_result_line(tail):
        offsets.append(offset)
        moved += parses(tail)
    return offsets, moved


def damaged_records(out) -> list[dict]:
    path = damaged_path(out)
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def test_fault_injection_every_id_once_nothing_lost(tmp_path, monkeypatch):
    # fsync makes nothing more correct within one process and costs ~10 ms a line here
    syncs = []
    monkeypatch.setattr(os, "fsync", syncs.append)
    real_replace = os.replace
    for trial in range(TRIALS):
        rng = random.Random(trial)
        root = tmp_path / f"t{trial}"
        root.mkdir()
        inp, out = root / "in.jsonl", root / "out.jsonl"
        n = rng.randint(1, 20)
        ids = [f"r{i}" for i in range(n)]
        write_prompts(inp, ids, {k: v for k, v in BAD_INPUT.items() if k <= n})
        want = set(ids)
        ever_valid: set[bytes] = set()
        rounds = rng.randint(2, 5)
        for rnd in range(rounds):
            last = rnd == rounds - 1
            if rnd and rng.random() < 0.8:
                damage(out, rng)
            if rng.random() < 0.2:  # the previous job was killed -9: its lock file stayed
                lock_path(out).write_text(f"{2**22 + 7}@{socket.gethostname()}\n")
            before = out.read_bytes() if out.exists() else b""
            lines, tail = split(before)
            valid_now = {x for x in lines + [tail] if is_result_line(x)}
            ever_valid |= valid_now
            n_records = len(damaged_records(out))
            crash_repair = not last and expected_records(before)[0] and rng.random() < 0.25
            if crash_repair:  # killed in the middle of rewriting the output
                monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(Killed()))
            engine = FakeEngine(kill_after=None if last else rng.randint(0, n), order_seed=rnd)
            warnings: list[str] = []
            try:
                jobs.run_job(engine, inp, out, progress=False, warn=warnings.append)
            except Killed:
                assert not last
            finally:
                monkeypatch.setattr(os, "replace", real_replace)
            after_lines, after_tail = split(out.read_bytes())
            ctx = f"trial {trial} round {rnd}"
            if crash_repair:
                assert out.read_bytes() == before, ctx  # the old file is whole
            else:
                assert after_tail == b"", ctx  # never a torn line after a (killed) job
                assert valid_now <= set(after_lines), ctx  # no valid line lost
                assert len(output_ids(out)) == len(set(output_ids(out))), ctx
                records = damaged_records(out)[n_records:]
                offsets, moved = expected_records(before)
                assert [r["offset"] for r in records] == offsets, ctx
                for r in records:  # each record names the line's place in the damaged file
                    raw = before[r["offset"]:].split(b"\n", 1)[0]
                    assert raw.decode("utf-8", "backslashreplace") == r["line"], ctx
                if moved:
                    assert any(f"moved {moved} damaged line(s)" in w for w in warnings), ctx
            assert not lock_path(out).exists(), ctx
            assert not list(root.glob(".*.tmp")) or crash_repair, ctx
        final = out.read_bytes().splitlines()
        assert sorted(output_ids(out)) == sorted(want), f"trial {trial}"  # each id once
        assert ever_valid <= set(final), f"trial {trial}"
        errors = [json.loads(x) for x in (root / "out.errors.jsonl").read_bytes().splitlines()]
        keys = [(e["line"], e["error"]) for e in errors]
        assert len(keys) == len(set(keys)) == sum(k <= n for k in BAD_INPUT), f"trial {trial}"
        assert all(isinstance(e["line"], int) for e in errors)
        # idempotent: one more run changes nothing and finds nothing to do
        warnings = []
        summary = jobs.run_job(FakeEngine(), inp, out, progress=False, warn=warnings.append)
        assert summary.requests == 0 and summary.skipped == n and warnings == []
        assert out.read_bytes().splitlines() == final
    assert syncs  # the job did sync what it wrote
