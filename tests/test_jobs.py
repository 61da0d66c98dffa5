"""Resumable JSONL jobs: malformed input, crash + rerun gives each id exactly once, CLI."""

import json
import subprocess
import sys

import pytest
from flax import nnx

import jaxprefill as jp
from jaxprefill.infer import Engine, EngineConfig
from jaxprefill.infer.job_files import repair_output
from jaxprefill.infer.jobs import merge_outputs, parse_line, run_job
from jaxprefill.loading.gguf_reader import bundled_gguf_path
from jaxprefill.loading.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def engine():
    """A tiny random model with the real SmolLM2 tokenizer: fast to compile, real text I/O."""
    tok = Tokenizer.from_gguf(bundled_gguf_path())
    cfg = jp.ModelConfig(model_type="llama", vocab_size=49152, hidden_size=32, intermediate_size=64,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                         max_position_embeddings=512, tie_word_embeddings=True)
    model = jp.Llama(cfg, rngs=nnx.Rngs(0))
    return Engine(model, tok, EngineConfig(max_batch=3, prefill_tokens=64, prefill_rows=2,
                                           page_size=16, num_pages=64, max_new_tokens=5,
                                           bucket=256))


def write_input(path, n=8, extra=()):
    lines = [json.dumps({"id": f"r{i}", "prompt": f"Question {i}: " + "why? " * (i * 7)})
             for i in range(n)]
    lines += list(extra)
    path.write_text("\n".join(lines) + "\n")


def read_output(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_parse_line_errors():
    good = parse_line('{"id": 3, "messages": [{"role": "user", "content": "hi"}], "top_k": 5}', 1)
    assert good.id == "3" and good.top_k == 5
    for line, needle in [("{oops", "not valid JSON"), ("[1]", "JSON object"),
                         ('{"prompt": "x"}', "'id'"), ('{"id": 1}', "exactly one"),
                         ('{"id": 1, "prompt": "x", "messages": []}', "exactly one"),
                         ('{"id": 1, "prompt": 5}', "must be a string"),
                         ('{"id": 1, "messages": [{"role": "user"}]}', "messages"),
                         ('{"id": 1, "prompt": "x", "temprature": 1}', "unknown field"),
                         ('{"id": 1, "prompt": "x", "max_new_tokens": "9"}',
                          "max_new_tokens must be an integer"),
                         ('{"id": 1.5, "prompt": "x"}', "'id' must be a string or an integer"),
                         ('{"id": true, "prompt": "x"}', "'id' must be a string or an integer"),
                         ('{"id": 1, "prompt": "x", "temperature": -1}', "temperature must be"),
                         ('{"id": 1, "prompt": "x", "stop": [1]}', "stop must be")]:
        with pytest.raises(ValueError, match=needle):
            parse_line(line, 7)


def test_job_errors_go_to_errors_file_and_job_continues(engine, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    long_prompt = json.dumps({"id": "long", "prompt": "word " * 3000})
    write_input(inp, n=4, extra=["{not json", long_prompt, json.dumps({"id": "r1", "prompt": "dup"})])
    summary = run_job(engine, inp, out, progress=False)
    rows = read_output(out)
    assert sorted(r["id"] for r in rows) == ["r0", "r1", "r2", "r3"]
    assert all({"text", "prompt_tokens", "completion_tokens", "finish_reason", "ttft_s",
                "decode_tok_s"} <= set(r) for r in rows)
    errors = read_output(tmp_path / "out.errors.jsonl")
    reasons = " | ".join(e["error"] for e in errors)
    assert len(errors) == 3 and "not valid JSON" in reasons and "duplicate id" in reasons
    assert "limit is 512" in reasons
    assert [e["line"] for e in errors] == [5, 7, 6]  # the engine's rejection has its line too
    assert summary.requests == 4 and summary.errors == 3
    assert "TTFT" in summary.table() and str(tmp_path / "out.errors.jsonl") in summary.table()


def test_crash_and_rerun_yields_each_id_exactly_once(engine, tmp_path, monkeypatch):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, n=9)
    real_run = engine.run

    def crashing_run(requests, on_result, **kw):
        count = {"n": 0}

        def wrapped(result):
            on_result(result)
            count["n"] += 1
            if count["n"] == 4:
                raise KeyboardInterrupt  # preempted mid-job
        return real_run(requests, wrapped, **kw)

    monkeypatch.setattr(engine, "run", crashing_run)
    with pytest.raises(KeyboardInterrupt):
        run_job(engine, inp, out, progress=False)
    monkeypatch.setattr(engine, "run", real_run)
    assert len(read_output(out)) == 4
    with open(out, "a") as f:  # a torn line, as if killed mid-write
        f.write('{"id": "r8", "te')
    assert len(repair_output(out, warn=[].append).ids) == 4  # torn line cut off
    summary = run_job(engine, inp, out, progress=False)
    ids = [r["id"] for r in read_output(out)]
    assert sorted(ids) == [f"r{i}" for i in range(9)]  # each exactly once
    assert summary.skipped == 4 and summary.requests == 5
    assert run_job(engine, inp, out, progress=False).requests == 0  # nothing left to do


def test_cli_infer(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"id": "paris", "prompt": "What is the capital of France?",
                               "max_new_tokens": 12}) + "\n{bad\n")
    cfg = tmp_path / "job.yaml"
    cfg.write_text("model: smollm2-135m-instruct\nengine:\n  max_batch: 2\n  prefill_tokens: 128\n"
                   "  num_pages: 32\n  bucket: 256\n")
    proc = subprocess.run([sys.executable, "-m", "jaxprefill.cli", "infer", "--config", str(cfg),
                           "--input", str(inp), "--output", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = read_output(out)
    assert row["id"] == "paris" and "Paris" in row["text"]
    assert "requests completed" in proc.stdout and str(tmp_path / "out.errors.jsonl") in proc.stdout
    (err,) = read_output(tmp_path / "out.errors.jsonl")
    assert err["line"] == 2 and "not valid JSON" in err["error"]


def test_sharded_hosts_then_merge(engine, tmp_path):
    """Two 'hosts' each run their shard; the merge has every id once, in input order, and
    drops a torn last line and a duplicate."""
    inp = tmp_path / "in.jsonl"
    write_input(inp, n=7)
    parts = [tmp_path / f"out.{i}.jsonl" for i in range(2)]
    for i, part in enumerate(parts):
        run_job(engine, inp, part, shard=(i, 2), progress=False)
    ids = [[r["id"] for r in read_output(p)] for p in parts]
    assert sorted(ids[0]) == [f"r{i}" for i in (0, 2, 4, 6)] and sorted(ids[1]) == ["r1", "r3", "r5"]
    with open(parts[1], "a") as f:  # host 1 re-wrote one id, then crashed mid-line
        f.write(json.dumps(read_output(parts[0])[0]) + "\n" + '{"id": "r9", "te')
    merged = tmp_path / "merged.jsonl"
    counts = merge_outputs(parts, merged, inp)
    assert counts == {"ids": 7, "duplicates": 1, "damaged": 1, "missing": 0}
    assert [r["id"] for r in read_output(merged)] == [f"r{i}" for i in range(7)]
    inp.write_text(inp.read_text() + json.dumps({"id": "r7", "prompt": "x"}) + "\n")
    assert merge_outputs(parts, merged, inp)["missing"] == 1
