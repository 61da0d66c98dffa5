"""scripts.benchmarks.bench_sparse_stages_gpu on the CPU: a tiny model through the engine and
the per-stage timings (XLA paths), the JSON rows it writes, the dense fallbacks it reports, and
a policy with its own attend (pbs) on a row the engine runs as a plain prompt."""

import json
import math

import numpy as np
import pytest
from flax import nnx

import jaxprefill as jp
from jaxprefill.sparse import SparseConfig
from scripts.benchmarks import bench_sparse_stages_gpu as stages
from scripts.benchmarks.bench_sparse_ttft_gpu import llama3_8b_shapes

ROW_FIELDS = {"policy", "path", "ttft_ms", "sparse_over_dense", "est_ms", "kernel_ms", "attn_ms",
              "dense_ms", "rest_ms", "outside_ms", "predicted_ms", "actual_over_predicted",
              "density", "kernel_backends", "est_backends", "fallback", "est_over_dense",
              "est_over_dense_max_32k", "chunks"}
CALL_FIELDS = {"start", "valid", "est_ms", "kernel_ms", "attn_ms", "dense_ms", "rest_ms",
               "density", "est_over_dense", "fallback"}


def test_tiny_run_writes_every_field(tmp_path):
    argv = ["--tiny", "--seq", "512", "--chunk", "128", "--layers", "1", "--reps", "1",
            "--policies", "dense", "streaming", "xattention", "--out", str(tmp_path)]
    assert stages.main(argv) == 0
    result = json.loads((tmp_path / "bench_sparse_stages_gpu.json").read_text())
    rows = result["rows"]
    assert [(r["path"], r["policy"]) for r in rows] == [
        (p, n) for p in ("chunked", "row") for n in ("dense", "streaming", "xattention")]
    for r in rows:
        assert "error" not in r, r
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert len(r["chunks"]) == (4 if r["path"] == "chunked" else 1)
        assert [c["start"] for c in r["chunks"]] == ([0, 128, 256, 384] if r["path"] == "chunked"
                                                     else [0])
        for c in r["chunks"]:
            assert CALL_FIELDS <= set(c), CALL_FIELDS - set(c)
            assert 0 < c["density"] <= 1 and c["dense_ms"] > 0 and c["rest_ms"] > 0
        assert 0 < r["density"] <= 1
        assert math.isfinite(r["actual_over_predicted"])  # (no sign: CPU timings are noisy)
        assert math.isfinite(r["sparse_over_dense"]) and r["kernel_backends"]
        assert r["fallback"] == []  # every call of this run is sparse (min_length 128)
        if r["policy"] == "dense":
            assert r["density"] == 1 and r["est_ms"] == 0 and r["est_backends"] == {}
            assert r["actual_over_predicted"] == 1  # the anchor defines outside_ms
            assert r["outside_ms"] == result["header"]["outside_ms"][r["path"]]
        else:
            assert r["est_ms"] > 0
    by = {(r["path"], r["policy"]): r for r in rows}
    # streaming (sink 64 + local 128 at 512 tokens) skips blocks; xattention asks the resolver
    assert by["row", "streaming"]["density"] < 0.9
    assert by["row", "streaming"]["est_backends"] == {}
    assert set(by["row", "xattention"]["est_backends"].values()) == {"xla"}
    assert result["header"]["cudnn_ms"] is None and result["header"]["cudnn_note"]
    single = by["row", "dense"]["engine_stats"].get("single_rows", 0) > 0
    assert result["header"]["row_kind"] == ("prompt" if single else "packed")
    table = (tmp_path / "bench_sparse_stages_gpu.md").read_text()
    assert table.count("\n| chunked |") == 3 and table.count("\n| row |") == 3


def tiny_bench(tmp_path, path: str) -> stages.Bench:
    args = stages.parse(["--tiny", "--seq", "256", "--chunk", "128", "--layers", "1",
                         "--paths", path, "--out", str(tmp_path)])
    model = jp.Llama(llama3_8b_shapes(1, True), rngs=nnx.Rngs(0))
    return stages.Bench(args, model, np.random.default_rng(0).integers(1, 512, 256).tolist(), 0)


