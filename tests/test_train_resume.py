"""Resume from damaged checkpoints, metrics without repeats, progress lines, exports that answer
text. Trainer tests share test_train's recipe, corpus and compilation cache: one uninterrupted
12-step run with checkpoints at 4, 8 and 12 is copied, damaged and resumed.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
import yaml

import jaxprefill as jp
from jaxprefill.config import ConfigError
from jaxprefill.data import ByteTokenizer
from jaxprefill.train import Trainer
from jaxprefill.train import checkpoint
from jaxprefill.train.checkpoint import Checkpointer, CheckpointError, abstract_like, captured_output
from jaxprefill.train.config import config_diff
from jaxprefill.train.metrics import MetricsLog, ProgressLine, read_jsonl
from test_train import JIT_CACHE, RUN, corpus, losses, tiny_cfg  # noqa: F401  (corpus: a fixture)

SOURCE = [*RUN, "checkpoint.keep=3"]  # keep 4, 8 and 12


def steps_in(directory) -> list[int]:
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


@pytest.fixture(scope="module")
def source(corpus, tmp_path_factory):  # noqa: F811
    """An uninterrupted run: (output dir, {step: loss})."""
    out = tmp_path_factory.mktemp("source")
    trainer = Trainer(tiny_cfg(corpus, out, *SOURCE), log_fn=lambda m: None)
    result = trainer.fit()
    trainer.close()
    assert result.step == 12 and steps_in(out / "checkpoints") == [4, 8, 12]
    return out, losses(out)


def _largest_array_file(step_dir) -> str:
    return max(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True),
               key=os.path.getsize)


def damage(step_dir, how: str) -> None:
    """The ways a checkpoint gets hurt: a lost metadata file, a lost OCDBT manifest (the one
    at state/ that names every array), a data file cut short (a full disk, an interrupted copy),
    the data iterator's JSON garbled."""
    if how == "metadata":
        os.remove(os.path.join(step_dir, "state", "_METADATA"))
    elif how == "manifest":
        os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))
    elif how == "truncate":
        path = _largest_array_file(step_dir)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "json":
        with open(os.path.join(step_dir, "data", "metadata"), "w") as f:
            f.write('{"next_index": ')
    else:
        raise ValueError(how)


# (damage to step 12, damage to step 8, the step the run must resume from)
CASES = {"metadata": (["metadata"], [], 8),
         "manifest": (["manifest"], [], 8),
         "truncate+json": (["truncate"], ["json"], 4)}


# A failed restore's stray callbacks surface as unraisable exceptions: they must not escape.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_resume_skips_damaged_checkpoints(corpus, source, tmp_path, capfd, case):  # noqa: F811
    src, ref = source
    run = tmp_path / "run"
    shutil.copytree(src, run)
    damage12, damage8, expect = CASES[case]
    for how in damage12:
        damage(run / "checkpoints" / "12", how)
    for how in damage8:
        damage(run / "checkpoints" / "8", how)
    damaged = [12] + ([8] if damage8 else [])
    capfd.readouterr()

    messages: list[str] = []
    trainer = Trainer(tiny_cfg(corpus, run, *SOURCE, "log.progress=true", "log.progress_every=2"),
                      log_fn=messages.append)
    err = capfd.readouterr().err
    assert trainer.resumed_from == expect, messages
    for step in damaged:  # one line per damaged checkpoint, naming it; set aside, not deleted
        (line,) = [m for m in messages if f"checkpoint step {step} in {run / 'checkpoints'} is damaged" in m]
        assert "\n" not in line and str(run / "checkpoints.damaged" / str(step)) in line
        assert os.path.isdir(run / "checkpoints.damaged" / str(step))
        assert os.path.getsize(run / "checkpoints.damaged" / f"{step}.txt") > 0  # the details
    assert any(f"resumed from checkpoint step {expect}" in m for m in messages)
    assert not any("config differs" in m for m in messages), messages  # same recipe: no warning
    assert "Traceback" not in err and len(err.splitlines()) < 5, err  # tensorstore noise kept off

    result = trainer.fit()
    trainer.close()
    err = capfd.readouterr().err
    assert (result.status, result.step) == ("finished", 12)
    assert "Traceback" not in err and "Event loop is closed" not in err, err
    # Replayed steps: the same losses as the uninterrupted run, bitwise.
    got = losses(run)
    assert all(got[s] == ref[s] for s in range(expect + 1, 13)), (got, ref)
    # One training record per step, in order, although steps after `expect` ran twice.
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    assert [r["step"] for r in records if r.get("event") == "resume"] == [expect]
    # Progress lines off a terminal (pytest's stderr is not one): every 2 steps and the last.
    progress = [m for m in messages if re.match(r"step \d+/12 \(", m)]
    assert [int(m.split()[1].split("/")[0]) for m in progress] == list(range(expect + 2, 13, 2))
    assert all("%): loss " in m for m in progress)
    assert all("tokens/s" in m and "ETA " in m for m in progress[1:]), progress
    assert progress[-1].endswith("ETA 0:00:00")
    # The resumed run's own step 12 is saved (the damaged one was moved out of its way).
    assert 12 in steps_in(run / "checkpoints")


