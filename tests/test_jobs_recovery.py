"""Jobs keep every finished result: output repair, per-line input decoding, the output lock, the
errors file across reruns, and infer-merge over damaged parts (fake engine, tests/jobs_fake.py)."""

import base64
import json
import os
import socket
import subprocess
import sys

import pytest

from jaxprefill.infer.engine import Request
from jaxprefill.infer.job_files import JobError, damaged_path
from jaxprefill.infer.job_lock import OutputLock, OutputLockedError, lock_path
from jaxprefill.infer.jobs import merge_outputs, run_job
from jobs_fake import FakeEngine, Killed, fake_result, output_ids, write_prompts

ME = f"{os.getpid()}@{socket.gethostname()}"


def result_line(rid: str) -> bytes:
    return (json.dumps(fake_result(Request(rid, f"question {rid}")).to_json(),
                       ensure_ascii=False) + "\n").encode()


def job(inp, out, engine=None, **kw):
    warnings: list[str] = []
    summary = run_job(engine or FakeEngine(), inp, out, progress=False, warn=warnings.append, **kw)
    return summary, warnings


# ---- 1. output repair ---------------------------------------------------------------------

def test_damaged_lines_mid_file_keep_every_valid_line(tmp_path):
    """The reported loss: a damaged line and an id-less JSON line in the middle of 40 results
    used to truncate the file there. Now all 40 stay and the two lines move aside."""
    ids = [f"r{i}" for i in range(40)]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(inp, ids)
    good = [result_line(i) for i in ids]
    bad_a, bad_b = b'{"id": "r5", "te\xffxt": \n', b'{"text": "no id here"}\n'
    data = b"".join(good[:4]) + bad_a + b"".join(good[4:20]) + bad_b + b"".join(good[20:])
    out.write_bytes(data)
    summary, warnings = job(inp, out)
    assert summary.skipped == 40 and summary.requests == 0
    assert out.read_bytes() == b"".join(good)  # every valid line, in its order
    records = [json.loads(x) for x in damaged_path(out).read_bytes().splitlines()]
    assert [r["offset"] for r in records] == [data.index(bad_a), data.index(bad_b)]
    assert "not valid UTF-8" in records[0]["reason"] and "'id'" in records[1]["reason"]
    assert records[1]["line"] == bad_b.decode().rstrip("\n")
    assert base64.b64decode(records[0]["base64"]) == bad_a.rstrip(b"\n")  # exact bytes kept
    (warning,) = warnings
    assert "moved 2 damaged line(s)" in warning and str(damaged_path(out)) in warning