PBS = SparseConfig.parse({"policy": "pbs", "min_length": 128, "block_size": 64})


def test_dense_fallback_is_reported(tmp_path):
    """pbs takes whole prompts only: the engine's chunks stay dense, and say why."""
    bench = tiny_bench(tmp_path, "chunked")
    calls = bench.group("chunked", PBS, 0, "pbs")
    assert len(calls) == 2
    for call, base in zip(calls, bench.path_base("chunked")):
        assert call["density"] == 1 and call["est_ms"] == 0
        assert "pbs takes prompt calls, not chunk" in call["fallback"]
        assert call["kernel_ms"] == base["dense_ms"]


def test_a_policy_with_its_own_attend_on_a_prompt_row(tmp_path):
    """A row the engine runs as a plain prompt forward reaches pbs's own attend ([K'; K])."""
    bench = tiny_bench(tmp_path, "row")
    bench.engine_ran("row", {"packed_rows": 1, "single_rows": 1})
    (call,) = bench.group("row", PBS, 0, "pbs")
    assert call["fallback"] == "" and 0 < call["density"] <= 1 and call["est_ms"] > 0
    assert "own attend" in call["kernel_backend"]
    assert call["est_backends"]  # its last-block sums ask the resolver
    (c,) = bench.path_calls("row")
    assert c.seg is None and c.off is None and int(c.lens[0]) == 256


def test_shared_layouts_pay_estimation_once_per_group(tmp_path):
    """With share_layers 2 only the first of two layers builds its layout: the predicted
    estimation per layer is half of the one measured on the group's layer."""
    args = stages.parse(["--tiny", "--seq", "256", "--chunk", "128", "--layers", "2",
                         "--paths", "row", "--out", str(tmp_path)])
    model = jp.Llama(llama3_8b_shapes(2, True), rngs=nnx.Rngs(0))
    bench = stages.Bench(args, model, np.random.default_rng(0).integers(1, 512, 256).tolist(), 0)
    bench.engine_ran("row", {"packed_rows": 1, "single_rows": 1})
    spec = {"policy": "xattention", "min_length": 128, "block_size": 64,
            "params": {"stride": 4, "share_layers": 2}}
    measured, group = [], bench.group

    def recorded(*args):
        measured.append(group(*args))
        return measured[-1]

    bench.group = recorded
    row = bench.stages("row", SparseConfig.parse(spec))
    assert row["groups"] == [{"policy": "xattention", "layer": 0, "layers": 2, "builds": 1}]
    (call,) = measured[0]
    assert call["est_ms"] > 0 and row["est_ms"] == pytest.approx(call["est_ms"] / 2)


def test_tiny_specs_keep_their_parameters():
    assert stages.policy_spec("xattention:share_layers=2,stride=4", tiny=True) == {
        "policy": "xattention", "min_length": 128, "block_size": 64,
        "params": {"share_layers": 2, "stride": 4}}
    assert stages.policy_spec("streaming", tiny=True)["params"] == {"sink": 64, "local": 128}


def test_ordinary_mistakes_are_one_line(tmp_path, capsys):
    argv = ["--tiny", "--seq", "128", "--chunk", "128", "--layers", "1", "--out", str(tmp_path)]
    assert stages.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--chunk 128 >= the prompt's 128 tokens" in err


def test_chunk_estimation_profile_runs_tiny(tmp_path, monkeypatch):
    from scripts.benchmarks import profile_chunk_estimation_gpu as profile

    monkeypatch.setattr("sys.argv", ["profile", "--tiny", "--out", str(tmp_path)])
    assert profile.main() == 0
    ms = json.loads((tmp_path / "profile_chunk_estimation.json").read_text())["ms"]
    assert set(ms) == {"last_q_sums", "topk_vertical", "topk_slash", "column_positions",
                       "diagonal_blocks", "finish", "with_columns", "dense_chunk"} | {
                          f"chunk_layout_{p}_{keys}" for p in ("minference", "flexprefill",
                                                               "xattention")
                          for keys in ("full", "bucket")}
    assert all(v > 0 for v in ms.values())