def test_preempted_between_log_steps_keeps_its_records(corpus, source, tmp_path):  # noqa: F811
    """Records still pending when a run stops between `log.every` steps are written, not lost."""
    src, ref = source
    run = tmp_path / "run"
    shutil.copytree(src, run)
    shutil.rmtree(run / "checkpoints" / "12")  # resume from 8

    def preempt(trainer, step):
        if step == 11:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer = Trainer(tiny_cfg(corpus, run, *SOURCE, "log.every=10"), log_fn=lambda m: None)
    result = trainer.fit(callback=preempt)
    trainer.close()
    assert (result.status, result.step) == ("preempted", 11)
    got = losses(run)
    assert sorted(got) == list(range(1, 12)) and all(got[s] == ref[s] for s in got)


def test_damaged_resume_prints_one_line_each(corpus, source, tmp_path):  # noqa: F811
    """The command line's view, in a fresh process (nothing intercepts stderr or unraisable
    exceptions; finalizers run at exit): two damaged checkpoints give two warning lines, then the
    resume line, and nothing else (no tracebacks, no tensorstore output)."""
    src, _ = source
    run = tmp_path / "run"
    shutil.copytree(src, run)
    damage(run / "checkpoints" / "12", "manifest")
    damage(run / "checkpoints" / "8", "truncate")
    cfg = tiny_cfg(corpus, run, *SOURCE)
    with open(tmp_path / "run.yaml", "w") as f:
        yaml.safe_dump(cfg.to_dict(), f)
    script = ("import sys; from jaxprefill.train import TrainConfig, Trainer; "
              "Trainer(TrainConfig.load(sys.argv[1])).close()")
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": JIT_CACHE,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run.yaml")], env=env,
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 0, proc.stderr
    assert [line.split(" in ")[0] for line in lines[:3]] == [
        "[train] warning: checkpoint step 12", "[train] warning: checkpoint step 8",
        "[train] resumed from checkpoint step 4"], proc.stderr
    assert len(lines) == 4 and lines[3].startswith("[train] metrics.jsonl: dropped"), proc.stderr


# ---- Checkpointer on a tiny pytree (no model, no compile) -----------------------------------------

MODEL = {"model_type": "llama", "eos_token_ids": (2,), "rope": {"theta": 10000.0}}


def _shardings(state):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: device, state)


