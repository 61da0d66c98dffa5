"""Pallas Mosaic GPU (sm90) block-sparse kernel.

On the CPU the kernel cannot run: JAX 0.10.2's Mosaic GPU interpret mode
(``jax._src.pallas.mosaic_gpu.interpret``) has no rule for ``run_state``, which the kernel needs
to hand the PV accumulator to wgmma (``NotImplementedError: Higher-order primitive run_state``).
The CPU tests therefore lower the kernel to Mosaic GPU for the ``cuda`` platform (tracing, the
layouts of every op and the shared-memory budget are checked; no GPU is needed) and check the
argument validation. Numerical equivalence runs on a GPU (marked ``gpu``; full check:
``scripts/checks/check_kernels_gpu.py --impls mosaic``).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BlockSparseLayout, SegmentIds, block_sparse_attention
from pallas_kernels.gpu.block_sparse_mosaic import (BlockSparseMosaicConfig,
                                                    block_sparse_attention_mosaic, unsupported)
from pallas_kernels.testing import assert_close, random_problem


def _args(p):
    lay = BlockSparseLayout.from_block_mask(p.block_mask, p.block_q, p.block_k)
    seg = None if p.seg_q is None else SegmentIds(jnp.asarray(p.seg_q), jnp.asarray(p.seg_kv))
    return (jnp.asarray(p.q), jnp.asarray(p.k), jnp.asarray(p.v), lay,
            jnp.asarray(p.q_offset), seg)


def _lower(p, **kw):
    def f(q, k, v, lay, off, seg):
        return block_sparse_attention_mosaic(q, k, v, lay, causal=p.causal, q_offset=off,
                                             segment_ids=seg, **kw)
    return jax.jit(f).trace(*_args(p)).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("case", [
    dict(Dqk=128, Dv=128, block_k=128, segments=False, poison=False),
    dict(Dqk=192, Dv=128, block_k=128, segments=True, poison=True),  # MLA: output over Q smem
    dict(Dqk=80, Dv=48, block_k=64, segments=False, poison=True),  # padded head dims
    dict(Dqk=64, Dv=128, block_k=64, segments=True, poison=False),  # Dv > Dqk: separate O
    dict(Dqk=128, Dv=128, block_k=128, segments=True, poison=False,
         config=BlockSparseMosaicConfig(persistent=True)),  # persistent grid, 4 producer warps
    dict(Dqk=192, Dv=128, block_k=128, segments=True, poison=True,
         config=BlockSparseMosaicConfig(order="heads")),
    dict(Dqk=128, Dv=128, block_k=128, segments=False, poison=False,
         config=BlockSparseMosaicConfig(num_stages=3)),
])
def test_mosaic_kernel_lowers_for_cuda(case):
    p = random_problem(1, B=2, Sq=300, Sk=333, Hq=4, Hkv=2, Dqk=case["Dqk"], Dv=case["Dv"],
                       block_q=256, block_k=case["block_k"], segments=case["segments"],
                       q_offset="random", dtype=jnp.bfloat16)
    extra = {"config": case["config"]} if "config" in case else {}
    text = _lower(p, poison_output=case["poison"], **extra).as_text()
    assert "mosaic_gpu" in text


def test_mosaic_config_rejects_unknown_knobs():
    with pytest.raises(ValueError, match="num_stages"):
        BlockSparseMosaicConfig(num_stages=5)
    with pytest.raises(ValueError, match="order"):
        BlockSparseMosaicConfig(order="tiles")


def test_mosaic_kernel_rejects_what_it_does_not_take():
    p = random_problem(2, B=1, Sq=128, Sk=128, Hq=2, Hkv=1, Dqk=64, Dv=64, block_q=64,
                       block_k=64, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="block_q % 128"):
        _lower(p)
    p = random_problem(2, B=1, Sq=128, Sk=128, Hq=2, Hkv=1, Dqk=64, Dv=64, block_q=128,
                       block_k=128, dtype=np.float32)
    with pytest.raises(ValueError, match="bf16/f16"):
        _lower(p)
    p = random_problem(2, B=1, Sq=128, Sk=128, Hq=2, Hkv=1, Dqk=512, Dv=512, block_q=128,
                       block_k=128, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="shared memory"):
        _lower(p)


def test_mosaic_kernel_rejects_columns():
    p = random_problem(3, B=1, Sq=128, Sk=128, Hq=2, Hkv=1, Dqk=64, Dv=64, block_q=128,
                       block_k=128, dtype=jnp.bfloat16)
    q, k, v, lay, off, _ = _args(p)

    with_cols = dataclasses.replace(lay, col_idx=jnp.zeros(lay.kv_cnt.shape + (1,), jnp.int32),
                                    col_cnt=jnp.ones_like(lay.kv_cnt))
    with pytest.raises(ValueError, match="columns"):
        block_sparse_attention_mosaic(q, k, v, with_cols, q_offset=off)
    with pytest.raises(ValueError, match="BLASST"):
        block_sparse_attention(q, k, v, lay, blasst_threshold=0.5, impl="mosaic_gpu",
                               interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="Mosaic GPU needs a Hopper GPU; the "
                    "CPU interpret mode of JAX 0.10.2 cannot run run_state (see module doc)")
@pytest.mark.parametrize("kw", [
    dict(Sq=1000, Sk=1000, Hq=8, Hkv=2, Dqk=128, Dv=128, segments=True),
    dict(Sq=300, Sk=1000, Hq=8, Hkv=2, Dqk=128, Dv=128, q_offset="chunk", per_kv_head=False),
    dict(Sq=777, Sk=777, Hq=4, Hkv=4, Dqk=192, Dv=128),
    dict(Sq=512, Sk=640, Hq=8, Hkv=1, Dqk=64, Dv=64, causal=False, block_k=64),
])
def test_mosaic_kernel_compiled_matches_numpy(kw):
    kw = dict(kw)
    p = random_problem(int(np.random.default_rng().integers(2**31)), B=2, block_q=128,
                       block_k=kw.pop("block_k", 128), dtype=jnp.bfloat16, **kw)
    q, k, v, lay, off, seg = _args(p)
    out, lse = block_sparse_attention_mosaic(q, k, v, lay, causal=p.causal, q_offset=off,
                                             segment_ids=seg, poison_output=True)
    assert_close(out, lse, *p.reference(), low_precision=True)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="Mosaic GPU needs a Hopper GPU")
@pytest.mark.parametrize("config", [BlockSparseMosaicConfig(persistent=True),
                                    BlockSparseMosaicConfig(order="heads"),
                                    BlockSparseMosaicConfig(num_stages=3)], ids=str)
@pytest.mark.parametrize("case", [
    dict(Sq=1000, Sk=1000, Hq=8, Hkv=2, Dqk=128, Dv=128, segments=True),
    dict(Sq=300, Sk=1000, Hq=8, Hkv=2, Dqk=128, Dv=128, q_offset="chunk", per_kv_head=False),
    dict(Sq=777, Sk=777, Hq=4, Hkv=4, Dqk=192, Dv=128),
])
def test_mosaic_configs_compiled_match_numpy(config, case):
    if config.num_stages == 3 and case["Dqk"] == 192:
        pytest.skip("three stages of 192-wide K tiles exceed shared memory")
    p = random_problem(int(np.random.default_rng().integers(2**31)), B=2, block_q=128,
                       block_k=128, dtype=jnp.bfloat16, **case)
    q, k, v, lay, off, seg = _args(p)
    out, lse = block_sparse_attention_mosaic(q, k, v, lay, causal=p.causal, q_offset=off,
                                             segment_ids=seg, poison_output=True, config=config)
    assert_close(out, lse, *p.reference(), low_precision=True)


def test_mosaic_unsupported_matches_what_the_kernel_takes():
    from pallas_kernels.gpu.mosaic_common import is_hopper

    def supports(*args):
        return unsupported(*args) is None

    ok = random_problem(5, B=1, Sq=256, Sk=256, Hq=2, Hkv=1, Dqk=192, Dv=128, block_q=128,
                        block_k=128, dtype=jnp.bfloat16)
    q, k, v, lay, _, _ = _args(ok)
    assert supports(q, k, v, lay)
    assert not supports(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), lay)
    small = random_problem(5, B=1, Sq=256, Sk=256, Hq=2, Hkv=1, block_q=64, block_k=64,
                           dtype=jnp.bfloat16)
    assert not supports(*_args(small)[:4])
    cols = dataclasses.replace(lay, col_idx=jnp.zeros(lay.kv_cnt.shape + (1,), jnp.int32),
                               col_cnt=jnp.ones_like(lay.kv_cnt))
    assert not supports(q, k, v, cols)
    if jax.default_backend() == "cpu":
        assert not is_hopper()
