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


@pytest.mark.parametrize("spec,message", [
    ("xattention:nope=1", "unknown parameter(s) ['nope'] for sparse policy 'xattention'"),
    ("xattention:threshold=abc", "xattention: threshold must be a number, got str 'abc'"),
    ("xattention:threshold=2", "xattention: threshold must be in (0, 1]"),
    ("xattention:stride=0", "xattention: stride must be >= 1, got 0"),
    ("flexprefill:gamma", "expected key=value, got 'gamma'"),
])
@pytest.mark.parametrize("command", ["generate", "eval", "infer"])
def test_bad_sparse_spec(command, spec, message, tmp_path, capsys):
    """Every command reads name:key=value,... alike; a bad parameter is one line naming it,
    before the model loads (before it was a TypeError deep in jit, or a run with threshold 2)."""
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 1, "prompt": "hi"}) + "\n")
    argv = {"generate": ["generate", "--sparse", spec, "hi"],
            "eval": ["eval", "--sparse", spec, "--out-dir", str(tmp_path / "ev")],
            "infer": ["infer", "--sparse", spec, "--input", str(tmp_path / "in.jsonl"),
                      "--output", str(tmp_path / "out.jsonl")]}[command]
    assert cli.main(argv) == 2
    line = one_error_line(capsys)
    assert message in line, line
    assert line.startswith("error: engine config: sparse: " if command == "infer"
                           else "error: --sparse"), line


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_sparse_yaml_syntax_error(command, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: xattention\nparams: [\n")
    argv = ["generate", "--sparse", str(bad), "hi"] if command == "generate" else \
        ["eval", "--sparse", str(bad), "--out-dir", str(tmp_path / "ev")]
    assert cli.main(argv) == 2
    assert one_error_line(capsys) == (f"error: --sparse: {bad}: not valid YAML: expected the node "
                                      f"content, but found '<stream end>' (line 3, column 1)")


@pytest.mark.parametrize("prompts,message", [
    ([""], "error: the prompt is empty: give the text to answer or complete"),
    (["hi", "  "], "error: prompt 2 is empty: give the text to answer or complete"),
])
def test_generate_rejects_an_empty_prompt_before_loading(prompts, message, capsys):
    assert cli.main(["generate", "--no-chat", *prompts]) == 2
    assert one_error_line(capsys) == message


@pytest.mark.parametrize("argv,message", [
    (["analyze", "--sparse", "streaming", "--rows", "0"], "error: --rows must be >= 1, got 0"),
    (["analyze", "--sparse", "streaming", "--length", "0"], "error: --length must be >= 1, got 0"),
    (["analyze", "--sparse", "streaming", "--out-dir", "{file}"],
     "error: --out-dir {file} is a file; give a directory"),
    (["eval", "--out-dir", "{file}"], "error: --out-dir {file} is a file; give a directory"),
    (["eval", "--override", "max_position_embeddings=abc", "--out-dir", "{tmp}"],
     "error: --override: max_position_embeddings must be a positive integer, got 'abc'"),
    (["eval", "--override", "rope_theta=-1", "--out-dir", "{tmp}"],
     "error: --override: rope_theta must be a positive number, got -1"),
    (["eval", "--override", "nosuch=1", "--out-dir", "{tmp}"],
     "error: --override: cannot override ['nosuch']; overridable: ['max_position_embeddings', "
     "'rope_theta', 'rope_scaling']"),
])
def test_analyze_and_eval_flags_checked_before_loading(argv, message, tmp_path, capsys):
    file = tmp_path / "a-file"
    file.write_text("x")
    fill = lambda a: a.replace("{file}", str(file)).replace("{tmp}", str(tmp_path))  # noqa: E731
    assert cli.main([fill(a) for a in argv]) == 2
    assert one_error_line(capsys) == fill(message)


def test_a_file_where_a_directory_is_made_is_a_user_error(monkeypatch, tmp_path, capsys):
    """FileExistsError (mkdir of an output directory over a file) is the user's path mistake."""
    def run(args):
        (tmp_path / "f").write_text("x")
        (tmp_path / "f").mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(cli, "run_generate", run)
    assert cli.main(["generate", "hi"]) == 2
    assert one_error_line(capsys) == f"error: {tmp_path / 'f'}: File exists"


TRAIN_YAML = """output_dir: {out}
steps: 2
batch_size: 2
model: {{config: tiny-llama, dtype: float32, attention: xla}}
data: {{format: synthetic, seq_len: 16}}
"""


@pytest.mark.parametrize("yaml_text,overrides,message", [
    ("steps: [1\n  bad: : yaml\n", [],
     "error: {cfg}: not valid YAML: expected ',' or ']', but got ':' (line 2, column 6)"),
    (TRAIN_YAML, ["steps=[1"],
     "error: override 'steps=[1': the value is not valid YAML (expected ',' or ']', but got "
     "'<stream end>' (line 1, column 3))"),
    (TRAIN_YAML, ["optim.lr=.nan"], "error: optim.lr: expected a finite number, got nan"),
    (TRAIN_YAML, ["optim.lr=.inf"], "error: optim.lr: expected a finite number, got inf"),
    (TRAIN_YAML, ["steps=two"], "error: steps: expected an integer, got 'two'"),
    (TRAIN_YAML, ["batch_size=0"], "error: batch_size must be a positive integer, got 0"),
    (TRAIN_YAML, ["stepz=3"], "error: unknown key(s) ['stepz']; known keys in the top level: "),
    (None, [], "error: {cfg}: No such file or directory"),
])
def test_train_config_mistakes(yaml_text, overrides, message, tmp_path, capsys):
    """Checked before any model is built; YAML syntax errors were tracebacks."""
    cfg = tmp_path / "recipe.yaml"
    if yaml_text is not None:
        cfg.write_text(yaml_text.format(out=tmp_path / "run"))
    assert cli.main(["train", "--config", str(cfg), *overrides]) == 2
    assert one_error_line(capsys).startswith(message.format(cfg=cfg))


def test_train_unknown_tokenizer(tmp_path, capsys):
    """data.tokenizer that names nothing: a ConfigError line, not an internal error."""
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(TRAIN_YAML.format(out=tmp_path / "run"))
    argv = ["train", "--config", str(cfg), "data.format=jsonl", "data.tokenizer=nosuch",
            f"data.train=[{tmp_path / 'docs.jsonl'}]", "checkpoint.enabled=false",
            "log.tensorboard=false"]
    assert cli.main(argv) == 2
    assert one_error_line(capsys).startswith("error: data.tokenizer: 'nosuch' is not 'byte', ")


def test_train_line_that_is_not_json(tmp_path, capsys):
    """A damaged line of a training JSONL file: one line naming the file and the byte."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("{not json\n" + json.dumps({"text": "hello " * 20}) + "\n")
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(TRAIN_YAML.format(out=tmp_path / "run"))
    argv = ["train", "--config", str(cfg), "data.format=jsonl", "data.tokenizer=byte",
            f"data.train=[{docs}]", "checkpoint.enabled=false", "log.tensorboard=false"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err  # the trainer's progress lines, then one error line
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith(f"error: {docs}: line at byte 0 is not a JSON object")


@pytest.mark.parametrize("yaml_text,message", [
    ("engine: [\n", "error: {cfg}: not valid YAML: expected the node content, but found "
                    "'<stream end>' (line 2, column 1)"),
    ("engine: {temperature: abc}\n",
     "error: engine config: temperature must be a number >= 0 (0 = greedy), got 'abc'"),
    ("engine: {chat: maybe}\n", "error: engine config: chat must be true or false, got 'maybe'"),
    ("engine: {max_seq_len: 0}\n",
     "error: engine config: max_seq_len must be a positive integer or null, got 0"),
    ("engine: 3\n", "error: infer config: engine must be a mapping of engine settings, got 3"),
    ("model: 5\n", "error: infer config: model must be a string, got 5"),
])
def test_infer_config_mistakes(yaml_text, message, tmp_path, capsys):
    """Refused before the model loads (a string temperature was a TypeError in the engine, a
    string chat flag silently true)."""
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml_text)
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 1, "prompt": "hi"}) + "\n")
    argv = ["infer", "--config", str(cfg), "--input", str(tmp_path / "in.jsonl"), "--output",
            str(tmp_path / "out.jsonl")]
    assert cli.main(argv) == 2
    assert one_error_line(capsys) == message.format(cfg=cfg)


def test_longctx_data_builder_paths(tmp_path, capsys):
    """No chosen source folder, or an --out that cannot be made: usage errors at once, not an
    empty build or a traceback at the end."""
    from scripts.tools import build_longctx_data as b

    (tmp_path / "f").write_text("x")
    cases = [(["--sources", "man", "--man", str(tmp_path / "nope")],
              f"error: no source folder exists: --man {tmp_path / 'nope'}"),
             (["--sources", "stdlib", "docstrings", "--stdlib", str(tmp_path / "nope")],
              f"error: no source folder exists: --stdlib {tmp_path / 'nope'}"),
             (["--out", str(tmp_path / "f" / "sub")],
              f"error: --out {tmp_path / 'f' / 'sub'}: cannot make a folder in {tmp_path / 'f'}")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            b.parse_args(argv)
        assert e.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].endswith(message)


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