def test_ttft_policies_take_eval_specs():
    """bench_sparse_ttft_gpu --policies: its own names keep their parameters; other names,
    name:key=value and YAML specs parse as `jaxprefill eval --sparse` does; a bad one is refused."""
    import pytest
    from jaxprefill.validate import InputError
    from scripts.benchmarks.bench_sparse_ttft_gpu import POLICIES, policy_config

    assert policy_config("flexprefill") is POLICIES["flexprefill"]
    cfg = policy_config("flexprefill:gamma=0.8")
    assert isinstance(cfg, SparseConfig) and cfg.rules[0].policy.gamma == 0.8
    assert isinstance(policy_config("proxyattn"), SparseConfig)
    with pytest.raises(InputError):
        policy_config("flexprefill:gamma")


def test_ttft_stats_report_density_and_recall(tmp_path, monkeypatch):
    """bench_sparse_ttft_gpu --stats: each sparse policy gets the density and recall of its
    layouts on the timed prompt; a static policy that drops blocks shows density < 1."""
    from scripts.benchmarks import bench_sparse_ttft_gpu as ttft

    spec = str(tmp_path / "stream.yaml")
    (tmp_path / "stream.yaml").write_text("policy: streaming\nmin_length: 0\nblock_size: 16\n"
                                          "params: {sink: 16, local: 32}\n")
    monkeypatch.setattr("sys.argv", ["ttft", "--tiny", "--layers", "1", "--seq", "256",
                                     "--chunk", "128", "--reps", "1", "--paths", "row",
                                     "--policies", "dense", spec, "--stats", "--out",
                                     str(tmp_path)])
    ttft.main()
    out = json.loads((tmp_path / "bench_sparse_ttft_gpu.json").read_text())
    (row,) = out["stats"]
    assert row["policy"] == spec and row["length"] == 256
    assert 0.1 < row["density"] < 0.6 and 0.0 < row["recall"] <= 1.0
    assert f"| row | {spec} |" in (tmp_path / "bench_sparse_ttft_gpu.md").read_text()


def test_threshold_search_bench_runs_tiny(tmp_path):
    from jaxprefill.sparse import select
    from scripts.benchmarks import bench_threshold_search_gpu as bench

    before = select.RADIX_BITS, select.RADIX_UNROLL
    assert bench.main(["--tiny", "--out", str(tmp_path)]) == 0
    assert (select.RADIX_BITS, select.RADIX_UNROLL) == before  # the library's search restored
    rows = json.loads((tmp_path / "bench_threshold_search.json").read_text())["results"]
    assert [r["shape"] for r in rows] == list(bench.TINY)
    names = [f"b{b}" for b in bench.WIDTHS] + [f"b{select.RADIX_BITS}_unrolled"]
    for r in rows:
        assert all(r[f"topk_equal_{n}"] for n in names)
        assert all(r[f"topk_ms_{n}"] > 0 and r[f"mass_ms_{n}"] > 0 for n in names)
    columns = json.loads((tmp_path / "bench_threshold_search.json").read_text())["columns"]
    assert [r["shape"] for r in columns] == list(bench.TINY_COLUMNS)
    assert all(r["equal"] and r["cells_ms"] > 0 for r in columns)
    kernels = json.loads((tmp_path / "bench_threshold_search.json").read_text())["kernels"]
    assert [r["shape"] for r in kernels] == list(bench.TINY_KERNELS)
    for r in kernels:  # interpret mode on the CPU: the wide kernel beside the XLA search
        assert r["kernel_rows_differ"] == 0 and r["kernel_ms"] > 0 and r["xla_ms"] > 0
