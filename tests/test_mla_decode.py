"""`mla_decode` (absorbed MLA decode over a paged latent cache): reference vs float64 NumPy, and
the Pallas GPU (Triton) and TPU kernels in interpret mode vs the reference.

Random inputs, ragged lengths (0, 1, non-multiples of 64, full), pages out of order, unused
page-table slots holding invalid ids (-1: a kernel that reads them fails), poisoned outputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.mla_ops import mla_decode
from pallas_kernels.mla_reference import combine_splits, mla_decode_reference

PAGE = 64


def problem(seed, b=4, h=16, dc=128, dr=32, p_max=4, lengths=(1, 64, 130, 256), dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    n_pages = b * p_max + 3
    perm = rng.permutation(n_pages)
    table = np.full((b, p_max), -1, np.int32)
    lengths = np.asarray(lengths, np.int32)
    k = 0
    for i in range(b):
        need = -(-int(lengths[i]) // PAGE)
        table[i, :need] = perm[k:k + need]
        k += need
    cache = rng.standard_normal((n_pages, PAGE, dc + dr)).astype(np.float32)
    q_lat = rng.standard_normal((b, h, dc)).astype(np.float32)
    q_pe = rng.standard_normal((b, h, dr)).astype(np.float32)
    scale = float((dc // 4 + dr) ** -0.5)
    args = [jnp.asarray(x, dtype) for x in (q_lat, q_pe, cache)]
    return args + [jnp.asarray(table), jnp.asarray(lengths)], scale


def numpy_mla(q_lat, q_pe, cache, table, lengths, scale):
    q_lat, q_pe, cache = (np.asarray(x, np.float64) for x in (q_lat, q_pe, cache))
    b, h, dc = q_lat.shape
    out, lse = np.zeros((b, h, dc)), np.full((b, h), -np.inf)
    for i in range(b):
        n = int(lengths[i])
        if n == 0:
            continue
        kv = np.concatenate([cache[table[i, t // PAGE], t % PAGE][None] for t in range(n)])
        s = (q_lat[i] @ kv[:, :dc].T + q_pe[i] @ kv[:, dc:].T) * scale
        m = s.max(-1, keepdims=True)
        p = np.exp(s - m)
        out[i] = (p / p.sum(-1, keepdims=True)) @ kv[:, :dc]
        lse[i] = (m[:, 0] + np.log(p.sum(-1)))
    return out, lse


def check(out, lse, ref_out, ref_lse, tol):
    out, lse = np.asarray(out), np.asarray(lse)
    assert np.all(np.isfinite(out)), "unwritten or NaN output"
    err = np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out)
    assert err < tol, err
    fin = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse), fin)
    assert np.max(np.abs(lse[fin] - ref_lse[fin])) < tol * 10


def test_reference_matches_numpy_float64():
    args, scale = problem(0, lengths=(0, 1, 77, 200))
    out, lse = mla_decode_reference(*args, sm_scale=scale)
    check(out, lse, *numpy_mla(*args, scale), tol=1e-5)
    assert np.all(np.asarray(out)[0] == 0) and np.all(np.isneginf(np.asarray(lse)[0]))


def test_combine_splits_equals_unsplit():
    args, scale = problem(1)
    full = mla_decode_reference(*args, sm_scale=scale)
    q_lat, q_pe, cache, table, lengths = args
    parts = []  # split the KV sequence at page 2 by hand: first two pages, then the rest
    for lo, hi in ((0, 2), (2, 4)):
        lens = jnp.clip(lengths - lo * PAGE, 0, (hi - lo) * PAGE)
        parts.append(mla_decode_reference(q_lat, q_pe, cache, table[:, lo:hi], lens, scale))
    out, lse = combine_splits(jnp.stack([p[0] for p in parts], 1), jnp.stack([p[1] for p in parts], 1))
    check(out, lse, np.asarray(full[0], np.float64), np.asarray(full[1], np.float64), 1e-6)


@pytest.mark.parametrize("seed, h, dims, splits, lengths", [
    (2, 16, (128, 32), None, (1, 64, 130, 256)),
    (3, 5, (512, 64), 3, (0, 63, 65, 129)),   # head padding, DeepSeek dims, empty sequence
    (4, 32, (64, 8), 1, (200, 1, 17, 256)),   # Dr=8 padded, one split
])
def test_triton_kernel_interpret(seed, h, dims, splits, lengths):
    from pallas_kernels.gpu.mla_decode_triton import mla_decode_triton
    args, scale = problem(seed, h=h, dc=dims[0], dr=dims[1], lengths=lengths)
    out, lse = mla_decode_triton(*args, sm_scale=scale, num_splits=splits, interpret=True,
                                 poison_output=True)
    check(out, lse, *numpy_mla(*args, scale), tol=1e-5)


@pytest.mark.parametrize("seed, h, block_h, block_n, splits, lengths", [
    # two pages per softmax step: odd page counts overrun the table row (slots hold -1)
    (9, 40, 64, 128, 2, (0, 1, 65, 193)),
    (10, 7, 16, 256, None, (255, 129, 64, 3)),   # four pages per step, splits by default
    (11, 16, 16, 32, 3, (1, 31, 33, 250)),       # half-page tiles, splits not page-aligned
])
def test_triton_kernel_block_n_interpret(seed, h, block_h, block_n, splits, lengths):
    from pallas_kernels.gpu.mla_decode_triton import mla_decode_triton
    args, scale = problem(seed, h=h, dc=128, dr=32, lengths=lengths)
    out, lse = mla_decode_triton(*args, sm_scale=scale, num_splits=splits, block_h=block_h,
                                 block_n=block_n, interpret=True, poison_output=True)
    check(out, lse, *numpy_mla(*args, scale), tol=1e-5)
    with pytest.raises(ValueError, match="block_n"):
        mla_decode_triton(*args, sm_scale=scale, block_n=48, interpret=True)


def test_default_splits_fill_waves():
    from pallas_kernels.gpu.mla_decode_triton import default_block_h, default_num_splits
    assert [default_block_h(h) for h in (5, 16, 17, 32, 64, 128)] == [16, 16, 32, 32, 64, 64]
    for batch, head_blocks in ((64, 2), (64, 1), (3, 2), (1, 2), (7, 2)):
        s = default_num_splits(batch, head_blocks, 512, block_h=64)
        n = batch * head_blocks * s
        waves = -(-n // 132)
        assert n >= 0.9 * 132 and n / (waves * 132) >= 0.85, (batch, head_blocks, s)
    assert default_num_splits(64, 1, 512, block_h=16) == 5  # small blocks: ~2 waves
    assert default_num_splits(1, 1, 3, block_h=64) == 3  # never more splits than KV steps


@pytest.mark.parametrize("seed, h, dims, splits, lengths", [
    (5, 16, (128, 32), None, (1, 64, 130, 256)),
    (6, 8, (512, 64), 2, (0, 63, 65, 129)),
])
def test_tpu_kernel_interpret(seed, h, dims, splits, lengths):
    from pallas_kernels.tpu.mla_decode_tpu import mla_decode_tpu
    args, scale = problem(seed, h=h, dc=dims[0], dr=dims[1], lengths=lengths)
    out, lse = mla_decode_tpu(*args, sm_scale=scale, num_splits=splits,
                              interpret=pltpu.InterpretParams(uninitialized_memory="nan"))
    check(out, lse, *numpy_mla(*args, scale), tol=1e-5)


def test_bf16_cache_close_and_dispatch():
    args, scale = problem(7, dtype=jnp.bfloat16, lengths=(5, 100, 190, 256))
    ref = numpy_mla(*args, scale)
    out, lse = mla_decode(*args, scale, impl="triton", interpret=True)
    check(out, lse, *ref, tol=2e-2)
    out, lse = mla_decode(*args, scale, impl="auto")  # CPU: the reference
    check(out, lse, *ref, tol=2e-2)
    with pytest.raises(ValueError, match="impl"):
        mla_decode(*args, scale, impl="cuda")
    with pytest.raises(ValueError, match="cache"):
        mla_decode_reference(args[0], args[1], args[2][..., :-1], args[3], args[4], scale)


@pytest.mark.gpu
def test_triton_kernel_on_gpu():
    if jax.devices()[0].platform != "gpu":
        pytest.skip("needs a GPU (scripts/checks/check_mla_gpu.py runs the full check there)")
    from pallas_kernels.gpu.mla_decode_triton import mla_decode_triton
    args, scale = problem(8, h=16, dc=512, dr=64, lengths=(1, 64, 130, 256), dtype=jnp.bfloat16)
    out, lse = mla_decode_triton(*args, sm_scale=scale, poison_output=True)
    check(out, lse, *numpy_mla(*args, scale), tol=2e-2)