def test_duplicates_torn_tail_and_unterminated_last_line(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(inp, ["a", "b", "c"])
    a, b = result_line("a"), result_line("b")
    other_a = a.replace(b"answer", b"another answer")
    out.write_bytes(a + b + a + other_a + b'{"id": "c", "te')  # torn: killed mid-write
    summary, (warning,) = job(inp, out)
    assert output_ids(out) == ["a", "b", "c"] and out.read_bytes().startswith(a + b)
    assert summary.requests == 1 and summary.skipped == 2
    assert "dropped 1 duplicate line(s)" in warning and "cut a torn last line (15 bytes" in warning
    moved, torn = [json.loads(x) for x in damaged_path(out).read_bytes().splitlines()]
    assert "second, different line for id 'a'" in moved["reason"]  # kept aside, not lost
    assert moved["line"].encode() + b"\n" == other_a
    assert torn["line"] == '{"id": "c", "te' and "torn last line" in torn["reason"]
    # a complete last line without its newline is a result, not a torn line
    out.write_bytes(out.read_bytes().rstrip(b"\n"))
    summary, (warning,) = job(inp, out)
    assert summary.skipped == 3 and "added the missing newline" in warning
    assert out.read_bytes().endswith(b"\n") and len(output_ids(out)) == 3


def test_crash_during_repair_loses_nothing(tmp_path, monkeypatch):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(inp, ["a", "b"])
    data = result_line("a") + b"garbage\n" + result_line("b")
    out.write_bytes(data)

    def killed(*args):
        raise Killed
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(Killed):
        job(inp, out)
    monkeypatch.undo()
    assert out.read_bytes() == data  # the old file is untouched until the rename
    assert not list(tmp_path.glob(".*.tmp")) and not lock_path(out).exists()
    summary, _ = job(inp, out)
    assert output_ids(out) == ["a", "b"] and summary.requests == 0


def test_repair_keeps_file_mode_and_symlink(tmp_path):
    inp, out, real = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "real.jsonl"
    write_prompts(inp, ["a"])
    real.write_bytes(b"junk\n" + result_line("a"))
    real.chmod(0o640)
    out.symlink_to(real)
    job(inp, out)
    assert out.is_symlink() and real.read_bytes() == result_line("a")
    assert (real.stat().st_mode & 0o777) == 0o640


# ---- 2. input decoded line by line ---------------------------------------------------------

def test_undecodable_input_line_is_an_error_not_a_crash(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(inp, ["a", "b", "c"], {1: b'{"id": "x", "prompt": "caf\xe9"}'})
    inp.write_bytes(b"\xef\xbb\xbf" + inp.read_bytes())  # a BOM on line 1 is fine
    summary, _ = job(inp, out)
    assert sorted(output_ids(out)) == ["a", "b", "c"] and summary.errors == 1
    (err,) = [json.loads(x) for x in (tmp_path / "out.errors.jsonl").read_bytes().splitlines()]
    assert err["line"] == 2 and "not valid UTF-8 (byte 0xe9 at column 27)" in err["error"]


# ---- 3. one job per output -----------------------------------------------------------------

def test_second_job_on_same_output_refused_naming_holder(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(inp, ["a", "b"])
    engine = FakeEngine()
    with OutputLock(out):
        assert lock_path(out).read_text().strip() == ME
        with pytest.raises(OutputLockedError, match=f"in use by another job \\({ME}\\)"):
            job(inp, out, engine)
    assert engine.completed == [] and not out.exists()
    job(inp, out, engine)  # released: the next job runs
    assert sorted(output_ids(out)) == ["a", "b"] and not lock_path(out).exists()


def test_stale_lock_of_dead_process_taken_over_with_warning(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(inp, ["a"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path(out).write_text(f"{dead.pid}@{socket.gethostname()}\n")
    summary, (warning,) = job(inp, out)
    assert summary.requests == 1 and not lock_path(out).exists()
    assert f"left by {dead.pid}@{socket.gethostname()}" in warning
    assert "no longer running" in warning


def test_shards_with_own_outputs_run_side_by_side(tmp_path):
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, [f"r{i}" for i in range(5)])
    parts = [tmp_path / f"out.{i}.jsonl" for i in range(2)]
    with OutputLock(parts[1]):  # host 1 is running
        job(inp, parts[0], shard=(0, 2))
        with pytest.raises(OutputLockedError):
            job(inp, parts[1], shard=(1, 2))
    job(inp, parts[1], shard=(1, 2))
    assert output_ids(parts[0]) and output_ids(parts[1])
    merged = tmp_path / "merged.jsonl"
    assert merge_outputs(parts, merged, inp)["missing"] == 0
    assert output_ids(merged) == [f"r{i}" for i in range(5)]


# ---- 4. the errors file --------------------------------------------------------------------

def test_errors_file_once_per_line_and_reason_with_line_numbers(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    errors = tmp_path / "out.errors.jsonl"
    write_prompts(inp, ["a", "b", "c"], {1: b"{oops", 2: b'{"id": "long", "prompt": "TOO LONG"}',
                                         4: b'{"id": "a", "prompt": "dup"}'})
    summary, _ = job(inp, out)
    first = errors.read_bytes()
    recs = [json.loads(x) for x in first.splitlines()]
    assert [(r["line"], r["id"]) for r in recs] == [(2, None), (5, "a"), (3, "long")]
    assert "over the length limit" in recs[2]["error"]  # an engine-level error, with its line
    assert summary.errors == summary.errors_new == 3 and summary.errors_path == str(errors)
    assert str(errors) in summary.table()
    for _ in range(2):  # reruns find the same errors and write nothing new
        summary, _ = job(inp, out)
        assert summary.errors == 3 and summary.errors_new == 0 and summary.skipped == 3
        assert errors.read_bytes() == first
        assert "3 (0 new) in" in summary.table()


def test_errors_file_created_only_when_there_is_an_error(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(inp, ["a"])
    summary, _ = job(inp, out)
    assert not (tmp_path / "out.errors.jsonl").exists() and summary.errors_path is None
    assert "errors.jsonl" not in summary.table()


def test_errors_file_after_a_torn_record(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    errors = tmp_path / "out.errors.jsonl"
    write_prompts(inp, ["a"], {0: b"{oops"})
    errors.write_bytes(b'{"line": 9, "id": nu')  # killed while writing an error record
    job(inp, out)
    lines = errors.read_bytes().splitlines()
    assert lines[0] == b'{"line": 9, "id": nu' and json.loads(lines[1])["line"] == 1


# ---- 7. infer-merge ------------------------------------------------------------------------

def test_merge_keeps_valid_lines_after_damaged_ones(tmp_path):
    inp = tmp_path / "in.jsonl"
    ids = [f"r{i}" for i in range(6)]
    write_prompts(inp, ids, {3: b"{bad input line", 4: b'{"id": "q", "prompt": "\xff"}'})
    p0, p1 = tmp_path / "p0.jsonl", tmp_path / "p1.jsonl"
    p0.write_bytes(result_line("r0") + b"\xff\xfe junk\n" + result_line("r2") + b'{"no": 1}\n'
                   + result_line("r4"))
    p1.write_bytes(result_line("r1") + b"\n" + result_line("r3") + result_line("r0")
                   + result_line("r5")[:-20])
    warnings: list[str] = []
    merged = tmp_path / "merged.jsonl"
    counts = merge_outputs([p0, p1], merged, inp, warn=warnings.append)
    assert counts == {"ids": 5, "duplicates": 1, "damaged": 4, "missing": 1}  # r5 torn
    assert output_ids(merged) == ["r0", "r1", "r2", "r3", "r4"]
    assert len(warnings) == 2 and "skipped 2 damaged" in warnings[0]
    with pytest.raises(JobError, match="does not exist"):
        merge_outputs([tmp_path / "nope.jsonl"], merged)
