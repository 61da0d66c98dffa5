"""Training through context parallelism: on 4 fake CPU devices, the gradient of a next-token loss
of a tiny Llama w.r.t. its parameters with ring attention (sequence = 4) equals one device's
(dense prompts, packed rows, a sparse policy's layout), and the gradient w.r.t. q, k, v of
`prompt_attention` equals the unsplit XLA attention's. The cases run in a subprocess
(tests/context_parallel_grad_cases.py; the device count is fixed when JAX starts)."""

from __future__ import annotations


import pytest

from fake_devices import run_result

TOL = 1e-5  # float32, relative to the largest magnitude of each gradient


@pytest.fixture(scope="module")
def res() -> dict:
    return run_result(["-m", "tests.context_parallel_grad_cases"], devices=4)


@pytest.mark.parametrize("case", ["dense", "packed_dense", "streaming"])
def test_parameter_gradients_equal_one_device(res, case):
    got = res[case]
    assert got["grad_norm"] > 0.1, got  # a gradient that flows
    assert got["loss"] < TOL and got["grad"] < TOL, got


def test_sparse_gradient_is_not_the_dense_one(res):
    assert res["streaming_vs_dense"] > 1e-2, res


def test_qkv_gradients_equal_unsplit_attention(res):
    assert res["qkv"] < TOL, res
