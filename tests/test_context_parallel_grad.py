"""Training through context parallelism: on 4 fake CPU devices, the gradient of a next-token loss
of a tiny Llama w.r.t. its parameters with ring attention (sequence = 4) equals one device's
(dense prompts, packed rows, a sparse policy's layout), and the gradient w.r.t. q, k, v of
`prompt_attention` equals the unsplit XLA attention's. The cases run in a subprocess
(tests/context_parallel_grad_cases.py; the device count is fixed when JAX starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # float32, relative to the largest magnitude of each gradient


@pytest.fixture(scope="module")
def res() -> dict:
    flags = ("--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "tests.context_parallel_grad_cases"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("case", ["dense", "packed_dense", "streaming"])
def test_parameter_gradients_equal_one_device(res, case):
    got = res[case]
    assert got["grad_norm"] > 0.1, got  # a gradient that flows
    assert got["loss"] < TOL and got["grad"] < TOL, got


def test_sparse_gradient_is_not_the_dense_one(res):
    assert res["streaming_vs_dense"] > 1e-2, res


def test_qkv_gradients_equal_unsplit_attention(res):
    assert res["qkv"] < TOL, res
