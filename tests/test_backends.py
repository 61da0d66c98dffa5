"""One resolver per op: which implementation runs a call, and why (device, dtype, head dims,
layout features, gradients). Device facts are monkeypatched, so every branch runs on a CPU."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprefill.attention import dispatch
from jaxprefill.sparse.estimation import Estimation
from pallas_kernels import BlockSparseLayout, backends, block_sparse_backend, mla_decode_backend
from pallas_kernels import estimation
from pallas_kernels.gpu import mosaic_common


@pytest.fixture
def device(monkeypatch):
    """device(platform, hopper=False): pretend the default device is that one."""
    def set_device(platform: str, hopper: bool = False) -> None:
        monkeypatch.setattr(backends, "platform", lambda: platform)
        monkeypatch.setattr(mosaic_common, "is_hopper", lambda: hopper)
    return set_device


def _qkv(s=256, d=128, dv=None, dtype=jnp.bfloat16, hq=4, hkv=2):
    # Shapes and dtypes only: resolvers never read values.
    return (jnp.zeros((1, s, hq, d), dtype), jnp.zeros((1, s, hkv, d), dtype),
            jnp.zeros((1, s, hkv, dv or d), dtype))


def _layout(s=256, block=128, columns=False):
    lay = BlockSparseLayout.dense(1, 2, s, s, block, block)
    if columns:
        lay = dataclasses.replace(lay, col_idx=jnp.zeros(lay.kv_cnt.shape + (1,), jnp.int32),
                                  col_cnt=jnp.ones_like(lay.kv_cnt))
    return lay


def test_block_sparse_auto_takes_the_first_backend_that_runs_the_call(device):
    q, k, v = _qkv()
    device("gpu", hopper=True)
    assert block_sparse_backend(q, k, v, _layout()) == "mosaic_gpu"
    # key columns: Mosaic GPU over the blocks, Triton over the columns, merged outside both
    assert block_sparse_backend(q, k, v, _layout(columns=True)) == "mosaic_gpu"
    assert block_sparse_backend(q, k, v, _layout(), blasst_threshold=1e-4) == "triton"
    assert block_sparse_backend(q, k, v, _layout(block=64)) == "triton"  # block_q % 128
    q32, k32, v32 = _qkv(dtype=jnp.float32)
    assert block_sparse_backend(q32, k32, v32, _layout()) == "triton"  # three TF32 products
    q32, k32, v32 = _qkv(d=192, dv=128, dtype=jnp.float32)
    assert block_sparse_backend(q32, k32, v32, _layout()) == "xla"  # float32 tiles too big
    device("gpu", hopper=False)
    assert block_sparse_backend(q, k, v, _layout()) == "triton"
    device("tpu")
    assert block_sparse_backend(q, k, v, _layout()) == "mosaic_tpu"
    device("cpu")
    assert block_sparse_backend(q, k, v, _layout()) == "xla"


def test_a_named_backend_that_cannot_run_the_call_raises_with_its_reason(device):
    q, k, v = _qkv()
    device("gpu", hopper=True)
    assert block_sparse_backend(q, k, v, _layout(columns=True), impl="mosaic_gpu") == "mosaic_gpu"
    with pytest.raises(ValueError, match="needs bf16/f16"):
        block_sparse_backend(*_qkv(dtype=jnp.float32), _layout(), impl="mosaic_gpu")
    with pytest.raises(ValueError, match="BLASST"):
        block_sparse_backend(q, k, v, _layout(), impl="mosaic_gpu", blasst_threshold=0.1)
    device("cpu")
    with pytest.raises(ValueError, match="runs on gpu, not cpu"):
        block_sparse_backend(q, k, v, _layout(), impl="triton")
    assert block_sparse_backend(q, k, v, _layout(), impl="triton", interpret=True) == "triton"
    assert block_sparse_backend(q, k, v, _layout(), impl="reference") == "reference"
    with pytest.raises(ValueError, match="unknown impl 'pallas_gpu'"):
        block_sparse_backend(q, k, v, _layout(), impl="pallas_gpu")


def test_estimation_backends_follow_the_kernel_shapes(device):
    device("gpu", hopper=True)
    assert estimation.estimation_backend("last_query_sums", rows=64) == "triton"
    assert estimation.estimation_backend("last_query_sums", rows=100) == "xla"  # not 2^k
    assert estimation.estimation_backend("pooled_block_scores", cell=8) == "triton"
    assert estimation.estimation_backend("pooled_block_scores", cell=None) == "xla"
    # cells of 128 rows: the kernel takes them (named, strict), "auto" leaves them to XLA
    assert estimation.estimation_backend("pooled_block_scores", cell=128) == "xla"
    assert estimation.estimation_backend("pooled_block_scores", cell=128, impl="triton",
                                         strict=True) == "triton"
    # mass cut: rows in registers up to 16384 entries, then the wide kernel; "auto" gives it
    # rows of up to 32768 (measured: wider rows go faster on XLA's passes), named up to 2^20
    assert estimation.estimation_backend("mass_cut", columns=16384) == "triton"
    assert estimation.estimation_backend("mass_cut", columns=16385) == "triton"
    assert estimation.estimation_backend("mass_cut", columns=32768, rows=18) == "triton"
    assert estimation.estimation_backend("mass_cut", columns=32769) == "xla"
    assert estimation.estimation_backend("mass_cut", columns=65536, rows=9) == "xla"
    assert estimation.estimation_backend("mass_cut", columns=1 << 20, rows=32, impl="triton",
                                         strict=True) == "triton"
    assert estimation.estimation_backend("mass_cut", columns=(1 << 20) + 1) == "xla"
    # many rows beyond what stays in L2 (400 x 32768 floats: 50 MiB): "auto" keeps XLA
    assert estimation.estimation_backend("mass_cut", columns=32768, rows=320) == "triton"
    assert estimation.estimation_backend("mass_cut", columns=32768, rows=400) == "xla"
    assert estimation.estimation_backend("mass_cut", columns=16384, rows=4096) == "triton"
    with pytest.raises(ValueError, match="exceed"):
        estimation.estimation_backend("mass_cut", columns=(1 << 20) + 1, impl="triton",
                                      strict=True)
    # a named kernel runs the ops whose shapes it takes; the others run on XLA, unless strict
    assert estimation.estimation_backend("last_query_sums", rows=100, impl="triton") == "xla"
    with pytest.raises(ValueError, match="power of two"):
        estimation.estimation_backend("last_query_sums", rows=100, impl="triton", strict=True)
    device("tpu")  # the TPU kernels are opt-in
    assert estimation.estimation_backend("mass_cut", columns=64) == "xla"
    assert estimation.estimation_backend("mass_cut", columns=64, impl="mosaic_tpu") == "mosaic_tpu"
    assert estimation.estimation_backend("mass_cut", columns=65536, impl="mosaic_tpu") == "xla"
    device("cpu")
    assert estimation.estimation_backend("mass_cut", columns=64) == "xla"
    assert estimation.estimation_backend("mass_cut", columns=64, impl="triton",
                                         interpret=True) == "triton"
    with pytest.raises(ValueError, match="reference"):
        estimation.estimation_backend("pooled_block_scores", cell=8, impl="reference",
                                      strict=True)
    with pytest.raises(ValueError, match="runs on gpu, not cpu"):  # the device is never skipped
        estimation.estimation_backend("mass_cut", columns=64, impl="triton")


def test_top_positions_kernels_are_opt_in_until_timed(device):
    """The key-column top-k: "auto" keeps XLA's two-level lax.top_k on every device (the
    kernel is not timed against it yet); a named kernel runs it, for any row length."""
    top = lambda **kw: estimation.estimation_backend("top_positions", rows=9, **kw)  # noqa: E731
    device("gpu", hopper=True)
    assert top(columns=32768) == "xla"
    assert top(columns=1 << 20, impl="triton") == "triton"
    assert Estimation("triton").backend("top_positions", rows=9, columns=32768) == "triton"
    device("tpu")
    assert top(columns=32768) == "xla"
    assert top(columns=1 << 20, impl="mosaic_tpu") == "mosaic_tpu"
    device("cpu")
    assert top(columns=32768) == "xla"
    assert top(columns=32768, impl="reference") == "reference"


def test_weighted_mass_cuts_run_on_gpu_kernels_and_on_xla_on_tpus(device):
    cut = lambda **kw: estimation.estimation_backend("mass_cut", weighted=True, **kw)  # noqa: E731
    device("gpu", hopper=True)
    assert cut(columns=999, rows=32) == "triton"
    assert cut(columns=999, rows=32, impl="triton", strict=True) == "triton"
    # weighted, the wide kernel re-reads s and weight: twice the bytes against the L2 bound
    assert cut(columns=32768, rows=160) == "triton"  # 40 MiB
    assert cut(columns=32768, rows=161) == "xla"
    # FlexPrefill's chunk rows at 128K: 1024 prefix + 128 x 1024 scores, XLA's (measured)
    chunk = dict(columns=1024 + (128 << 10))
    assert cut(rows=32, **chunk) == "xla"
    assert cut(rows=32, impl="triton", strict=True, **chunk) == "triton"  # named: it runs
    device("tpu")  # the TPU kernel takes no weights: XLA, named or not; strict names why
    assert cut(columns=64) == "xla"
    assert cut(columns=64, impl="mosaic_tpu") == "xla"
    assert estimation.estimation_backend("mass_cut", columns=64, impl="mosaic_tpu") == "mosaic_tpu"
    with pytest.raises(ValueError, match="mosaic_tpu.*takes no weights"):
        cut(columns=64, impl="mosaic_tpu", strict=True)
    assert cut(columns=64, impl="reference") == "reference"
    device("cpu")
    assert cut(columns=64) == "xla"
    assert cut(columns=64, impl="triton", interpret=True) == "triton"
    assert cut(columns=64, impl="mosaic_tpu", interpret=True) == "xla"
    # Estimation.backend forwards the sizes, weighted included
    assert Estimation("mosaic_tpu", interpret=True).backend("mass_cut", columns=64,
                                                            weighted=True) == "xla"
    assert Estimation("triton", interpret=True).backend("mass_cut", columns=64,
                                                        weighted=True) == "triton"


def test_mla_decode_backends(device):
    q_lat = jnp.zeros((2, 128, 512), jnp.bfloat16)
    cache = jnp.zeros((4, 64, 576), jnp.bfloat16)
    device("gpu", hopper=True)
    assert mla_decode_backend(q_lat, cache) == "mosaic_gpu"
    # float32 caches: the reference (the Triton tiles overflow at 128 heads; XLA was faster at 16)
    assert mla_decode_backend(q_lat.astype(jnp.float32), cache.astype(jnp.float32)) == "reference"
    assert mla_decode_backend(q_lat, cache[:, :32]) == "triton"  # pages of 32 tokens
    device("gpu", hopper=False)
    assert mla_decode_backend(q_lat, cache) == "triton"
    device("tpu")
    assert mla_decode_backend(q_lat, cache) == "mosaic_tpu"
    device("cpu")
    assert mla_decode_backend(q_lat, cache) == "reference"


@pytest.mark.parametrize("hopper", [True, False])
def test_attention_backends_on_gpus(device, hopper):
    device("gpu", hopper=hopper)
    bf16 = lambda s, d: jnp.zeros((1, s, 4, d), jnp.bfloat16)  # noqa: E731
    f32 = lambda s, d: jnp.zeros((1, s, 4, d), jnp.float32)  # noqa: E731
    pick = dispatch.attention_backend
    assert pick(bf16(256, 128), 128, simple=True) == "cudnn"
    assert pick(bf16(256, 192), 128, simple=True) == "block_sparse"  # MLA prefill: 192 / 128
    assert pick(bf16(256, 128), 128, simple=False) == "block_sparse"  # chunk / packed row
    assert pick(bf16(1, 128), 128, simple=False) == "xla"  # decode
    assert pick(bf16(16, 192), 128, simple=True) == "xla"  # too few queries
    assert pick(bf16(256, 128), 128, simple=False, differentiable=True) == "cudnn"  # training
    assert pick(bf16(256, 128), 128, simple=False, window=64) == "xla"
    # float32: the block-sparse kernel (three TF32 products, O(S) memory) on Hopper only
    expect = "block_sparse" if hopper else "xla"
    assert pick(f32(256, 64), 64, simple=True) == expect
    assert pick(f32(256, 128), 128, simple=False) == expect
    assert pick(f32(256, 192), 128, simple=True) == "xla"
    assert pick(f32(32, 64), 64, simple=True) == "xla"
    with pytest.raises(ValueError, match="no backward pass"):
        pick(bf16(256, 128), 128, simple=False, impl="block_sparse", differentiable=True)


def test_long_calls_off_gpus_run_in_bounded_memory(device, monkeypatch):
    """Off GPUs XLA materializes the float32 scores: past XLA_SCORES_LIMIT "auto" takes the
    block-sparse kernel (O(S) memory), with the same output."""
    device("cpu")
    long = jax.ShapeDtypeStruct((8, 8192, 9, 64), jnp.bfloat16)  # 19.3 GB of scores
    assert dispatch.attention_backend(long, 64, simple=True) == "block_sparse"
    assert dispatch.attention_backend(long, 64, simple=False) == "block_sparse"
    chunk = jax.ShapeDtypeStruct((1, 256, 9, 64), jnp.bfloat16)
    assert dispatch.attention_backend(chunk, 64, simple=False, sk=262144) == "block_sparse"
    assert dispatch.attention_backend(chunk, 64, simple=False, sk=4096) == "xla"
    decode = jax.ShapeDtypeStruct((64, 1, 9, 64), jnp.bfloat16)
    assert dispatch.attention_backend(decode, 64, simple=False, sk=1 << 22) == "xla"

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 200, h, 32)), jnp.float32)
               for h in (4, 2, 2))
    want = dispatch.attend(q, k, v)
    monkeypatch.setattr(dispatch, "XLA_SCORES_LIMIT", 1024)
    assert dispatch.attention_backend(q, 32, simple=True) == "block_sparse"
    got = dispatch.attend(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_attention_backends_off_gpus(device):
    device("cpu")
    q = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
    assert dispatch.attention_backend(q, 64, simple=True) == "xla"
    assert dispatch.attention_backend(q, 64, simple=False) == "xla"
    assert dispatch.attention_backend(q, 64, simple=False, impl="block_sparse") == "block_sparse"
    with pytest.raises(ValueError, match="runs on gpu"):
        dispatch.attention_backend(q, 64, simple=True, impl="cudnn")
    assert np.all(backends.explain(dispatch.BACKENDS_SIMPLE,
                                   dispatch.AttentionCall(q, 64, True, None, False))["xla"]
                  == "runs")
