"""scripts/ncu_compare.py reads the Nsight Compute exports kept in benchmarks/results and gives
the figures docs/performance.md quotes (eighth session, issue 4)."""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "results" / "ncu_2026-11-23_s8"


def test_ncu_compare_reads_the_recorded_16k_profiles(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ncu_compare.py", str(DATA), "mosaic16k:anonymous_mosaic",
                                      "tokamax16k:flash_attention", "--top", "2"])
    try:
        runpy.run_path(str(ROOT / "scripts" / "ncu_compare.py"), run_name="__main__")
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
