"""CPU smoke run of the prefill op profile, and its trace reading on a made-up trace."""

import gzip
import json

from scripts.profiling import profile_prefill_ops as ppo


def test_smoke_run_lists_the_ops_of_each_policy(tmp_path):
    assert ppo.main(["--tiny", "--seq", "256", "--policies", "dense", "streaming",
                     "--reps", "1", "--top", "5", "--drop-trace", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "profile_prefill_ops.json").read_text())
    for name in ("dense", "streaming"):
        r = result["policies"][name]
        assert r["ttft_median_ms"] > 0 and 0 < len(r["top"]) <= 5
        assert r["busy_ms_per_run"] > 0 and sum(r["classes_ms_per_run"].values()) > 0
    assert "## streaming" in (tmp_path / "profile_prefill_ops.md").read_text()
    assert not (tmp_path / "trace").exists()


def test_device_lines_win_and_summary_lines_are_left_out(tmp_path):
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8,
             "args": {"name": "XLA Modules"}},
            {"ph": "M", "name": "thread_name", "pid": 2, "tid": 9, "args": {"name": "tf_XLA"}}]
    ops = [{"ph": "X", "pid": 1, "tid": 7, "name": "cutlass_gemm", "ts": 0, "dur": 1000},
           {"ph": "X", "pid": 1, "tid": 7, "name": "loop_scatter_fusion", "ts": 500, "dur": 1000},
           {"ph": "X", "pid": 1, "tid": 8, "name": "jit_prefill", "ts": 0, "dur": 5000},
           {"ph": "X", "pid": 2, "tid": 9, "name": "host_op", "ts": 0, "dur": 9000}]
    d = tmp_path / "t" / "plugins"
    d.mkdir(parents=True)
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": meta + ops}, f)
    got, source, line = ppo.device_ops(ppo.trace_events(tmp_path / "t"))
    assert source == "device streams" and [e["name"] for e in got] == ["cutlass_gemm",
                                                                         "loop_scatter_fusion"]
    s = ppo.summarize(got, 1, 10, line)
    assert s["op_ms_per_run"] == 2.0 and s["busy_ms_per_run"] == 1.5  # overlap counted once
    assert s["classes_ms_per_run"] == {"gemm": 1.0, "scatter/gather": 1.0}
    assert s["lines_ms_per_run"] == {"/device:GPU:0 Stream #7": 2.0}
