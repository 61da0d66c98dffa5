"""scripts.tools.plot_training: a run's metrics.jsonl (resumed once, a step repeated, a torn
last line) becomes a loss-curve PNG; a broken line elsewhere is an error naming it."""

import json

import numpy as np
import pytest

from scripts.tools import plot_training


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_metrics_to_png(tmp_path):
    recs = [{"event": "first_step", "step": 1, "seconds": 9.0}]
    recs += [{"step": s, "loss": 3.0 - 0.01 * s, "lr": 1e-4, "tokens": 8.0} for s in range(1, 31)]
    recs += [{"step": 30, "val_loss": 2.8, "val_ppl": 16.4}, {"event": "resume", "step": 30}]
    recs += [{"step": s, "loss": 9.0, "lr": 1e-4} for s in (30,)]  # repeated step: last wins
    recs += [{"step": s, "loss": 2.6, "lr": 5e-5} for s in range(31, 41)]
    path = tmp_path / "metrics.jsonl"
    _write(path, recs, tail='{"step": 41, "lo')
    m = plot_training.read_metrics(path)
    assert sorted(m["train"]) == list(range(1, 41)) and m["train"][30]["loss"] == 9.0
    assert m["val"] == {30: 2.8} and m["resumes"] == [30]
    out = tmp_path / "loss.png"
    assert plot_training.main([str(path), "--out", str(out), "--window", "5"]) == 0
    assert out.stat().st_size > 5000
    np.testing.assert_allclose(plot_training.moving_average(np.array([1.0, 3.0, 5.0]), 2),
                               [1.0, 2.0, 4.0])


def test_bad_lines_and_missing_files(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(SystemExit, match=r"metrics.jsonl:2: not a JSON line"):
        plot_training.read_metrics(path)
    path.write_text('{"event": "first_step", "step": 1}\n')
    with pytest.raises(SystemExit, match="no training steps"):
        plot_training.read_metrics(path)
    with pytest.raises(SystemExit, match="no such metrics file"):
        plot_training.main([str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x.png")])
