"""Context parallelism on one device: the zigzag assignment, the online-softmax combine, the
ring's step layouts (dense and sparse, with skipped steps) run as virtual devices, the
pass-KV / pass-Q rule, and the settings' validation. Multi-device runs:
tests/test_context_parallel_mesh.py."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprefill as jp
from jaxprefill import sparse
from jaxprefill.attention import AttentionSpec, attend
from jaxprefill.parallel import ContextParallel, choose_schedule, plan, ring, rows, zigzag
from jaxprefill.sparse import Prefill


def qkv(b=1, s=256, hq=4, hkv=2, d=16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (b, s, hq, d)), jax.random.normal(keys[1], (b, s, hkv, d)),
            jax.random.normal(keys[2], (b, s, hkv, d)))


# ----------------------------------------------------------------------------- zigzag
@pytest.mark.parametrize("n", [1, 3, 4])
def test_ring_order_is_a_permutation_that_balances_causal_work(n):
    length = 2 * n * 8
    table = zigzag.chunk_table(n, True)
    assert [list(r) for r in table] == [[i, 2 * n - 1 - i] for i in range(n)]
    perm = zigzag.ring_permutation(length, n, True)
    assert sorted(perm) == list(range(length))
    x = jnp.arange(2 * length).reshape(2, length)
    assert (zigzag.from_ring(zigzag.to_ring(x, n, True), n, True) == x).all()
    local = length // n
    for i in range(n):
        got = zigzag.positions_of_device(length, n, True, jnp.int32(i))
        assert (np.asarray(got) == perm[i * local:(i + 1) * local]).all()
    # causal pairs each device's queries attend: equal under zigzag, not contiguously
    work = [int(np.sum(perm[i * local:(i + 1) * local] + 1)) for i in range(n)]
    assert len(set(work)) == 1
    if n > 1:
        contiguous = [int(np.sum(np.arange(i * local, (i + 1) * local) + 1)) for i in range(n)]
        assert max(contiguous) > 2 * min(contiguous)
    with pytest.raises(ValueError, match="not a multiple"):
        zigzag.ring_permutation(length + 1, n, True)


# ----------------------------------------------------------------------------- combine
def masked_attention(q, k, v, mask):
    """float64 NumPy (out [B,S,H,D], lse [B,H,S]) over keys where mask [S, Sk]; empty rows give
    0 and -inf."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    total = p.sum(-1)
    out = np.einsum("bhqk,bkhd->bqhd", p / np.where(total > 0, total, 1)[..., None], v)
    lse = np.where(total > 0, m[..., 0] + np.log(np.where(total > 0, total, 1)), -np.inf)
    return out, lse


def test_merge_of_disjoint_key_sets_is_one_softmax():
    q, k, v = qkv(s=24, d=8)
    rng = np.random.default_rng(0)
    part = rng.integers(0, 3, size=24)  # each key in one of three sets
    causal = np.tril(np.ones((24, 24), bool))
    causal[5] = False  # query 5 sees nothing at all
    causal[7, :] = np.arange(24) == 7  # query 7 sees one key: empty in two of the parts
    full_out, full_lse = masked_attention(q, k, v, causal)
    acc = ring.empty_partial(q, v)
    parts = []
    for p in range(3):
        o, l = masked_attention(q, k, v, causal & (part == p)[None, :])
        parts.append((o, l))
        acc = ring.merge(*acc, jnp.asarray(o, jnp.float32), jnp.asarray(l, jnp.float32))
    np.testing.assert_allclose(np.asarray(acc[0]), full_out, atol=2e-6)
    np.testing.assert_allclose(np.asarray(acc[1]), full_lse, atol=2e-6)
    assert np.all(np.asarray(acc[0])[:, 5] == 0) and np.all(np.isneginf(np.asarray(acc[1])[..., 5]))
    stacked = ring.merge_stack(jnp.asarray(np.stack([p[0] for p in parts]), jnp.float32),
                               jnp.asarray(np.stack([p[1] for p in parts]), jnp.float32))
    np.testing.assert_allclose(np.asarray(stacked), full_out, atol=2e-6)


# ----------------------------------------------------------------------------- virtual ring
@pytest.mark.parametrize("n, zig, causal, group", [(5, True, True, 2), (3, False, False, 1)])
def test_virtual_ring_equals_attention(n, zig, causal, group):
    """Every (device, step) of the dense ring on one device, steps merged ``group`` at a time
    (n = 5, groups of 2: a first, a scanned middle and a last group of one)."""
    q, k, v = qkv(s=32 * n * (2 if zig else 1))
    ref = attend(q, k, v, causal=causal, spec=AttentionSpec(impl="reference"))
    out = jax.jit(lambda q, k, v: ring.virtual_ring(q, k, v, n, block=16, zig=zig,
                                                    causal=causal, merge_every=group))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6)