def _tiny_checkpoints(tmp_path, steps=(1, 2, 3)):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=5, async_save=False)
    state = {"w": np.arange(64, dtype=np.float32).reshape(8, 8), "step": np.int32(0)}
    for s in steps:
        ckpt.save(s, {**state, "step": np.int32(s)}, {"i": s}, {"model": MODEL})
    ckpt.wait()
    return ckpt, state


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_none_restores_is_one_error_naming_the_directory(tmp_path, capfd):
    ckpt, state = _tiny_checkpoints(tmp_path)
    for step, how in ((3, "manifest"), (2, "truncate"), (1, "json")):
        damage(os.path.join(ckpt.directory, str(step)), how)
    warnings: list[str] = []
    with pytest.raises(CheckpointError, match=re.escape(f"no checkpoint in {ckpt.directory} restores")) as e:
        ckpt.restore_newest(abstract_like(state, _shardings(state)), model_config=MODEL,
                            warn=warnings.append)
    assert isinstance(e.value, ConfigError)  # the command line reports it in one line
    assert [w.split()[3] for w in warnings] == ["3", "2", "1"]
    assert "missing state/manifest.ocdbt" in warnings[0]
    assert sorted(os.listdir(ckpt.damaged_directory)) == ["1", "1.txt", "2", "2.txt", "3", "3.txt"]
    assert ckpt.all_steps() == []
    err = capfd.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) < 5, err
    # Everything tensorstore said is kept beside the damaged checkpoint.
    assert "NOT_FOUND" in open(os.path.join(ckpt.damaged_directory, "3.txt")).read()
    ckpt.close()


def test_resumed_twice_damaged_again_keeps_both_copies(tmp_path):
    ckpt, state = _tiny_checkpoints(tmp_path, steps=(1,))
    damage(os.path.join(ckpt.directory, "1"), "manifest")
    with pytest.raises(CheckpointError):
        ckpt.restore_newest(abstract_like(state, _shardings(state)), model_config=MODEL, warn=lambda m: None)
    ckpt.save(1, state, {"i": 1}, {"model": MODEL})
    ckpt.wait()
    damage(os.path.join(ckpt.directory, "1"), "manifest")
    with pytest.raises(CheckpointError):
        ckpt.restore_newest(abstract_like(state, _shardings(state)), model_config=MODEL, warn=lambda m: None)
    ckpt.close()
    assert sorted(os.listdir(ckpt.damaged_directory)) == ["1", "1.1", "1.1.txt", "1.txt"]


class _RaisesOnDel:
    def __del__(self):
        raise RuntimeError("from a finalizer")


def test_captured_output_takes_every_channel(capfd):
    """fd 2 (tensorstore's C++ logging), sys.stderr, logging and unraisable exceptions."""
    with captured_output() as captured:
        os.write(2, b"native line\n")
        print("python line", file=sys.stderr)
        logging.getLogger("orbax-test").error("logged line")
        obj = _RaisesOnDel()
        del obj
    assert capfd.readouterr().err == ""
    for text in ("native line", "python line", "logged line", "from a finalizer"):
        assert text in captured.text, captured.text
    print("after", file=sys.stderr)
    assert capfd.readouterr().err == "after\n"


def test_stray_restore_errors_are_diverted(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    monkeypatch.setattr(checkpoint, "_stray_log", [str(tmp_path / "12.txt")])
    checkpoint._divert_stray_restore_errors()
    checkpoint._divert_stray_restore_errors()  # installed once

    def unraisable(exc, obj=None):
        return types.SimpleNamespace(exc_value=exc, exc_traceback=None, object=obj)

    namespace: dict = {}
    exec(compile("async def read(): pass", os.path.join("site-packages", "orbax", "x.py"), "exec"), namespace)
    coroutine = namespace["read"]()
    sys.unraisablehook(unraisable(RuntimeError("Event loop is closed")))
    sys.unraisablehook(unraisable(Exception("Encountered error while reading array"), coroutine))
    coroutine.close()
    other = unraisable(RuntimeError("something else"))
    sys.unraisablehook(other)
    assert seen == [other]
    log = (tmp_path / "12.txt").read_text()
    assert "Event loop is closed" in log and "Encountered error while reading array" in log


def test_intact_checkpoint_restores_exactly(tmp_path):
    ckpt, state = _tiny_checkpoints(tmp_path)
    restored = ckpt.restore_newest(abstract_like(state, _shardings(state)), model_config=MODEL,
                                   warn=pytest.fail)
    assert restored.step == 3 and int(restored.state["step"]) == 3 and restored.data_state == {"i": 3}
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), state["w"])
    assert config_diff(restored.meta["model"], MODEL) == []  # JSON lists vs tuples: equal
    ckpt.close()
    empty = Checkpointer(str(tmp_path / "none"), keep=2, async_save=False)
    assert empty.restore_newest(abstract_like(state, _shardings(state)), model_config=MODEL,
                                warn=pytest.fail) is None
    empty.close()


