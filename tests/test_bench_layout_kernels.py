"""scripts.benchmarks.bench_layout_kernels_gpu on the CPU: a tiny model's layouts attended by
"auto" (XLA here) and Triton in interpret mode, the JSON rows, the refusals."""

import json

import pytest

from scripts.benchmarks import bench_layout_kernels_gpu as bench


def test_tiny_run_times_each_variant_and_checks_it_against_auto(tmp_path):
    argv = ["--tiny", "--seq", "300", "--policies", "xattention", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "bench_layout_kernels_gpu.json").read_text())
    assert [a["layer"] for a in result["anchors"]] == [0, 1]
    assert [(r["policy"], r["layer"]) for r in result["rows"]] == [("xattention", 0),
                                                                    ("xattention", 1)]
    for r in result["rows"]:
        assert r["auto_backend"] == "xla" and 0 < r["density"] < 1
        assert set(r["variants"]) == {"auto", "triton"}  # no Mosaic GPU on a CPU
        assert r["variants"]["triton"]["max_abs_diff"] < 1e-5
    assert "| 0 | xattention |" in (tmp_path / "bench_layout_kernels_gpu.md").read_text()


@pytest.mark.parametrize("argv,message", [
    (["--policies", "pbs"], "permuted keys"),
    (["--mosaic", '{"persistent": 1}'], "persistent must be true or false"),
    (["--mosaic", '{"stages": 3}'], "unexpected keyword"),
])
def test_bad_arguments_are_refused_in_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        bench.parse(["--tiny", "--out", str(tmp_path)] + argv)
    assert message in capsys.readouterr().err
