"""`jaxprefill` commands: an ordinary mistake is one `error:` line on stderr and exit status 2;
`--debug` adds the traceback; an internal error shows its traceback and exits 1; Ctrl-C exits
130. Run in-process through `jaxprefill.cli.main` (one subprocess checks the real entry point)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxprefill.cli as cli
from test_gguf_reader import _layer, _write
from test_loading_errors import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(capsys) -> str:
    """stderr of the last command, which must be exactly one `error: ...` line."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_unknown_model_path(tmp_path, capsys):
    assert cli.main(["generate", "--model", str(tmp_path / "nope"), "hi"]) == 2
    assert "is neither a bundled model" in one_error_line(capsys)


def test_missing_config_files(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in one_error_line(capsys)


def test_infer_with_unknown_model(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": 1, "prompt": "hi"}) + "\n")
    argv = ["infer", "--model", str(tmp_path / "nope"), "--input", str(inp),
            "--output", str(tmp_path / "out.jsonl")]
    assert cli.main(argv) == 2
    assert "is neither a bundled model" in one_error_line(capsys)


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "-1"], "error: --temperature must be a number >= 0 (0 = greedy), got -1.0"),
    (["--top-p", "0"], "error: --top-p must be a number in (0, 1], got 0.0"),
    (["--top-k", "-2"], "error: --top-k must be an integer in [0, 2147483647] (0 = off), got -2"),
    (["--max-new-tokens", "0"], "error: --max-new-tokens must be an integer >= 1, got 0"),
    (["--stop", ""], "error: --stop must be a list of non-empty strings, got ['']"),
])
def test_generate_checks_sampling_flags_before_loading(flags, message, capsys):
    assert cli.main(["generate", *flags, "hi"]) == 2
    assert one_error_line(capsys) == message


@pytest.mark.parametrize("argv", [
    ["generate", "--sparse", "nosuch", "hi"],
    ["analyze", "--sparse", "nosuch"],
    ["eval", "--sparse", "nosuch", "--out-dir", "{tmp}"],
])
def test_unknown_sparse_policy(argv, tmp_path, capsys):
    """Rejected before the model loads, naming the flag."""
    assert cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: --sparse") and "unknown sparse policy 'nosuch'" in line


def test_unknown_eval_task_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--tasks", "nosuch"])
    assert e.value.code == 2
    assert "argument --tasks: invalid choice: 'nosuch'" in capsys.readouterr().err


def test_model_without_tokenizer(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "m")
    assert cli.main(["generate", "--model", str(ckpt), "hi"]) == 2
    assert one_error_line(capsys) == (f"error: --model {ckpt} has no tokenizer files; text "
                                      f"prompts need one")


def test_truncated_gguf(tmp_path, capsys):
    f = tmp_path / "t.gguf"
    _write(f, "llama", _layer(np.random.default_rng(0)))
    f.write_bytes(f.read_bytes()[:-64])
    assert cli.main(["generate", "--model", str(f), "hi"]) == 2
    assert one_error_line(capsys).startswith(f"error: GGUF file '{f}' is truncated")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where, tmp_path, capsys):
    args = ["--model", str(tmp_path / "nope"), "hi"]
    argv = ["--debug", "generate", *args] if where == "before" else ["generate", "--debug", *args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "FileNotFoundError" in err
    assert err.splitlines()[-1].startswith("error: ") and "neither a bundled model" in err


def test_internal_error_keeps_its_traceback(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "run_generate", broken)
    assert cli.main(["generate", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "in broken" in err
    assert err.splitlines()[-1].startswith("error: internal error (RuntimeError: boom); this is "
                                           "a bug in jaxprefill")


def test_plain_value_error_is_internal(monkeypatch, capsys):
    """A ValueError from numpy / JAX internals is not presented as the user's mistake."""
    def broken(args):
        np.zeros(3).reshape(2, 2)

    monkeypatch.setattr(cli, "run_generate", broken)
    assert cli.main(["generate", "hi"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_keyboard_interrupt(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_generate", interrupted)
    assert cli.main(["generate", "hi"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_os_errors_read_as_path_and_reason(tmp_path):
    try:
        open(tmp_path / "missing.yaml")
    except FileNotFoundError as e:
        assert cli.describe(e) == f"{tmp_path / 'missing.yaml'}: No such file or directory"
    assert cli.describe(ValueError("two\n  lines")) == "two lines"


def test_console_entry_point(tmp_path):
    """The real process: one stderr line and exit status 2."""
    proc = subprocess.run([sys.executable, "-m", "jaxprefill.cli", "generate", "--model",
                           str(tmp_path / "nope"), "hi"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr


def test_matplotlib_is_a_normal_dependency():
    """`jaxprefill analyze` and the eval report draw PNGs: a plain install brings matplotlib."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "matplotlib" in [re.split(r"[ <>=!~;\[]", d)[0] for d in project["dependencies"]]
    import matplotlib  # noqa: F401  (installed with the package's dependencies)