def test_changed_model_config_is_refused_not_set_aside(tmp_path):
    ckpt, state = _tiny_checkpoints(tmp_path)
    bigger = {**state, "w": np.zeros((16, 8), np.float32)}  # a recipe with another shape
    with pytest.raises(ConfigError, match=r"another model config \(hidden_size: unset -> 16\)"):
        ckpt.restore_newest(abstract_like(bigger, _shardings(bigger)),
                            model_config={**MODEL, "hidden_size": 16}, warn=pytest.fail)
    assert ckpt.all_steps() == [1, 2, 3] and not os.path.exists(ckpt.damaged_directory)
    ckpt.close()


def test_unreadable_is_not_damage(tmp_path, monkeypatch):
    ckpt, state = _tiny_checkpoints(tmp_path)

    def denied(step, abstract_state):
        try:
            raise ValueError('PERMISSION_DENIED: Error opening "state/manifest.ocdbt"')
        except ValueError as e:
            raise RuntimeError("Encountered error while reading array index") from e

    monkeypatch.setattr(ckpt, "restore", denied)
    with pytest.raises(CheckpointError, match="step 3 .* could not be read .*PERMISSION_DENIED.*nothing was moved"):
        ckpt.restore_newest(abstract_like(state, _shardings(state)), model_config=MODEL, warn=pytest.fail)
    assert ckpt.all_steps() == [1, 2, 3] and not os.path.exists(ckpt.damaged_directory)
    ckpt.close()


def test_config_diff_compares_values():
    assert config_diff({"a": [1, 2], "r": {"t": 1.0}}, {"a": (1, 2), "r": {"t": 1.0}}) == []
    assert config_diff({"a": [1, 2], "r": {"t": 1.0}, "x": 1}, {"a": (1, 3), "r": {"t": 2.0}}) == [
        "a: [1, 2] -> [1, 3]", "r.t: 1.0 -> 2.0", "x: 1 -> unset"]


# ---- metrics and progress -----------------------------------------------------------------------

def test_metrics_drop_after_keeps_one_record_per_step(tmp_path):
    log = MetricsLog(str(tmp_path), tensorboard=False)
    for s in range(1, 6):
        log.write({"step": s, "loss": float(s)})
    log.write({"step": 5, "val_loss": 1.0})
    with open(log.path, "a") as f:
        f.write('{"step": 6, "lo')  # a killed run's torn last line
    assert log.drop_after(3) == (3, 1)
    assert read_jsonl(log.path) == [{"step": s, "loss": float(s)} for s in (1, 2, 3)]
    assert log.drop_after(3) == (0, 0)
    log.write({"step": 4, "loss": 4.5})
    assert [r["step"] for r in read_jsonl(log.path)] == [1, 2, 3, 4]


