"""`jaxprefill eval`: dev/test splits, confidence intervals, paired comparison, report files,
fixed-shape batches, resume, memory-bounded attention statistics (tiny models, CPU)."""

from __future__ import annotations

import io
import json
import random
import zlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprefill as jp
from jaxprefill.attention import AttentionSpec
from jaxprefill.eval import cli, haystack, metrics, report, runner, suite
from jaxprefill.eval.stats import mcnemar_exact, paired_difference, wilson
from jaxprefill.sparse import SparseConfig
from jaxprefill.validate import InputError

STREAMING = SparseConfig.from_dict({"policy": "streaming", "min_length": 64, "kernel": "xla",
                                    "params": {"block_size": 16, "sink": 16, "local": 32}})


class HashTokenizer:
    """Whitespace words -> ids in [1, 97); decode prints the ids (tiny random models)."""

    eos_token_ids = (0,)

    def encode_prompt(self, messages, chat=True):
        return [zlib.crc32(w.encode()) % 96 + 1 for w in messages[0]["content"].split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


def tiny_model(num_layers: int = 2, context: int = 1024):
    cfg = jp.ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                         num_layers=num_layers, num_heads=6, num_kv_heads=2, head_dim=8,
                         max_position_embeddings=context, eos_token_ids=(0,))
    return jp.Llama(cfg, rngs=nnx.Rngs(0), attention=AttentionSpec(impl="xla"))


# ------------------------------------------------------------------------------ splits
def test_dev_and_test_share_no_document_and_no_seed():
    dev, test = haystack.documents("dev"), haystack.documents("test")
    assert {d.name for d in dev}.isdisjoint(d.name for d in test)
    assert {d.sha256 for d in dev}.isdisjoint(d.sha256 for d in test)
    code_paths = lambda docs: {d.source_path for d in docs if d.kind == "code"}  # noqa: E731
    assert code_paths(dev).isdisjoint(code_paths(test))
    listed = haystack.test_documents()
    assert [d["sha256"] for d in listed] == [d.sha256 for d in test]
    assert all(set(d) == {"name", "kind", "source", "source_path", "sha256"} for d in listed)
    for split in haystack.SPLITS:
        for kind in haystack.KINDS:  # each split and kind can fill a 32K-token haystack
            assert sum(len(d.text) for d in haystack.documents(split, kind)) > 4 * 32768
    assert "Python Software Foundation" in haystack.license_text()
    plan = dict(tasks=("passkey", "qa"), lengths=(512, 1024), depths=(0.0, 0.5, 1.0), samples=30)
    seeds = {s: {p.seed for p in suite.plan_samples(suite.EvalPlan(**plan, split=s))}
             for s in haystack.SPLITS}
    assert seeds["dev"].isdisjoint(seeds["test"])
    assert seeds["dev"].isdisjoint(range(haystack.SEED_BASE["test"],
                                         haystack.SEED_BASE["test"] + haystack.MAX_SAMPLES))
    for kind in haystack.KINDS:  # no shared text either (a stray line of boilerplate at most)
        long_lines = lambda s: {ln.strip() for d in haystack.documents(s, kind)  # noqa: E731
                                for ln in d.text.split("\n") if len(ln.strip()) >= 50}
        test_lines = long_lines("test")
        assert len(test_lines & long_lines("dev")) <= 0.005 * len(test_lines), kind


def test_plan_spreads_samples_over_depths_and_haystacks():
    plan = suite.EvalPlan(("passkey", "cwe", "qa"), (512,), (0.25, 0.75), 8)
    ps = suite.plan_samples(plan)
    assert len(ps) == 24 and len({p.prompt_id for p in ps}) == 24
    pk = [p for p in ps if p.task == "passkey"]
    assert [p.depth for p in pk] == [0.25, 0.75] * 4
    assert [p.haystack for p in pk] == ["code", "code", "prose", "prose"] * 2
    assert {p.haystack for p in ps if p.task == "qa"} == {"prose"}
    assert {p.depth for p in ps if p.task == "cwe"} == {None}
    with pytest.raises(InputError, match="unknown task"):
        suite.EvalPlan(("nope",), (512,), (0.5,), 1)
    with pytest.raises(InputError, match="depths"):
        suite.EvalPlan(("passkey",), (512,), (1.5,), 1)


