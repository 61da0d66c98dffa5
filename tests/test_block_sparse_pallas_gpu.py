"""Pallas GPU (Triton lowering) block-sparse kernel: interpret mode on the CPU against float64
NumPy, outputs poisoned with NaN; plus a compiled run when a GPU is present (marked ``gpu``)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import BlockSparseLayout, SegmentIds
from pallas_kernels.gpu.block_sparse_triton import block_sparse_attention_triton
from pallas_kernels.testing import assert_close, random_problem


def _run(p, **kw):
    lay = BlockSparseLayout.from_block_mask(p.block_mask, p.block_q, p.block_k)
    seg = None if p.seg_q is None else SegmentIds(jnp.asarray(p.seg_q), jnp.asarray(p.seg_kv))
    return block_sparse_attention_triton(
        jnp.asarray(p.q), jnp.asarray(p.k), jnp.asarray(p.v), lay, causal=p.causal,
        q_offset=jnp.asarray(p.q_offset), segment_ids=seg, **kw)


interp = functools.partial(_run, interpret=True, poison_output=True)


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    sq=st.sampled_from([77, 40, 1, 64, 130]),
    sk=st.sampled_from([77, 50, 64, 130]),
    heads=st.sampled_from([(1, 1), (4, 1), (8, 1), (8, 2), (6, 2)]),
    dims=st.sampled_from([(32, 32), (192, 128), (16, 48)]),
    blocks=st.sampled_from([(16, 32), (32, 16), (32, 32)]),
    per_kv_head=st.booleans(),
    causal=st.booleans(),
    q_offset=st.sampled_from([0, "chunk", "random"]),
    segments=st.booleans(),
    bf16=st.booleans(),
    block_m=st.sampled_from([16, 64]),
    pack_gqa=st.sampled_from([None, True, False]),
)
def test_gpu_kernel_interpret_matches_numpy(seed, sq, sk, heads, dims, blocks, per_kv_head,
                                            causal, q_offset, segments, bf16, block_m, pack_gqa):
    p = random_problem(seed, B=2, Sq=sq, Sk=sk, Hq=heads[0], Hkv=heads[1], Dqk=dims[0],
                       Dv=dims[1], block_q=blocks[0], block_k=blocks[1],
                       per_kv_head=per_kv_head, density=0.6, causal=causal,
                       q_offset=q_offset, segments=segments,
                       dtype=jnp.bfloat16 if bf16 else np.float32)
    out, lse = interp(p, block_m=block_m, pack_gqa=pack_gqa)
    assert_close(out, lse, *p.reference(), low_precision=bf16)


@pytest.mark.parametrize("pack_gqa", [True, False])
def test_gpu_kernel_interpret_block_128_gqa_packing(pack_gqa):
    # Per-KV-head layout, G = 4: packed programs hold 32 positions x 4 heads = 128 rows.
    p = random_problem(4, B=1, Sq=256, Sk=320, Hq=4, Hkv=1, Dqk=128, Dv=128, block_q=128,
                       block_k=128, density=0.7, empty_row_frac=0.0, q_offset="chunk",
                       dtype=jnp.bfloat16)
    out, lse = interp(p, block_m=128, pack_gqa=pack_gqa)
    assert_close(out, lse, *p.reference(), low_precision=True)


def test_gpu_kernel_interpret_dispatch_and_bad_blocks():
    from pallas_kernels.testing import run_problem
    p = random_problem(9, B=1, Sq=64, Sk=64, Hq=2, Hkv=1, block_q=16, block_k=16)
    out, lse = run_problem(p, "triton", interpret=True)
    assert_close(out, lse, *p.reference(), low_precision=False)
    bad = random_problem(9, B=1, Sq=48, Sk=48, Hq=2, Hkv=1, block_q=24, block_k=24)
    with pytest.raises(ValueError, match="power-of-two"):
        interp(bad)


def test_gpu_kernel_f32_dot_choice():
    # float32, D=128: the default picks 64-row programs and three-TF32 dots on a GPU; interpret
    # mode multiplies exactly whatever f32_dot says (CPUs have no TF32), so every choice must
    # match float64 at float32 tolerance here; an unknown choice is refused by name.
    p = random_problem(5, B=1, Sq=200, Sk=200, Hq=4, Hkv=2, Dqk=128, Dv=128, block_q=64,
                       block_k=64, density=0.7, dtype=np.float32)
    for f32_dot in ("tf32x3", "tf32", "ieee"):
        out, lse = interp(p, f32_dot=f32_dot)
        assert_close(out, lse, *p.reference(), low_precision=False)
    with pytest.raises(ValueError, match="f32_dot must be one of"):
        interp(p, f32_dot="fp64")


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (see "
                    "scripts/checks/check_kernels_gpu.py for the full GPU check)")
def test_gpu_kernel_compiled_matches_numpy():
    for per_kv_head in (True, False):
        p = random_problem(1, B=2, Sq=1000, Sk=1000, Hq=8, Hkv=2, Dqk=128, Dv=128,
                           block_q=128, block_k=64, per_kv_head=per_kv_head, density=0.5,
                           segments=True, dtype=jnp.bfloat16)
        out, lse = _run(p, poison_output=True)
        assert_close(out, lse, *p.reference(), low_precision=True)
    # float32 with the default three-TF32 dots keeps float32 accuracy (64-row programs, D=128).
    p = random_problem(2, B=1, Sq=515, Sk=515, Hq=8, Hkv=2, Dqk=128, Dv=128, block_q=128,
                       block_k=128, density=0.5, dtype=np.float32)
    out, lse = _run(p, poison_output=True)
    assert_close(out, lse, *p.reference(), low_precision=False)