def test_metrics_of_an_earlier_run_are_set_aside(tmp_path):
    """A run that starts from scratch in a used output_dir (no checkpoint restored) keeps the
    earlier run's records, in a file of their own."""
    log = MetricsLog(str(tmp_path), tensorboard=False)
    assert log.set_aside() is None
    log.write({"step": 1, "loss": 1.0})
    assert log.set_aside() == str(tmp_path / "metrics.1.jsonl")
    log.write({"step": 1, "loss": 2.0})
    assert log.set_aside() == str(tmp_path / "metrics.2.jsonl")
    assert read_jsonl(tmp_path / "metrics.1.jsonl") == [{"step": 1, "loss": 1.0}]
    assert not os.path.exists(log.path)


def test_progress_line_format(monkeypatch):
    clock = iter([100.0, 102.0])
    monkeypatch.setattr("jaxprefill.train.metrics.time.perf_counter", lambda: next(clock))
    lines: list[str] = []
    p = ProgressLine(lines.append, total=60, every=20, tokens_per_step=1000)
    p.start(1)
    assert not p.due(19) and p.due(20) and p.due(60)
    assert p.log(21, 2.5) == "step 21/60 (35%): loss 2.5000, 10,000 tokens/s, ETA 0:00:04"
    assert lines == ["step 21/60 (35%): loss 2.5000, 10,000 tokens/s, ETA 0:00:04"]


# ---- export ---------------------------------------------------------------------------------------

def test_export_answers_text_prompts(corpus, source, tmp_path):  # noqa: F811
    src, _ = source
    run = tmp_path / "run"
    shutil.copytree(src, run)
    messages: list[str] = []
    trainer = Trainer(tiny_cfg(corpus, run, *SOURCE), log_fn=messages.append)
    assert trainer.resumed_from == 12
    out = trainer.export(str(tmp_path / "export"))
    trainer.tokenizer = None  # a run without a tokenizer (synthetic tokens) says so at export
    bare = trainer.export(str(tmp_path / "bare"))
    trainer.close()
    assert not any(m.startswith("export:") for m in messages[:-1])
    assert messages[-1].startswith("export: this run has no tokenizer") and "\n" not in messages[-1]
    assert not os.path.exists(os.path.join(bare, "tokenizer.json"))
    assert jp.load(bare)[1] is None

    model, tokenizer = jp.load(out)
    assert tokenizer is not None and tokenizer.eos_token_ids == (ByteTokenizer.eos_id,)
    text = "def f(x):\n    return 'é€'"
    assert tokenizer.encode(text) == ByteTokenizer().encode(text).tolist()  # the training ids
    assert tokenizer.decode(tokenizer.encode(text) + [ByteTokenizer.eos_id]) == text
    outs = jp.generate(model, tokenizer, ["hi"], max_new_tokens=2)
    assert len(outs) == 1 and isinstance(outs[0].text, str) and outs.stats.generated_tokens >= 1


def test_stray_restore_reports_are_diverted(tmp_path, monkeypatch):
    """asyncio's "... exception was never retrieved" reports of a failed restore's leftovers
    (a Task naming orbax, or a bare Future holding tensorstore's read error) go to the damaged
    checkpoint's .txt file; other asyncio reports pass through."""

    from jaxprefill.train import checkpoint as ck

    log = tmp_path / "12.txt"
    monkeypatch.setattr(ck, "_stray_log", [str(log)])
    filt = ck._StrayTaskErrors()

    def record(msg, exc=None):
        info = (type(exc), exc, None) if exc is not None else None
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, info)

    err = ValueError('OUT_OF_RANGE: Error reading "w/0.0" in OCDBT database at local file "x"')
    future = record("Future exception was never retrieved\nfuture: <Future finished "
                    f"exception={err!r}>", err)
    task = record("Task exception was never retrieved\nfuture: <Task finished coro=<f() "
                  f"done, defined at {os.sep}site{os.sep}orbax{os.sep}a.py:1>>")
    other = record("Future exception was never retrieved", KeyError("unrelated"))
    assert filt.filter(future) is False and filt.filter(task) is False
    assert filt.filter(other) is True
    text = log.read_text()
    assert text.count("---- after the restore ----") == 2 and "OCDBT" in text