# ------------------------------------------------------------------------------ statistics
def test_wilson_interval_known_values():
    np.testing.assert_allclose(wilson(8, 10), (0.4902, 0.9433), atol=1e-4)
    np.testing.assert_allclose(wilson(0, 10), (0.0, 0.2775), atol=1e-4)
    np.testing.assert_allclose(wilson(10, 10), (0.7225, 1.0), atol=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_paired_interval_covers_and_uses_the_pairing():
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(3, 3) == 1.0
    d = paired_difference([True] * 6 + [False] * 4, [True] * 8 + [False] * 2)
    assert (d.both, d.only_a, d.only_b, d.neither) == (6, 0, 2, 2)
    assert d.diff == pytest.approx(-0.2) and d.low < -0.2 < d.high
    # Coverage at n = 40 with correlated outcomes (p_a 0.7, p_b 0.8): near the nominal 95%.
    rng = random.Random(0)
    hits = 0
    for _ in range(1500):
        u = [rng.random() for _ in range(40)]
        noise = [rng.random() < 0.15 for _ in range(40)]
        a = [(x < 0.7) != n for x, n in zip(u, noise)]
        b = [x < 0.8 for x in u]
        r = paired_difference(a, b)
        hits += r.low <= (0.7 * 0.85 + 0.3 * 0.15) - 0.8 <= r.high
    assert 0.92 <= hits / 1500 <= 0.99, hits / 1500
    # Same accuracies, identical failures: the paired interval is far narrower than the
    # difference of two independent Wilson intervals would be.
    same = paired_difference([True] * 30 + [False] * 10, [True] * 29 + [False] * 11)
    assert same.high - same.low < 0.2 and same.only_a == 1 and same.only_b == 0


def records(config, correct, task="passkey", length=512):
    return [{"config": config, "task": task, "length": length, "prompt_id": f"{task}/{length}/{i}",
             "correct": c, "score": float(c)} for i, c in enumerate(correct)]


def test_report_tables_pair_configs_on_the_same_prompts(tmp_path):
    dense = records("dense", [1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    sparse = records("flex", [1, 1, 1, 1, 1, 0, 0, 1, 1, 0])
    long = records("dense", [1, 0, 0, 0], length=1024) + records("flex", [0, 0, 0, 0], length=1024)
    answers = dense + sparse + long
    stats = [{"config": "flex", "length": 512, "density": 0.5, "recall": 0.9,
              "min_head_recall": 0.7, "output_error": 0.1, "last_recall": 0.8,
              "min_last_recall": 0.5},
             {"config": "flex", "length": 512, "density": 0.7, "recall": 0.95,
              "min_head_recall": 0.8, "output_error": 0.05, "last_recall": 1.0,
              "min_last_recall": 1.0}]
    meta = {"model": "m", "split": "test", "tasks": ["passkey"], "lengths": [512, 1024],
            "depths": [0.5], "samples": 10, "haystack": "mixed", "dtype": "float32",
            "configs": ["dense", "flex"]}
    summary = report.write(tmp_path, answers, stats, meta)
    acc = {(r["config"], r["task"], r["length"]): r for r in summary["accuracy"]}
    assert acc[("flex", "passkey", 512)]["correct"] == 7
    assert acc[("dense", "all", "all")]["n"] == 14 and acc[("dense", "all", "all")]["correct"] == 9
    lo, hi = wilson(7, 10)
    assert acc[("flex", "passkey", 512)]["low"] == pytest.approx(lo)
    pair = {(r["task"], r["length"]): r for r in summary["paired"]}
    assert (pair[("passkey", 512)]["only_a"], pair[("passkey", 512)]["only_b"]) == (1, 2)
    assert pair[("passkey", 512)]["diff"] == pytest.approx(-0.1)
    assert pair[("all", "all")]["n"] == 14 and pair[("all", "all")]["only_b"] == 3
    assert summary["attention"] == [{"config": "flex", "length": 512, "prompts": 2,
                                     "density": 0.6, "recall": 0.925, "min_head_recall": 0.7,
                                     "output_error": pytest.approx(0.075),
                                     "last_recall": pytest.approx(0.9), "min_last_recall": 0.5}]
    md = (tmp_path / "report.md").read_text()
    assert "| dense | passkey | 8/10 0.80 [0.49, 0.94] | 1/4 0.25 [0.05, 0.70] |" in md
    assert "| flex | passkey | -0.10 [" in md and "(+1/-2, p=1)" in md
    assert "| flex | 512 | 2 | 0.600 | 0.9250 | 0.7000 | 0.0750 | 0.9000 | 0.5000 |" in md
    assert json.loads((tmp_path / "summary.json").read_text())["paired_method"].startswith(
        "Newcombe")
    assert (tmp_path / "accuracy.png").stat().st_size > 5000


# ------------------------------------------------------------------------------ the run
def eval_command_setup(tmp_path, monkeypatch, model, tok):
    """`jaxprefill eval` wired to (model, tok) with a streaming config file: (parser, config
    path)."""
    import argparse

    monkeypatch.setattr(cli, "load_model",
                        lambda name, dtype, adapter=None, overrides=None: (model, tok))
    (tmp_path / "streaming.yaml").write_text(
        "policy: streaming\nmin_length: 64\nkernel: xla\n"
        "params: {block_size: 16, sink: 16, local: 32}\n")
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    return parser, str(tmp_path / "streaming.yaml")


def test_eval_command_tiny_model_fixed_shapes_report_and_resume(tmp_path, monkeypatch,
                                                                capsys):
    """`jaxprefill eval` on a tiny random model, dense + streaming: every answer recorded with
    its fields, one prefill shape per length, stats on the sampled prompts, the report files;
    a rerun computes nothing, a lost tail (torn line included) is recomputed, a changed run is
    refused."""
    model, tok = tiny_model(), HashTokenizer()
    parser, streaming = eval_command_setup(tmp_path, monkeypatch, model, tok)
    shapes = []
    real = suite.greedy_answers

    def spy(model, tok, tokens, lengths, cfg, steps, cache_len):
        shapes.append((tokens.shape, cache_len))
        return real(model, tok, tokens, lengths, cfg, steps, cache_len)

    monkeypatch.setattr(suite, "greedy_answers", spy)
    out = tmp_path / "out"
    args = parser.parse_args(
        ["eval", "--model", "tiny", "--sparse", streaming, "--tasks",
         "passkey", "niah_multikey", "qa", "--lengths", "200", "--depths", "0.2", "0.8",
         "--samples", "2", "--batch-size", "4", "--max-new-tokens", "3", "--stats-prompts", "2",
         "--stats-rows", "8", "--out-dir", str(out)])
    assert args.func(args) == 0
    assert "[eval] 12/12 answers (100%) streaming L=200 batch 2/2" in capsys.readouterr().err
    assert set(shapes) == {((4, 256), 259)}  # 6 prompts: batches of 4 (last padded), one shape
    assert len(shapes) == 4
    keys = {"prompt_id", "task", "length", "tokens", "depth", "seed", "haystack", "config",
            "answer", "expected", "distractors", "correct", "score", "prefill_s", "prompt_sha"}
    lines = (out / "answers.jsonl").read_text().splitlines()
    answers = [json.loads(ln) for ln in lines]
    assert len(answers) == 12 and all(set(r) == keys for r in answers)
    assert all(r["tokens"] <= 200 and isinstance(r["correct"], bool) for r in answers)
    plan = suite.EvalPlan(("passkey", "niah_multikey", "qa"), (200,), (0.2, 0.8), 2)
    configs = {"dense": None, "streaming": SparseConfig.parse(streaming)}
    assert {(r["config"], r["prompt_id"]) for r in answers} == {
        (c, p.prompt_id) for c in configs for p in suite.plan_samples(plan)}
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["config"], r["task"], r["length"], r["n"]) for r in summary["accuracy"]][:2] == [
        ("dense", "passkey", 200, 2), ("dense", "passkey", "all", 2)]
    assert {(r["task"], r["length"]) for r in summary["paired"]} >= {("all", "all"), ("qa", 200)}
    assert [(r["config"], r["prompts"]) for r in summary["attention"]] == [("streaming", 2)]
    assert 0 < summary["attention"][0]["density"] < 1
    assert "## Sparse minus dense" in (out / "report.md").read_text()
    assert (out / "accuracy.png").stat().st_size > 5000

    info = {"model": "tiny", "adapter": None, "overrides": {}, "dtype": "float32"}
    kw = dict(batch_size=4, max_new_tokens=3, stats_prompts=2, stats_rows=8,
              log=lambda m: None, progress_stream=io.StringIO())
    shapes.clear()
    n_stats = len((out / "stats.jsonl").read_text().splitlines())
    again, again_stats = suite.run(model, tok, configs, plan, out, info, **kw)
    assert shapes == [] and sorted(again, key=str) == sorted(answers, key=str)  # no recompute
    assert len(again_stats) == n_stats == 2
    assert len((out / "stats.jsonl").read_text().splitlines()) == n_stats
    # Lose the last three answers, the last one mid-write: exactly those are recomputed.
    (out / "answers.jsonl").write_text("\n".join(lines[:9]) + "\n" + lines[9][:20])
    third, _ = suite.run(model, tok, configs, plan, out, info, **kw)
    assert len(shapes) == 1 and len(third) == 12
    same = lambda rs: sorted(json.dumps({**r, "prefill_s": 0}, sort_keys=True)  # noqa: E731
                             for r in rs)
    assert same(third) == same(answers)  # greedy answers of the same prompts in the same shape
    with pytest.raises(InputError, match="dtype"):
        suite.run(model, tok, configs, plan, out, {**info, "dtype": "bfloat16"}, **kw)
    with pytest.raises(InputError, match="overrides"):
        suite.run(model, tok, configs, plan, out, {**info, "overrides": {"rope_theta": 1e6}},
                  **kw)
    other = {"dense": None, "streaming": SparseConfig.parse("flexprefill")}
    with pytest.raises(InputError, match="streaming"):
        suite.run(model, tok, other, plan, out, info, **kw)


def test_eval_command_interrupted_writes_a_partial_report_and_resumes(tmp_path, monkeypatch,
                                                                      capsys):
    """SIGTERM during the second batch (as `timeout` sends): the first batch's answers stay on
    disk, the command exits as interrupted (130) after writing a report marked partial, and the
    rerun computes only what is missing."""
    import os
    import signal

    from jaxprefill.cli import run_command

    model, tok = tiny_model(), HashTokenizer()
    parser, streaming = eval_command_setup(tmp_path, monkeypatch, model, tok)
    calls, kill_at = [], [2]
    real = suite.greedy_answers

    def killed_on_second(*a, **k):
        calls.append(1)
        if len(calls) == kill_at[0]:
            os.kill(os.getpid(), signal.SIGTERM)  # handled when this call returns
        return real(*a, **k)

    monkeypatch.setattr(suite, "greedy_answers", killed_on_second)
    out = tmp_path / "out"
    argv = ["eval", "--model", "tiny", "--sparse", streaming, "--tasks",
            "passkey", "qa", "--lengths", "200", "--depths", "0.5", "--samples", "2",
            "--batch-size", "2", "--max-new-tokens", "2", "--stats-prompts", "0",
            "--out-dir", str(out)]
    args = parser.parse_args(argv)
    before = signal.getsignal(signal.SIGTERM)
    assert run_command(args.func, args) == 130
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back
    err = capsys.readouterr().err
    assert "partial report/summary over 2 of 8 answers" in err and "interrupted" in err
    assert len((out / "answers.jsonl").read_text().splitlines()) == 2  # the first batch only
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["partial"] == {"answers": 2, "planned": 8}
    assert [(r["config"], r["n"]) for r in summary["accuracy"]
            if r["task"] == "all" and r["length"] == "all"] == [("dense", 2)]
    assert "**Partial:**" in (out / "report.md").read_text()

    calls.clear()
    kill_at[0] = 0
    args = parser.parse_args(argv)
    assert args.func(args) == 0 and len(calls) == 3  # batches 2-4 of 4
    summary = json.loads((out / "summary.json").read_text())
    assert "partial" not in summary["meta"]
    assert "**Partial:**" not in (out / "report.md").read_text()
    assert len((out / "answers.jsonl").read_text().splitlines()) == 8


def test_eval_refuses_lengths_beyond_context(tmp_path):
    plan = suite.EvalPlan(("passkey",), (2048,), (0.5,), 1)
    with pytest.raises(InputError, match="context of 1024"):
        suite.run(tiny_model(), HashTokenizer(), {"dense": None}, plan, tmp_path,
                  {"model": "tiny"}, log=lambda m: None)


# ------------------------------------------------------------------------------ bounded stats
def test_chunked_layer_stats_match_the_all_layers_capture(monkeypatch):
    """Prompts one chunk and one layer at a time, recall split over KV-head groups: the same
    numbers as the whole-batch capture (capture_qkv + row_attention_stats)."""
    from jaxprefill.eval.probe import capture_qkv

    model = tiny_model(num_layers=2)
    rng = np.random.default_rng(3)
    lens = np.array([250, 203, 130])
    tokens = np.zeros((3, 256), np.int32)
    for i, n in enumerate(lens):
        tokens[i, :n] = rng.integers(1, 97, n)
    configs = {"streaming": STREAMING}
    q, k, v = capture_qkv(model, jnp.asarray(tokens))
    want = runner.row_attention_stats(q, k, v, lens, configs, rows=8, log=lambda m: None,
                                      chunk=3)
    monkeypatch.setattr(metrics, "STATS_CALL_BYTES", 1)  # one KV head per recall call
    for chunk in (1, 2):  # chunk 2: the last chunk is padded with a copy
        got = runner.prompt_attention_stats(model, tokens, lens, configs, rows=8, chunk=chunk,
                                            log=lambda m: None)
        for m in ("density", "recall", "min_head_recall", "output_error", "last_recall",
                  "min_last_recall"):
            np.testing.assert_allclose(got["streaming"][m], want["streaming"][m], rtol=1e-5,
                                       err_msg=f"{m} chunk {chunk}")
    assert want["streaming"]["recall"].max() < 1.0


def test_last_query_recall_is_the_generating_tokens_and_a_dense_tail_makes_it_exact():
    """last_recall: the recall of each prompt's last query, per layer and head, against a
    direct computation at that row; with n_last the last query reads every key (recall 1)."""
    model = tiny_model(num_layers=2)
    rng = np.random.default_rng(5)
    lens = np.array([250, 203])
    tokens = np.zeros((2, 256), np.int32)
    for i, n in enumerate(lens):
        tokens[i, :n] = rng.integers(1, 97, n)
    tail = SparseConfig.parse({"policy": "streaming", "min_length": 0,
                               "params": {"sink": 16, "local": 32, "block_size": 16,
                                          "n_last": 1}})
    got = runner.layer_head_stats(model, tokens, lens, {"streaming": STREAMING, "tail": tail},
                                  rows=8, log=lambda m: None)
    from jaxprefill.eval.probe import layer_qkv
    policy = STREAMING.policy_for(0)
    for layer, q, k, v in layer_qkv(model, jnp.asarray(tokens)):
        mask = policy.block_mask(q, k, layer=layer, lengths=jnp.asarray(lens, jnp.int32))
        want, _ = metrics.row_recall_error(q, k, v, mask, (lens - 1)[:, None], policy.block_size)
        np.testing.assert_allclose(got["streaming"]["last_recall"][layer], want, rtol=1e-5)
    assert got["streaming"]["last_recall"].max() < 1.0  # the window drops far keys
    np.testing.assert_allclose(got["tail"]["last_recall"], 1.0, rtol=1e-6)
    assert got["tail"]["recall"].min() < 1.0  # only the tail is dense


# ------------------------------------------------------------------------------ command line
def test_cli_configs_depths_and_adapter_hook(monkeypatch):
    root = Path(__file__).resolve().parents[1]
    cfgs = cli.configs([str(root / "configs/sparse/flexprefill_smollm2.yaml"),
                        "xattention:threshold=0.9,stride=8", "streaming"])
    assert list(cfgs) == ["dense", "flexprefill_smollm2", "xattention:threshold=0.9,stride=8",
                          "streaming"]
    assert cfgs["xattention:threshold=0.9,stride=8"].rules[0].policy.threshold == 0.9
    with pytest.raises(InputError, match="two configs"):
        cli.configs(["streaming", "streaming"])
    with pytest.raises(InputError, match="--sparse nope"):
        cli.configs(["nope"])
    with pytest.raises(FileNotFoundError):
        cli.configs([str(root / "configs/sparse/missing.yaml")])
    assert cli.depth_list([5]) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert cli.depth_list([0.9, 0.1]) == [0.1, 0.9]
    with pytest.raises(InputError, match="--depths"):
        cli.depth_list([1.5, 0.2])
    seen = {}

    def load_plain(source, *, dtype="float32"):
        raise AssertionError("must not load: this jp.load takes no adapter")

    monkeypatch.setattr(jp, "load", load_plain)
    with pytest.raises(InputError, match="--adapter"):
        cli.load_model("m", "float32", adapter="lora/")

    def load(source, *, dtype="float32", adapter=None, overrides=None):
        seen.update(source=source, dtype=dtype, adapter=adapter, overrides=overrides)
        return "model", HashTokenizer()

    monkeypatch.setattr(jp, "load", load)
    assert cli.load_model("m", "bfloat16", adapter="lora/")[0] == "model"
    assert seen == {"source": "m", "dtype": "bfloat16", "adapter": "lora/", "overrides": None}
    rope = cli.parse_overrides(["max_position_embeddings=32768",
                                "rope_scaling={rope_type: yarn, factor: 4.0}"])
    assert rope == {"max_position_embeddings": 32768,
                    "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    cli.load_model("m", "float32", overrides=rope)
    assert seen["overrides"] == rope
    for bad in ("rope_theta", "=3", "rope_scaling={a: [1"):
        with pytest.raises(InputError, match="--override"):
            cli.parse_overrides([bad])


def test_analyze_command_tiny_model(tmp_path, monkeypatch, capsys):
    """`jaxprefill analyze` (stats one layer at a time, heatmap of one layer) still writes its
    table and pictures."""
    import argparse

    model = tiny_model(num_layers=2)
    monkeypatch.setattr(cli, "load_model", lambda name, dtype, adapter=None, overrides=None:
                        (model, HashTokenizer()))
    (tmp_path / "streaming.yaml").write_text(
        "policy: streaming\nmin_length: 64\nkernel: xla\n"
        "params: {block_size: 16, sink: 16, local: 32}\n")
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["analyze", "--sparse", str(tmp_path / "streaming.yaml"),
                              "--length", "200", "--rows", "8", "--layer", "1",
                              "--out-dir", str(tmp_path / "an")])
    assert args.func(args) == 0
    assert "| streaming |" in capsys.readouterr().out
    rows = json.loads((tmp_path / "an" / "stats.json").read_text())
    assert len(rows[0]["per_layer"]) == 2 and len(rows[0]["per_head_recall"]) == 2 * 6
    assert 0 < rows[0]["density"] < 1 and rows[0]["recall"] < 1
    for png in ("heatmap.png", "density_recall.png"):
        assert (tmp_path / "an" / png).stat().st_size > 1000
    args.layer = 5
    with pytest.raises(InputError, match="--layer"):
        args.func(args)


def test_analyze_heatmap_draws_the_layout_a_layer_runs(tmp_path, monkeypatch):
    """With share_layers 2, layer 1's heatmap is the layout layer 0 built."""
    import argparse

    model = tiny_model(num_layers=2)
    for _, p in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if p[...].ndim >= 2:
            p[...] = p[...] * 6.0  # peaked attention: the layers choose different blocks
    monkeypatch.setattr(cli, "load_model", lambda name, dtype, adapter=None, overrides=None:
                        (model, HashTokenizer()))
    drawn = []
    monkeypatch.setattr(cli.plots, "mask_heatmaps", lambda path, mass, masks, title:
                        drawn.append({k: np.asarray(m) for k, m in masks.items()}))
    monkeypatch.setattr(cli.plots, "density_recall", lambda path, rows: None)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    spec = "xattention:block_size=16,stride=4,threshold=0.5,n_last=0"
    for layer in (0, 1):
        args = parser.parse_args(["analyze", "--sparse", spec, spec + ",share_layers=2",
                                  "--length", "200", "--rows", "8", "--layer", str(layer),
                                  "--out-dir", str(tmp_path / "an")])
        assert args.func(args) == 0
    own0, own1 = drawn[0][spec], drawn[1][spec]
    assert (own0 != own1).any()
    np.testing.assert_array_equal(drawn[1][spec + ",share_layers=2"], own0)


def test_runs_from_before_overrides_existed_resume(tmp_path):
    """A run.json written without an "overrides" entry is the same run as overrides {}; a run
    with real overrides is another one."""
    info = {"model": "m", "adapter": None, "dtype": "float32", "split": "dev",
            "max_new_tokens": None, "haystack_asset": "x", "configs": {"dense": "0"}}
    (tmp_path / suite.RUN).write_text(json.dumps(info))
    suite.Store(tmp_path, {**info, "overrides": {}}, log=lambda m: None)
    with pytest.raises(InputError, match="overrides"):
        suite.Store(tmp_path, {**info, "overrides": {"rope_theta": 1e6}}, log=lambda m: None)
