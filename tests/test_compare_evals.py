"""scripts/accuracy/compare_evals.py: several eval runs in one table, on hand-written runs."""

from __future__ import annotations

import json

import pytest

from jaxprefill.eval.stats import paired_difference, wilson
from scripts.accuracy import compare_evals


def write_run(path, answers: dict, run: dict, extra: list[dict] = ()) -> None:
    """answers: {(task, length): [correct, ...]} -> path/answers.jsonl (dense + one sparse
    config) and path/run.json."""
    path.mkdir()
    lines = []
    for (task, length), outcomes in answers.items():
        for i, c in enumerate(outcomes):
            rec = {"prompt_id": f"test/{task}/{length}/{i:04d}", "task": task, "length": length,
                   "config": "dense", "correct": bool(c), "score": float(c),
                   "prompt_sha": f"{task}{length}{i}"}
            lines += [rec, {**rec, "config": "flex", "correct": False, "score": 0.0}]
    lines += list(extra)
    (path / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (path / "run.json").write_text(json.dumps(run))


@pytest.fixture
def runs(tmp_path):
    base = tmp_path / "base"
    write_run(base, {("passkey", 512): [1, 1, 1, 0], ("passkey", 1024): [1, 0, 0, 0],
                     ("qa", 512): [1, 0]},
              {"model": "smollm2", "adapter": None, "overrides": {}, "dtype": "float32",
               "split": "test"})
    lora = tmp_path / "lora"
    # No 1024 answers; passkey/512 sample 1 answered twice (the later record wins).
    write_run(lora, {("passkey", 512): [1, 0, 1, 1], ("qa", 512): [1, 1]},
              {"model": "smollm2", "adapter": "runs/lora", "overrides": {"rope_theta": 1e6},
               "dtype": "float32", "split": "test"},
              extra=[{"prompt_id": "test/passkey/512/0001", "task": "passkey", "length": 512,
                      "config": "dense", "correct": True, "score": 1.0,
                      "prompt_sha": "other"}])
    return base, lora


def test_one_table_paired_against_the_first_run(runs, tmp_path, capsys):
    base, lora = runs
    out = tmp_path / "cmp" / "compare.md"
    assert compare_evals.main(["--run", f"base={base}", f"lora={lora}", "--out", str(out)]) == 0
    md = out.read_text()
    lo, hi = wilson(3, 4)
    assert f"| passkey | base | 3/4 0.75 [{lo:.2f}, {hi:.2f}] | 1/4 0.25 [" in md
    # lora: sample 1 of passkey/512 now correct -> 4/4; it has no 1024 answers.
    assert "| passkey | lora | 4/4 1.00 [0.51, 1.00] | - | 4/4 1.00 [0.51, 1.00] |" in md
    assert "| all | lora | 6/6 1.00 [0.61, 1.00] | - | 6/6" in md
    assert "| all | base | 4/6 0.67 [" in md and "| 5/10 0.50 [" in md
    # Paired on the shared prompt ids only: passkey/512 (+1/-0) and qa/512 (+1/-0).
    d = paired_difference([True] * 4, [True, True, True, False])
    assert (f"| passkey | lora | {d.diff:+.2f} [{d.low:+.2f}, {d.high:+.2f}] (+1/-0, p=1) | - | "
            in md)
    assert "| all | lora | +0.33 [" in md and "(+2/-0, p=0.5) | - | +0.33" in md
    assert "| base |" not in md.split("## Each run minus base")[1]
    assert "Pairs whose prompt tokens differ" in md and "lora 1" in md
    assert '{"rope_theta": 1000000.0}' in md and "runs/lora" in md
    data = json.loads(out.with_suffix(".json").read_text())
    acc = {(r["run"], r["task"], r["length"]): r for r in data["accuracy"]}
    assert acc[("lora", "qa", 512)]["correct"] == 2 and ("lora", "passkey", 1024) not in acc
    assert acc[("base", "all", "all")]["n"] == 10
    pair = {(r["run"], r["task"], r["length"]): r for r in data["paired"]}
    assert pair[("lora", "all", "all")]["n"] == 6 and pair[("lora", "all", "all")]["only_a"] == 2
    assert data["prompt_mismatch"] == {"lora": 1}
    assert out.with_suffix(".png").stat().st_size > 5000
    # Another config of the same runs: the sparse answers, all wrong.
    assert compare_evals.main(["--run", f"base={base}", f"lora={lora}", "--config", "flex",
                               "--out", str(out)]) == 0
    assert "| passkey | base | 0/4 0.00 [" in out.read_text()


@pytest.mark.parametrize("args,message", [
    (["--run", "base={tmp}/nope"], "error: --run base={tmp}/nope: no such directory"),
    (["--run", "{tmp}/base"], "error: --run '{tmp}/base': expected LABEL=DIR"),
    (["--run", "a={tmp}/base", "a={tmp}/lora"], "error: --run: labels used twice: a"),
    (["--run", "a={tmp}/base", "--config", "nope"],
     "error: {tmp}/base/answers.jsonl: no answers of config 'nope' (it has dense, flex)"),
    (["--run", "a={tmp}/empty"], "error: --run a={tmp}/empty: no answers.jsonl"),
])
def test_ordinary_mistakes_are_one_line(args, message, runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--out", str(tmp_path / "c.md")]
    assert compare_evals.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message.replace("{tmp}", str(tmp_path))), err
    assert not (tmp_path / "c.md").exists()
