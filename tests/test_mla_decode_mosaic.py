"""Pallas Mosaic GPU (sm90) MLA decode kernel.

As for the block-sparse Mosaic kernel (tests/test_block_sparse_mosaic.py), JAX 0.10.2's Mosaic
GPU interpreter cannot run ``run_state``: on the CPU the kernel is lowered for ``cuda`` (tracing,
the layouts of every op, shared-memory budget) and its validation is checked (which backend
runs: tests/test_backends.py). Numerics run on a GPU (the MLA GPU check script with
``--impls mosaic``, and the gpu-marked test).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gpu import mla_decode_mosaic as mosaic
from pallas_kernels.gpu.mla_decode_mosaic import MLADecodeMosaicConfig as Config
from pallas_kernels.mla_reference import mla_decode_reference


def _inputs(seed, b, h, dc, dr, lengths, p_max, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    need = -(-np.asarray(lengths) // 64)
    n_pages = int(need.sum()) + 3
    perm = rng.permutation(n_pages)
    table = np.full((b, p_max), -1, np.int32)
    k = 0
    for i in range(b):  # pages out of order, unused slots -1
        table[i, :need[i]] = perm[k:k + need[i]]
        k += need[i]
    ks = jax.random.split(jax.random.key(seed), 3)
    cache = jax.random.normal(ks[0], (n_pages, 64, dc + dr), jnp.float32).astype(dtype)
    q_lat = jax.random.normal(ks[1], (b, h, dc), jnp.float32).astype(dtype)
    q_pe = jax.random.normal(ks[2], (b, h, dr), jnp.float32).astype(dtype)
    return q_lat, q_pe, cache, jnp.asarray(table), jnp.asarray(lengths, jnp.int32)


def _lower(inputs, poison_output=False, **knobs):
    f = lambda *a: mosaic.mla_decode_mosaic(*a, sm_scale=0.1, config=Config(**knobs),  # noqa: E731
                                            poison_output=poison_output)
    return jax.jit(f).trace(*inputs).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("case", [
    dict(h=128, dc=512, dr=64, kw={}),  # DeepSeek-V3: 2 head blocks
    dict(h=16, dc=512, dr=64, kw=dict(poison_output=True)),  # heads padded to 64
    dict(h=5, dc=100, dr=8, kw=dict(num_splits=3)),  # dims padded, forced splits
    dict(h=128, dc=256, dr=64, kw=dict(num_stages=4)),  # TPLA g=2 shard, deeper ring
    dict(h=128, dc=512, dr=64, kw=dict(no_auto_barriers=True)),
    dict(h=128, dc=512, dr=64, kw=dict(schedule="seesaw")),
    dict(h=16, dc=100, dr=8, kw=dict(schedule="seesaw", poison_output=True, num_splits=2)),
    dict(h=128, dc=256, dr=64, kw=dict(pages_per_step=2)),  # TPLA shard, 2 pages per step
    # TPLA shard defaults (2 pages per step, no automatic barriers) and the earlier ones
    dict(h=128, dc=256, dr=64, kw=dict(poison_output=True)),
    dict(h=128, dc=256, dr=64, kw=dict(pages_per_step=1, no_auto_barriers=False)),
    dict(h=32, dc=100, dr=8, kw=dict(pages_per_step=2, schedule="seesaw", num_splits=3)),
    dict(h=128, dc=512, dr=64, kw=dict(split_cols=128)),  # consumer 1: chunks of 256 + 128
    dict(h=16, dc=512, dr=64, kw=dict(split_cols=192, poison_output=True)),
    # the earlier Dc = 512 default (now split_cols=192, no automatic barriers)
    dict(h=128, dc=512, dr=64, kw=dict(split_cols=256, no_auto_barriers=False,
                                       poison_output=True)),
])
def test_mla_mosaic_lowers_for_cuda(case):
    inputs = _inputs(0, 3, case["h"], case["dc"], case["dr"], (1, 700, 64), 12)
    assert "mosaic_gpu" in _lower(inputs, **case["kw"])


def test_mla_mosaic_rejects_what_it_does_not_take():
    inputs = _inputs(1, 2, 16, 512, 64, (5, 9), 2)
    f32 = (*inputs[:2], inputs[2].astype(jnp.float32), *inputs[3:])
    with pytest.raises(ValueError, match="bf16/f16"):
        _lower(f32)
    with pytest.raises(ValueError, match="num_stages"):
        Config(num_stages=1)
    with pytest.raises(ValueError, match="shared memory"):
        _lower(inputs, num_stages=3)  # 3 x 576-wide pages + Q do not fit in 227 KB
    pages32 = (*inputs[:2], inputs[2].reshape(-1, 32, 576), *inputs[3:])
    with pytest.raises(ValueError, match="pages of 64"):
        _lower(pages32)
    assert mosaic.unsupported(inputs[0], f32[2]) is not None
    assert mosaic.unsupported(inputs[0], pages32[2]) is not None
    assert mosaic.unsupported(inputs[0], inputs[2]) is None
    with pytest.raises(ValueError, match="pages_per_step"):
        Config(pages_per_step=3)
    with pytest.raises(ValueError, match="shared memory"):
        _lower(inputs, pages_per_step=2)  # two 576-wide pages per slot do not fit
    with pytest.raises(ValueError, match="split_cols"):
        Config(split_cols=100)  # not a multiple of 64
    with pytest.raises(ValueError, match="split_cols"):
        _lower(inputs, split_cols=512)  # consumer 1 would get no columns


def test_default_num_splits_fills_the_gpu():
    # B=64 x 2 head blocks = 128 CTAs on 132 SMs: one full wave without splitting.
    assert mosaic.default_num_splits(64, 2, 512, 132) == 1
    for b, hb in [(1, 2), (3, 1), (8, 2), (40, 2)]:
        s = mosaic.default_num_splits(b, hb, 512, 132)
        n = b * hb * s
        assert n >= 0.9 * 132 and -(-n // 132) <= 4, (b, hb, s)
    assert mosaic.default_num_splits(1, 1, 3, 132) == 3  # never more splits than pages


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="Mosaic GPU needs a Hopper GPU; the "
                    "CPU interpret mode of JAX 0.10.2 cannot run run_state (see module doc)")
@pytest.mark.parametrize("schedule", ["split", "seesaw", "split_cols128", "split_half_auto_barriers"])
@pytest.mark.parametrize("h, dc, lengths", [(128, 512, (0, 1, 63, 4097)), (16, 512, (64, 65, 2)),
                                            (128, 256, (3000, 1, 129, 8191))])
def test_mla_mosaic_compiled_matches_reference(h, dc, lengths, schedule):
    seed = int(np.random.default_rng().integers(2**31))
    inputs = _inputs(seed, len(lengths), h, dc, 64, lengths, 128)
    kw = {"split_cols128": dict(schedule="split", split_cols=128),
          # the earlier Dc = 512 default (now: 192 columns, no automatic barriers)
          "split_half_auto_barriers": dict(schedule="split", split_cols=dc // 2,
                                           no_auto_barriers=False),
          }.get(schedule, dict(schedule=schedule))
    out, lse = mosaic.mla_decode_mosaic(*inputs, sm_scale=0.07, poison_output=True,
                                        config=Config(**kw))
    up = [x.astype(jnp.float32) if x.dtype != jnp.int32 else x for x in inputs]
    ref_out, ref_lse = mla_decode_reference(*up, 0.07)
    out, lse, ref_out, ref_lse = map(np.asarray, (out, lse, ref_out, ref_lse))
    assert np.all(np.isfinite(out))
    assert np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out) < 2e-2
    assert np.array_equal(np.isfinite(lse), np.isfinite(ref_lse))
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], atol=5e-2)