def test_virtual_ring_on_the_tpu_kernel_reads_shards_in_place():
    """The Pallas TPU kernel (interpret mode) on the virtual ring: visiting shards are blocks
    of the whole K/V and the own step is causal at the device's query offset."""
    q, k, v = qkv(s=512, d=128)
    ref = attend(q, k, v, causal=True, spec=AttentionSpec(impl="reference"))
    out = ring.virtual_ring(q, k, v, 2, block=128, zig=True, impl="mosaic_tpu", interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)


def test_sparse_steps_cover_the_rows_and_empty_steps_are_skipped():
    """Each device's rows of a streaming layout, cut into ring steps: the steps' blocks are the
    rows' blocks (none lost or added), steps beyond the window and the sink list nothing, and
    running the steps with those skipped gives the policy's attention."""
    n, blk, s = 4, 16, 256
    q, k, v = qkv(b=2, s=s)
    policy = sparse.get("streaming", block_size=blk, sink=16, local=32)
    lengths = jnp.array([256, 200])
    full = policy.build(q, k, lengths=lengths)
    ref = policy.attend(q, k, v, Prefill("prompt", 0, 16 ** -0.5, lengths=lengths))
    c, local = s // (2 * n), s // n

    @jax.jit
    def virtual(q, k, v, full):  # every (device, step) of the ring, on this device
        table = jnp.asarray(zigzag.chunk_table(n, True))
        qr, kr, vr = (zigzag.to_ring(x, n, True) for x in (q, k, v))
        outs, work, same = [], [], []
        for i in range(n):
            mine = table[i]
            own = rows.own_rows(full, (mine[:, None] * (c // blk)
                                       + jnp.arange(c // blk)).ravel())
            covered = jnp.zeros_like(own.mask)
            acc = ring.empty_partial(qr[:, :local], v)
            for step in range(n):
                j = (i - step) % n
                lay = rows.step_layout(own, mine, table[j], c=c, block=blk, causal=True,
                                       own=step == 0)
                gk = rows.visiting_blocks(table[j], c, blk)
                covered = covered.at[..., gk].set(covered[..., gk] | lay.to_block_mask())
                work.append(rows.has_work(lay))
                part = ring._step(qr[:, i * local:(i + 1) * local],
                                  kr[:, j * local:(j + 1) * local],
                                  vr[:, j * local:(j + 1) * local], lay, causal=step == 0,
                                  q_offset=None, sm_scale=16 ** -0.5, segs=None, impl="xla",
                                  interpret=False, options={}, skip=True)
                acc = ring.merge(*acc, *part)
            same.append(jnp.all(covered == own.mask))
            outs.append(acc[0])
        return jnp.concatenate(outs, axis=1), jnp.stack(work), jnp.stack(same)

    out, work, same = virtual(q, k, v, full)
    assert bool(jnp.all(same))
    # A row of chunk a lists chunks a, a - 1 (window 32 = one chunk) and 0 (the sink): device
    # 0 (chunks 0, 7) needs 2 shards of 4, devices 1 and 3 need 3, device 2 all 4.
    assert int(jnp.sum(~work)) == 4, work
    out = zigzag.from_ring(out, n, True)
    for b, length in enumerate([256, 200]):
        np.testing.assert_allclose(np.asarray(out[b, :length]), np.asarray(ref[b, :length]),
                                   atol=2e-6)


# ----------------------------------------------------------------------------- plan
def test_pass_kv_or_pass_q():
    gpu = plan.HARDWARE["gpu"]
    # a whole prompt, GQA 32/8: K/V bytes are at most Q's
    assert choose_schedule(4096, 0, 8, 32, 8, 2, gpu) == "pass_kv"
    # a 1K chunk over a 1M-token cache: K/V are 256x the chunk's queries and cannot hide
    assert choose_schedule(1024, 1 << 20, 8, 32, 8, 2, gpu) == "pass_q"
    # a long enough chunk hides pass-KV's transfer behind its compute
    threshold = 8 * gpu.flops * 8 * 2 / (2 * 32 * gpu.bandwidth)
    assert choose_schedule(int(threshold) + 1, 1 << 20, 8, 32, 8, 2, gpu) == "pass_kv"
    assert choose_schedule(int(threshold) - 1, 1 << 20, 8, 32, 8, 2, gpu) == "pass_q"
    kv = plan.ring_bytes("pass_kv", 1024, 1 << 20, 8, 32, 8, 128, 128, 2)
    assert plan.ring_bytes("pass_q", 1024, 1 << 20, 8, 32, 8, 128, 128, 2) < kv / 10
    with pytest.raises(ValueError, match="new token"):
        choose_schedule(0, 10, 8, 32, 8, 2)


# ----------------------------------------------------------------------------- settings
def test_settings_are_validated():
    mesh = jp.make_mesh(devices=jax.devices()[:1])
    for kw, match in ((dict(axis="rows"), "not a mesh axis"), (dict(schedule="x"), "schedule"),
                      (dict(block=12), "power of two"), (dict(kernel="cuda"), "kernel")):
        with pytest.raises(ValueError, match=match):
            ContextParallel(mesh, **kw)
    with pytest.raises(ValueError, match="ContextParallel or None"):
        AttentionSpec(context="sequence")
    ctx = ContextParallel(mesh, block=16)
    assert hash(ctx) == hash(ContextParallel(mesh, block=16))  # a static jit key
    assert ctx.padded_length(100) == 128 and ctx.padded_length(128) == 128
    assert ContextParallel(mesh, zigzag=False, block=16).padded_length(100) == 112


def test_estimate_paths_and_refusals():
    assert rows.estimate_path(sparse.get("streaming")) == "static"
    assert rows.estimate_path(sparse.get("xattention", key_columns=0)) == "rows"
    assert rows.estimate_path(sparse.get("xattention")) == "whole"  # 64 key columns
    assert rows.estimate_path(sparse.get("streaming", key_columns=8)) == "whole"
    assert rows.estimate_path(sparse.get("minference")) == "whole"
    with pytest.raises(ValueError, match="reorders keys"):
        rows.check_policy(sparse.get("pbs"), tensor_split=False)
    mesh = jp.make_mesh(devices=jax.devices()[:1])
    spec = AttentionSpec(context=ContextParallel(mesh, block=16))
    q, k, v = qkv(s=32)
    with pytest.raises(ValueError, match="sliding-window"):
        attend(q, k, v, window=8, spec=spec)
    with pytest.raises(ValueError, match="'triton', which has no backward pass"):
        attend(q, k, v, spec=AttentionSpec(context=ContextParallel(mesh, block=16,
                                                                   kernel="triton"),
                                           differentiable=True))
    with pytest.raises(ValueError, match="gradients through chunks over a cached prefix"):
        attend(q, k, v, q_offset=jnp.zeros((1,), jnp.int32),
               spec=dataclasses.replace(spec, differentiable=True))
    with pytest.raises(ValueError, match="chunks over a cached prefix"):
        attend(q, k, v, q_offset=jnp.zeros((1,), jnp.int32), layer=0,
               spec=dataclasses.replace(spec, sparse=sparse.SparseConfig.from_dict(
                   {"policy": "streaming", "params": {"block_size": 16}, "min_length": 0})))
    with pytest.raises(ValueError, match="share_layers > 1 is not supported"):
        shared = sparse.SparseConfig.from_dict(
            {"policy": "streaming", "params": {"block_size": 16, "share_layers": 2},
             "min_length": 0})
        attend(q, k, v, layer=0, spec=dataclasses.replace(spec, sparse=shared))


@pytest.mark.parametrize("n,zig", [(1, True), (2, False), (4, True), (8, True), (8, False)])
@pytest.mark.parametrize("causal", [True, False])
def test_dense_step_layout_is_the_block_mask_layout(n, zig, causal):
    """Without segments a step's layout is built from counts alone (the listed key blocks are
    a prefix of the visiting shard's); it equals the mask-and-sort construction for every
    (device, visiting device) pair, pad entries included."""
    from pallas_kernels.layout import block_mask_to_layout_arrays
    from jaxprefill.parallel import rows as rowlib

    c, block = 96, 32  # three blocks per chunk
    table = jnp.asarray(zigzag.chunk_table(n, zig))
    for i in range(n):
        for j in range(n):
            got = ring.dense_step_layout(table[i], table[j], c=c, block=block, heads=3, batch=2,
                                         causal=causal, q_seg=None, kv_seg=None)
            gq = rowlib.visiting_blocks(table[i], c, block)
            gk = rowlib.visiting_blocks(table[j], c, block)
            mask = jnp.broadcast_to((gk[None, :] <= gq[:, None]) | (not causal),
                                    (2, 3, gq.shape[0], gk.shape[0]))
            idx, cnt = block_mask_to_layout_arrays(mask, gk.shape[0])
            np.testing.assert_array_equal(got.kv_idx, idx)
            np.testing.assert_array_equal(got.kv_cnt, cnt)
            assert got.num_kv_blocks == gk.shape[0]
