"""scripts/profiling/ncu_compare.py reads the Nsight Compute exports kept in benchmarks/results
and gives the cycle-count figures docs/history.md quotes (2026-11-23)."""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "results" / "2026-11-23" / "h100_profile_kernels_ncu"


def test_ncu_compare_reads_the_recorded_16k_profiles(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ncu_compare.py", str(DATA), "mosaic16k:anonymous_mosaic",
                                      "tokamax16k:flash_attention", "--top", "2"])
    try:
        runpy.run_module("scripts.profiling.ncu_compare", run_name="__main__")
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    rows = {line[:44].strip(): line[44:].split() for line in out.splitlines()
            if len(line) > 44 and not line.startswith(" ")}
    assert rows["tensor pipe active, % of active cycles"] == ["72.91", "74.69"]
    assert rows["issued warp instructions"] == ["1.092e+09", "1.026e+09"]
    # The SASS exports: sample shares by reason and the top instructions of each kernel.
    assert "mosaic16k (anonymous_mosaic):" in out and "tokamax16k (flash_attention):" in out
    assert "2080 SASS instructions" in out and "1632 SASS instructions" in out
