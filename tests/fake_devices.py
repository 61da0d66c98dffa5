"""Run test code on N fake CPU devices: JAX fixes its device count when it starts, so multi-device
cases run in a subprocess and report one ``RESULT`` line of JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Low XLA/LLVM optimization: compiles faster; every mesh of a case runs with the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def fake_device_env(devices: int, fast_compile: bool = True) -> dict[str, str]:
    """The environment of a subprocess that sees ``devices`` CPU devices."""
    flags = f"--xla_force_host_platform_device_count={devices}"
    return dict(os.environ, XLA_FLAGS=f"{flags} {FAST_COMPILE}" if fast_compile else flags,
                JAX_PLATFORMS="cpu")


def run_result(argv: list[str], devices: int, fast_compile: bool = True,
               timeout: int = 600) -> dict:
    """Runs ``python *argv`` (``["-c", SCRIPT, ...]`` or ``["-m", module, ...]``) from the
    repository root on ``devices`` fake CPU devices; returns the JSON of its ``RESULT`` line.
    A failing run fails the test with the end of its stderr."""
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=fake_device_env(devices,
                          fast_compile), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])
