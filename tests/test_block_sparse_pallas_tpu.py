"""Pallas TPU block-sparse kernel in TPU interpret mode (CPU), against float64 NumPy.

Interpret mode simulates VMEM/SMEM and DMAs and fills uninitialized memory with NaN, so an
output element the kernel never writes shows up as NaN (checked by ``assert_close``).
"""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as mosaic_interpret
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.testing import assert_close, random_problem, run_problem


def _interp(**kw):
    return pltpu.InterpretParams(uninitialized_memory="nan", **kw)


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    sq=st.sampled_from([77, 40, 1, 64]),
    sk=st.sampled_from([77, 50, 64]),
    heads=st.sampled_from([(1, 1), (4, 1), (8, 1), (4, 2)]),
    dims=st.sampled_from([(32, 32), (192, 128)]),
    blocks=st.sampled_from([(16, 32), (32, 16)]),
    per_kv_head=st.booleans(),
    causal=st.booleans(),
    q_offset=st.sampled_from([0, "chunk", "random"]),
    segments=st.booleans(),
    bf16=st.booleans(),
)
def test_tpu_kernel_interpret_matches_numpy(seed, sq, sk, heads, dims, blocks, per_kv_head,
                                            causal, q_offset, segments, bf16):
    p = random_problem(seed, B=1, Sq=sq, Sk=sk, Hq=heads[0], Hkv=heads[1], Dqk=dims[0],
                       Dv=dims[1], block_q=blocks[0], block_k=blocks[1],
                       per_kv_head=per_kv_head, density=0.6, causal=causal,
                       q_offset=q_offset, segments=segments,
                       dtype=jnp.bfloat16 if bf16 else np.float32)
    out, lse = run_problem(p, "mosaic_tpu", interpret=_interp())
    assert_close(out, lse, *p.reference(), low_precision=bf16)


def test_tpu_kernel_race_detection_two_cores_batch2():
    p = random_problem(11, B=2, Sq=48, Sk=64, Hq=4, Hkv=2, Dqk=32, Dv=16, block_q=16,
                       block_k=16, per_kv_head=False, density=0.5, q_offset="chunk",
                       segments=True)
    out, lse = run_problem(p, "mosaic_tpu",
                           interpret=_interp(detect_races=True, num_cores_or_threads=2))
    assert mosaic_interpret.races is not None
    assert not mosaic_interpret.races.races_found
    assert_close(out, lse, *p.reference(), low_precision=False)


def test_tpu_kernel_block_128_dense_and_sparse():
    for density in (1.0, 0.5):
        p = random_problem(2, B=1, Sq=256, Sk=384, Hq=2, Hkv=1, Dqk=128, Dv=128, block_q=128,
                           block_k=128, density=density, empty_row_frac=0.0, q_offset="chunk",
                           dtype=jnp.bfloat16)
        out, lse = run_problem(p, "mosaic_tpu", interpret=_interp())
        assert_close(out, lse, *p.reference(), low_precision=True)
