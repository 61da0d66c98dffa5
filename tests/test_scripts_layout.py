"""scripts/ stays navigable and its numbers comparable: modules in group folders, run with
``python -m`` (no ``sys.path`` edits), every timing through ``scripts.common.timing.time_ms``
(milliseconds), and benchmarks/results/ under the one naming scheme of benchmarks/README.md.
The layout checks read the sources with ``ast`` (nothing is imported)."""

import ast
import re
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from scripts.common.timing import time_ms

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
TIMING = SCRIPTS / "common" / "timing.py"
GROUPS = ("checks", "benchmarks", "profiling", "accuracy", "tools")
CLOCKS = {"perf_counter", "perf_counter_ns", "time", "time_ns", "monotonic", "monotonic_ns",
          "process_time"}


def sources() -> list[Path]:
    return sorted(SCRIPTS.rglob("*.py"))


def entry_points() -> list[Path]:
    """Every runnable script: group folders, not __init__.py."""
    return [p for p in sources() if p.parent.name in GROUPS and p.name != "__init__.py"]


def called_name(node: ast.Call) -> str:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")


def test_scripts_live_in_group_folders():
    top = sorted(p.name for p in SCRIPTS.iterdir() if p.suffix in (".py", ".sh"))
    assert top == ["__init__.py"], f"scripts/ top level: put these in {GROUPS}: {top}"
    for folder in (*GROUPS, "common"):
        assert (SCRIPTS / folder / "__init__.py").exists(), f"scripts/{folder}/__init__.py"


def test_no_script_edits_sys_path():
    bad = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr == "path"
                    and isinstance(node.value, ast.Name) and node.value.id == "sys"):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, f"sys.path used (run scripts as modules instead): {bad}"


def test_timing_goes_through_the_shared_helper():
    """A loop that reads a clock and blocks on device results is a private timing helper; only
    scripts/common/timing.py has one. Neither triton's do_bench nor the timeit module."""
    bad = []
    for path in sources():
        if path == TIMING:
            continue
        tree = ast.parse(path.read_text())
        where = f"{path.relative_to(ROOT)}"
        for node in ast.walk(tree):
            if isinstance(node, (ast.For, ast.While, ast.ListComp, ast.GeneratorExp)):
                calls = {called_name(c) for c in ast.walk(node) if isinstance(c, ast.Call)}
                if calls & CLOCKS and "block_until_ready" in calls:
                    bad.append(f"{where}:{node.lineno} timing loop")
            if isinstance(node, ast.Call) and called_name(node) == "do_bench":
                bad.append(f"{where}:{node.lineno} do_bench")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if "timeit" in names:
                    bad.append(f"{where}:{node.lineno} timeit module")
    assert not bad, f"use scripts.common.timing.time_ms: {bad}"


def test_every_script_runs_as_a_module_and_is_listed():
    readme = (SCRIPTS / "README.md").read_text()
    for path in entry_points():
        rel = path.relative_to(SCRIPTS)
        module = "scripts." + ".".join(rel.with_suffix("").parts)
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        assert re.search(rf"python3? -m {re.escape(module)}\b", doc), (
            f"{rel}: the module docstring's usage line should read `python -m {module} ...`")
        assert 'if __name__ == "__main__":' in text, f"{rel}: importing it must not run it"
        assert f"`{rel.as_posix()}`" in readme, f"scripts/README.md does not list {rel}"
    for path in SCRIPTS.rglob("*.sh"):
        text = path.read_text()
        assert not re.search(r"python3?\s+[^-\s]\S*\.py", text), (
            f"{path.relative_to(ROOT)} runs a script by file path: use python -m scripts....")
        assert f"`{path.relative_to(SCRIPTS).as_posix()}`" in readme


NAME = re.compile(r"(h100|h200|cpu)_[a-z0-9]+(_[a-z0-9]+)*")


def test_results_follow_the_naming_scheme():
    results = ROOT / "benchmarks" / "results"
    bad = []
    for path in results.rglob("*"):
        if path.is_dir():
            continue
        parts = path.relative_to(results).parts
        if len(parts) < 2 or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", parts[0]):
            bad.append("/".join(parts))
            continue
        # a file <device>_<what>...<ext>, or a folder of that name holding a run's own files
        stem = parts[1] if len(parts) > 2 else parts[1].split(".", 1)[0]
        if not NAME.fullmatch(stem):
            bad.append("/".join(parts))
    assert not bad, (f"benchmarks/results: <YYYY-MM-DD>/<device>_<what>[_<variant>][_runN].<ext> "
                     f"(benchmarks/README.md), not {bad[:10]}")


# ----------------------------------------------------------------------------- time_ms
class Counter:
    """fn(x) -> x + 1 as a device array, counting calls (optionally sleeping `sleep_s`)."""

    def __init__(self, sleep_s: float = 0.0):
        self.calls, self.sleep_s = 0, sleep_s

    def __call__(self, x):
        self.calls += 1
        time.sleep(self.sleep_s)
        return jnp.asarray(x) + 1


def test_time_ms_counts_warmup_and_queued_calls():
    f = Counter()
    t = time_ms(f, np.float32(1), warmup=2, reps=3, calls=4)
    assert f.calls == 2 + 3 * 4
    assert t.calls == 4 and len(t.samples_ms) == 3
    assert t.ms == sorted(t.samples_ms)[1]  # the median of 3


def test_time_ms_is_milliseconds_per_call():
    t = time_ms(Counter(sleep_s=0.01), 0.0, warmup=0, reps=2, calls=2)
    assert 9.5 <= t.ms < 1000, t  # 10 ms of sleep per call: milliseconds, per call


def test_time_ms_sizes_samples_from_one_timed_call():
    f = Counter(sleep_s=0.005)
    t = time_ms(f, 0.0, warmup=1, reps=2, sample_ms=12, max_calls=50)
    assert 1 <= t.calls <= 2  # 12 ms / (>= 5 ms per call)
    assert f.calls == 1 + 1 + 2 * t.calls  # warm-up, the timed call, the samples
    f = Counter(sleep_s=0.005)
    t = time_ms(f, 0.0, warmup=0, reps=5, sample_ms=1, budget_ms=10)
    assert len(t.samples_ms) == 1  # 5 samples of >= 5 ms exceed 10 ms: one sample


def test_time_ms_rejects_bad_options():
    with pytest.raises(ValueError, match="reps >= 1"):
        time_ms(Counter(), 0.0, reps=0)
    with pytest.raises(ValueError, match="pass sample_ms"):
        time_ms(Counter(), 0.0, budget_ms=100)
