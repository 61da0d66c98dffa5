"""`jaxprefill infer` around the job: file checks before the model loads, one-line errors with
exit status 2, the output lock between two processes, SIGTERM / SIGINT (fake engine)."""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxprefill.infer import cli
from jaxprefill.infer.job_lock import OutputLock, lock_path
from jaxprefill.infer.jobs import RESUME_HINT, JobInterrupted, run_job
from jobs_fake import FakeEngine, is_result_line, output_ids, write_prompts

TESTS = Path(__file__).parent
CHILD = f"""
import argparse, sys
sys.path.insert(0, {str(TESTS)!r})
from jobs_fake import FakeEngine
from jaxprefill.infer import cli
parser = argparse.ArgumentParser()
cli.register(parser.add_subparsers())
sys.exit(cli.run(parser.parse_args(sys.argv[1:]), make_engine=lambda a: FakeEngine(delay=0.2)))
"""


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def no_engine(args):
    raise AssertionError("the model must not load")


def infer(tmp_path, *extra, make_engine=no_engine):
    return cli.run(parse("infer", "--input", str(tmp_path / "in.jsonl"), "--output",
                         str(tmp_path / "out.jsonl"), *extra), make_engine=make_engine)


@pytest.mark.parametrize("has_input, setup, extra, needle", [
    (False, None, (), "input file {d}/in.jsonl does not exist"),
    (False, "in.jsonl", (), "input file {d}/in.jsonl is a directory"),
    (True, "out.jsonl", (), "output {d}/out.jsonl is a directory"),
    (True, None, ("--config", "nope.yaml"), "config file nope.yaml does not exist"),
    (True, None, ("--shard", "2/2"), "--shard must be INDEX/COUNT"),
])
def test_ordinary_mistakes_one_line_status_2_before_model_load(tmp_path, capsys, has_input,
                                                                setup, extra, needle):
    if has_input:
        write_prompts(tmp_path / "in.jsonl", ["a"])
    if setup:
        (tmp_path / setup).mkdir()
    assert infer(tmp_path, *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert needle.format(d=tmp_path) in err


def test_output_in_use_refused_before_model_load(tmp_path, capsys):
    write_prompts(tmp_path / "in.jsonl", ["a"])
    with OutputLock(tmp_path / "out.jsonl"):
        assert infer(tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"({os.getpid()}@{socket.gethostname()})" in err


def test_merge_missing_part_status_2(tmp_path, capsys):
    args = parse("infer-merge", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "m.jsonl"))
    assert cli.merge(args) == 2
    assert capsys.readouterr().err.startswith("error: part file")


def test_sigterm_second_process_refused_then_clean_stop_and_resume(tmp_path, capsys):
    """A real second process: while it runs, another job on its output is refused naming it;
    SIGTERM stops it between lines (exit 143, summary with the resume hint); a rerun finishes."""
    ids = [f"r{i}" for i in range(30)]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(inp, ids)
    child = subprocess.Popen([sys.executable, "-c", CHILD, "infer", "--input", str(inp),
                              "--output", str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_bytes().count(b"\n") >= 2):
            assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()
            time.sleep(0.05)
        assert infer(tmp_path) == 2
        assert f"({child.pid}@{socket.gethostname()})" in capsys.readouterr().err
        child.send_signal(signal.SIGTERM)
        stdout, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 143, stderr
    assert "interrupted by SIGTERM" in stdout and RESUME_HINT in stdout
    data = out.read_bytes()
    assert data.endswith(b"\n") and all(is_result_line(x) for x in data.splitlines())
    assert 2 <= len(data.splitlines()) < 30 and not lock_path(out).exists()
    assert infer(tmp_path, make_engine=lambda a: FakeEngine()) == 0
    assert sorted(output_ids(out)) == sorted(ids)


class SignalingEngine(FakeEngine):
    """Sends itself a signal after `after` results, between two output lines."""

    def __init__(self, signum: int, after: int):
        super().__init__()
        self.signum, self.after = signum, after

    def run(self, requests, on_result, on_error=None, progress=False):
        def wrapped(result):
            if len(self.completed) > self.after:
                os.kill(os.getpid(), self.signum)
            on_result(result)
        super().run(requests, wrapped, on_error, progress)


def test_sigint_stops_with_status_130_and_resume_hint(tmp_path, capsys):
    write_prompts(tmp_path / "in.jsonl", ["a", "b", "c", "d"])
    # A test run started in the background (`cmd &`) inherits SIGINT ignored, which the job
    # rightly leaves alone; this test needs SIGINT handled, as in a foreground run.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = signal.getsignal(signal.SIGINT)
        assert infer(tmp_path, make_engine=lambda a: SignalingEngine(signal.SIGINT, 2)) == 130
        assert signal.getsignal(signal.SIGINT) is before  # restored
    finally:
        signal.signal(signal.SIGINT, inherited)
    stdout = capsys.readouterr().out
    assert "interrupted by SIGINT: 2 results written" in stdout and RESUME_HINT in stdout
    assert len(output_ids(tmp_path / "out.jsonl")) == 2


def test_signal_during_a_write_waits_for_the_line(tmp_path, monkeypatch):
    """SIGTERM arriving while a result line is being written: the line completes, then the job
    stops (a guard handler catches the signal if run_job failed to install its own)."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(inp, ["a", "b", "c"])
    real_fsync, fired = os.fsync, []

    def fsync_then_signal(fd):
        real_fsync(fd)
        if not fired and os.path.realpath(f"/proc/self/fd/{fd}") == str(out.resolve()):
            fired.append(fd)
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before this returns

    guard = []

    def guard_handler(*args):
        guard.append(args)
    previous = signal.signal(signal.SIGTERM, guard_handler)
    try:
        monkeypatch.setattr(os, "fsync", fsync_then_signal)
        engine = FakeEngine()
        with pytest.raises(JobInterrupted) as info:
            run_job(engine, inp, out, progress=False)
        assert signal.getsignal(signal.SIGTERM) is guard_handler  # restored
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert fired and not guard and info.value.signum == signal.SIGTERM
    assert info.value.summary.requests == 1 and info.value.summary.interrupted == "SIGTERM"
    assert len(engine.completed) == 1 and out.read_bytes().count(b"\n") == 1
    assert is_result_line(out.read_bytes().rstrip(b"\n"))
