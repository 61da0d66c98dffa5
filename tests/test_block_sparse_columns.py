"""Column path of the block-sparse layout (``col_idx`` / ``col_cnt``): builders, and every kernel
impl against the float64 NumPy reference (fresh random inputs, odd lengths, GQA 3 and 4, rows
with only columns, empty rows, q_offset, segment ids, bf16/f32); MInference's vertical lines as
columns."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import BlockSparseLayout, SegmentIds, block_sparse_attention, with_columns
from pallas_kernels.gpu.block_sparse_triton import block_sparse_attention_triton
from pallas_kernels.testing import assert_close, numpy_reference, random_problem, run_problem


def expected_columns(block_mask, positions, bq, bk, seq_q=None, off=0):
    """Brute force: per row, the sorted unique valid positions outside listed blocks."""
    B, H, nq, nk = block_mask.shape
    pos = np.broadcast_to(positions, (B, H, nq, positions.shape[-1]))
    out = {}
    for b, h, i in np.ndindex(B, H, nq):
        keep = set()
        for p in pos[b, h, i]:
            if p < 0 or p >= nk * bk or block_mask[b, h, i, p // bk]:
                continue
            if seq_q is not None and p > min((i + 1) * bq, seq_q) - 1 + off:
                continue
            keep.add(int(p))
        out[b, h, i] = sorted(keep)
    return out


def check_columns(lay, want):
    idx, cnt = np.asarray(lay.col_idx), np.asarray(lay.col_cnt)
    for key, cols in want.items():
        n = len(cols)
        assert cnt[key] == n, (key, cnt[key], cols)
        np.testing.assert_array_equal(idx[key][:n], cols)
        assert np.all(idx[key][n:] == (cols[-1] if n else 0))  # padding repeats the last


@pytest.mark.parametrize("seq_q", [None, 70])
def test_with_columns_positions_and_mask(seq_q):
    rng = np.random.default_rng()  # fresh every run
    bm = rng.random((2, 3, 5, 5)) < 0.4
    lay = BlockSparseLayout.from_block_mask(bm, 16, 16)
    pos = rng.integers(-5, 90, (2, 3, 5, 9))  # duplicates, negatives, past nk * bk
    want = expected_columns(bm, pos, 16, 16, seq_q, 3)
    got = with_columns(lay, pos, seq_q=seq_q, q_offset=3)
    assert got.max_cols == 9 and got.has_columns
    check_columns(got, want)
    jitted = jax.jit(lambda l, p: with_columns(l, p, seq_q=seq_q, q_offset=3))(lay, pos)
    check_columns(jitted, want)
    # Shared positions [B, H, 1, L] and the token-mask form give the same columns.
    shared = rng.integers(0, 80, (1, 3, 1, 6))
    want = expected_columns(bm, shared, 16, 16, seq_q, 3)
    check_columns(with_columns(lay, shared, seq_q=seq_q, q_offset=3), want)
    tok = np.zeros((1, 3, 1, 80), bool)
    np.put_along_axis(tok, shared, True, axis=-1)
    from_mask = with_columns(lay, tok, seq_q=seq_q, q_offset=3)
    check_columns(from_mask, want)
    assert from_mask.max_cols == max(1, max(len(c) for c in want.values()))
    # The column mask is exactly the listed columns, disjoint from the listed blocks.
    cm = np.asarray(from_mask.column_mask(80))
    blocks_tok = np.repeat(bm, 16, axis=-1)
    assert not (cm & blocks_tok).any()
    for key, cols in want.items():
        np.testing.assert_array_equal(np.flatnonzero(cm[key]), cols)


def test_columns_truncation_rounding_density_and_errors():
    bm = np.zeros((1, 1, 2, 4), bool)
    bm[..., 0] = True
    lay = BlockSparseLayout.from_block_mask(bm, 16, 16)
    got = with_columns(lay, np.array([[[[50, 20, 40, 33]]]]), max_cols=2)
    np.testing.assert_array_equal(np.asarray(got.col_idx), [[[[20, 33], [20, 33]]]])  # lowest
    np.testing.assert_array_equal(np.asarray(got.col_cnt), [[[2, 2]]])
    # Density counts ceil(col_cnt / block_k) chunks per row: 2 blocks + 2 chunks of 8 cells.
    assert got.computed_blocks() == 4.0 and got.density() == 4.0 / 8
    rounded = got.round_columns_to_blocks()
    assert not rounded.has_columns
    np.testing.assert_array_equal(np.asarray(rounded.to_block_mask())[0, 0],
                                  [[1, 1, 1, 0], [1, 1, 1, 0]])
    with pytest.raises(ValueError, match="both"):
        BlockSparseLayout(lay.kv_idx, lay.kv_cnt, 16, 16, 4, col_idx=got.col_idx)
    with pytest.raises(ValueError, match="col_idx"):
        BlockSparseLayout(lay.kv_idx, lay.kv_cnt, 16, 16, 4, col_idx=got.col_idx[0],
                          col_cnt=got.col_cnt)
    with pytest.raises(ValueError, match="does not fit"):
        with_columns(lay, np.zeros((1, 2, 1, 3), np.int32))
    with pytest.raises(ValueError, match="blocks"):
        with_columns(lay, np.zeros((1, 1, 1, 99), bool))
    with pytest.raises(ValueError, match="static max_cols"):
        jax.jit(lambda m: with_columns(lay, m).col_idx)(jnp.zeros((1, 1, 1, 64), bool))
    with pytest.raises(ValueError, match="integers"):
        with_columns(lay, np.zeros((1, 1, 1, 3), np.float32))


CFGS = {
    # GQA 3, per-query-head lists, odd lengths, segment ids, f32.
    "gqa3_qhead_odd_seg_f32": dict(B=2, Sq=77, Sk=77, Hq=6, Hkv=2, per_kv_head=False,
                                   block_q=16, block_k=16, segments=True, dtype=np.float32),
    # GQA 4, per-KV-head lists, chunk at a random per-row offset, bf16, block_k != block_q.
    "gqa4_kvhead_offset_bf16": dict(B=2, Sq=40, Sk=100, Hq=8, Hkv=2, per_kv_head=True,
                                    block_q=16, block_k=32, q_offset="random",
                                    dtype=jnp.bfloat16),
}
IMPLS = {
    "reference": {},
    "xla": {},
    "triton": dict(interpret=True),
    "mosaic_tpu": dict(interpret=pltpu.InterpretParams(uninitialized_memory="nan")),
}


# TPU interpret mode is slow (~10 s a call): one config here, the other in the BLASST tests.
CASES = [(i, c) for i in sorted(IMPLS) for c in sorted(CFGS)
         if not (i == "mosaic_tpu" and c.startswith("gqa4"))]


@pytest.mark.parametrize("impl,cfg", CASES)
def test_columns_match_numpy(impl, cfg):
    seed = int(np.random.default_rng().integers(2**31))  # fresh inputs; printed on failure
    p = random_problem(seed, Dqk=32, Dv=16, density=0.3, empty_row_frac=0.15, columns=14,
                       col_only_frac=0.3, **CFGS[cfg])
    lay = p.layout()
    assert lay.has_columns and int(np.asarray(lay.col_cnt).sum()) > 0
    ref = p.reference()
    no_cols, _ = numpy_reference(p.q, p.k, p.v, p.block_mask, p.block_q, p.block_k,
                                 causal=True, q_offset=p.q_offset, seg_q=p.seg_q,
                                 seg_kv=p.seg_kv)
    assert np.abs(ref[0] - no_cols).max() > 1e-2, "columns changed nothing: a vacuous test"
    out, lse = run_problem(p, impl, **IMPLS[impl])
    low = p.q.dtype != np.float32
    try:
        assert_close(out, lse, *ref, low_precision=low)
    except AssertionError as e:
        raise AssertionError(f"seed {seed}: {e}") from e


@pytest.mark.parametrize("pack_gqa", [True, False])
def test_triton_interpret_columns_poisoned(pack_gqa):
    # Per-KV-head layout with G = 4 (packed programs) and a layout batch of 1 broadcast to B=2.
    seed = int(np.random.default_rng().integers(2**31))
    p = random_problem(seed, B=1, Sq=64, Sk=96, Hq=4, Hkv=1, Dqk=32, Dv=32, block_q=16,
                       block_k=16, density=0.25, columns=20, col_only_frac=0.25,
                       q_offset="chunk", dtype=np.float32)
    lay = p.layout()
    q2, k2, v2 = (np.concatenate([x, x[:, ::-1]]) for x in (p.q, p.k, p.v))
    out, lse = block_sparse_attention_triton(
        jnp.asarray(q2), jnp.asarray(k2), jnp.asarray(v2), lay, q_offset=int(p.q_offset[0]),
        interpret=True, poison_output=True, pack_gqa=pack_gqa, block_m=64)
    ref = numpy_reference(q2, k2, v2, p.block_mask, 16, 16, causal=True,
                          q_offset=int(p.q_offset[0]), col_mask=p.col_mask)
    assert_close(out, lse, *ref, low_precision=False)


def test_minference_columns_lower_density_match_reference_and_dispatch():
    from jaxprefill import sparse
    from jaxprefill.attention import dispatch
    from jaxprefill.eval.synthetic_qk import structured_qk

    # Many planted vertical lines, few diagonals: the selected columns spread over many blocks,
    # so rounding them up to blocks costs far more than the column chunks.
    S, B, block = 640, 2, 64
    q, k = structured_qk(jax.random.key(np.random.default_rng().integers(2**31)), B, S, 6, 2,
                         32, local=16, n_vertical=64, dtype=jnp.float32)
    v = jax.random.normal(jax.random.key(3), (B, S, 2, 32), jnp.float32)
    lengths = jnp.asarray([S, 421], jnp.int32)
    params = dict(vertical=64, slash=4, force_slash=1, force_vertical=1, last_q=32,
                  block_size=block)
    for heads in ("q", "kv"):
        cols = sparse.get("minference", heads=heads, **params)
        rounded = sparse.get("minference", heads=heads, columns=False, **params)
        lay_c = jax.jit(lambda a, b, l: cols.build(a, b, lengths=l))(q, k, lengths)
        lay_r = jax.jit(lambda a, b, l: rounded.build(a, b, lengths=l))(q, k, lengths)
        assert lay_c.has_columns and not lay_r.has_columns
        d_c, d_r = lay_c.density(), lay_r.density()
        print(f"minference heads={heads}: density with columns {d_c:.3f}, rounded {d_r:.3f}")
        # Per row, <= 64 columns cost one chunk but one block per distinct column block.
        assert d_c < d_r, (d_c, d_r)
        # The columns' blocks plus the listed blocks are exactly the rounded layout.
        np.testing.assert_array_equal(np.asarray(lay_c.round_columns_to_blocks().to_block_mask()),
                                      np.asarray(lay_r.to_block_mask()))
    # Output over the column layout (last built: heads="kv") equals the float64 reference.
    out = block_sparse_attention(q, k, v, lay_c, impl="xla")
    ref, _ = numpy_reference(q, k, v, np.asarray(lay_c.to_block_mask()), block, block,
                             causal=True, col_mask=np.asarray(lay_c.column_mask(S)))
    for b, n in enumerate(np.asarray(lengths)):
        np.testing.assert_allclose(np.asarray(out)[b, :n], ref[b, :n], atol=2e-5, rtol=2e-5)

    # Through the attention dispatch (SparseConfig, layer 0): the XLA kernel gets the columns;
    # a named kernel that cannot run the call (the Mosaic GPU one: no column path, and no GPU
    # here) raises instead of falling back.
    cfg = sparse.SparseConfig.parse({"policy": "minference", "params": params, "heads": "kv",
                                     "min_length": 0, "kernel": "xla"})
    spec = dispatch.AttentionSpec(sparse=cfg)
    run = lambda: np.asarray(jax.jit(  # noqa: E731
        lambda a, b, c: dispatch.attend(a, b, c, spec=spec, layer=0))(q, k, v))
    lay_full = jax.jit(lambda a, b: cols.build(a, b))(q, k)  # all rows full length
    got = run()
    want = block_sparse_attention(q, k, v, lay_full, impl="reference")
    np.testing.assert_allclose(got, np.asarray(want), atol=2e-5, rtol=2e-5)
    named = dispatch.AttentionSpec(sparse=dataclasses.replace(cfg, kernel="mosaic_gpu"))
    with pytest.raises(ValueError, match="impl='mosaic_gpu' cannot run this call"):
        jax.eval_shape(lambda a, b, c: dispatch.attend(a, b, c, spec=named, layer=0), q, k, v)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (the full check: "
                    "scripts/checks/check_kernels_gpu.py)")
def test_triton_columns_compiled_matches_numpy():
    for per_kv_head in (True, False):
        p = random_problem(int(np.random.default_rng().integers(2**31)), B=2, Sq=1000, Sk=1000,
                           Hq=8, Hkv=2, Dqk=128, Dv=128, block_q=128, block_k=64,
                           per_kv_head=per_kv_head, density=0.2, columns=150,
                           col_only_frac=0.2, segments=True, dtype=jnp.bfloat16)
        seg = SegmentIds(jnp.asarray(p.seg_q), jnp.asarray(p.seg_kv))
        out, lse = block_sparse_attention_triton(
            jnp.asarray(p.q), jnp.asarray(p.k), jnp.asarray(p.v), p.layout(), segment_ids=seg,
            poison_output=True)
        assert_close(out, lse, *p.reference(), low_precision=True)


@pytest.mark.parametrize("columns", ["xla", "triton", "triton_prior"])
@pytest.mark.parametrize("cfg", sorted(CFGS))
def test_columns_merged_outside_a_blocks_only_kernel_match_numpy(cfg, columns):
    """The column path of backends without one (Mosaic GPU): the XLA kernel over the blocks
    alone, the columns in XLA or by the Triton kernel (interpret mode) over the columns alone,
    merged by logsumexp (column_merge), or by the Triton kernel starting from the blocks'
    softmax (``prior``, no merge pass) == the float64 reference with columns; rows with only
    columns and empty rows included (0, lse -inf, no NaN)."""
    from pallas_kernels.column_merge import with_merged_columns
    from pallas_kernels.xla.block_sparse_xla import block_sparse_attention_xla

    col_kernel = None if columns == "xla" else functools.partial(
        block_sparse_attention_triton, interpret=True, poison_output=True)

    seed = int(np.random.default_rng().integers(2**31))
    p = random_problem(seed, Dqk=32, Dv=16, density=0.3, empty_row_frac=0.15, columns=14,
                       col_only_frac=0.3, **CFGS[cfg])
    seg = None if p.seg_q is None else SegmentIds(jnp.asarray(p.seg_q), jnp.asarray(p.seg_kv))
    out, lse = jax.jit(lambda q, k, v, lay, off: with_merged_columns(
        block_sparse_attention_xla, q, k, v, lay, columns=col_kernel, causal=True, q_offset=off,
        segment_ids=seg, columns_prior=columns == "triton_prior"))(jnp.asarray(p.q), jnp.asarray(p.k), jnp.asarray(p.v), p.layout(),
                          jnp.asarray(p.q_offset))
    assert out.dtype == p.q.dtype and not np.isnan(np.asarray(out, np.float32)).any()
    try:
        assert_close(out, lse, *p.reference(), low_precision=p.q.dtype != np.float32)
    except AssertionError as e:
        raise AssertionError(f"seed {seed}: {e}") from e


def test_mosaic_gpu_takes_columns_by_merge(monkeypatch):
    """impl="mosaic_gpu" with a column layout runs the kernel on the blocks alone and merges
    the columns (the kernel is stood in for by XLA here: Mosaic GPU does not run on a CPU);
    "auto" has no reason to pass over it for column layouts."""
    from pallas_kernels import attention
    from pallas_kernels.xla.block_sparse_xla import block_sparse_attention_xla

    seen = []

    def blocks_only(q, k, v, layout, interpret=False, **kw):
        seen.append(layout.has_columns)
        return block_sparse_attention_xla(q, k, v, layout, **kw)
    monkeypatch.setitem(attention._KERNELS, "mosaic_gpu", blocks_only)
    p = random_problem(5, B=1, Sq=300, Sk=300, Hq=4, Hkv=2, Dqk=64, Dv=64, block_q=128,
                       block_k=128, per_kv_head=False, density=0.4, empty_row_frac=0.0,
                       columns=20, dtype=jnp.bfloat16)
    out, lse = run_problem(p, "mosaic_gpu", interpret=True)
    assert seen == [False]
    assert_close(out, lse, *p.reference(), low_precision=True)
    mosaic_backend = next(b for b in attention.BACKENDS if b.name == "mosaic_gpu")
    assert mosaic_backend.prefer_not(attention.BlockSparseCall(p.q, p.k, p.v, p.layout())) is None


def test_merged_columns_lower_for_cuda_with_the_triton_kernel_continuing_the_blocks(monkeypatch):
    """On a (pretend) Hopper, a column layout through impl="mosaic_gpu" lowers to Mosaic GPU
    over the blocks and one Triton call over the columns that takes the blocks' output and lse
    as its starting softmax: no separate merge of the two outputs is traced."""
    from pallas_kernels import attention, backends
    from pallas_kernels.gpu import block_sparse_triton

    monkeypatch.setattr(backends, "platform", lambda: "gpu")
    monkeypatch.setattr(attention.mosaic_common, "is_hopper", lambda: True)
    seen = []
    real = block_sparse_triton.block_sparse_attention_triton

    def spy(*a, prior=None, **kw):
        seen.append(prior is not None)
        return real(*a, prior=prior, **kw)

    monkeypatch.setitem(attention._KERNELS, "triton", spy)
    p = random_problem(3, B=1, Sq=512, Sk=512, Hq=9, Hkv=3, Dqk=64, Dv=64, block_q=128,
                       block_k=128, per_kv_head=False, density=0.3, empty_row_frac=0.0,
                       columns=20, dtype=jnp.bfloat16)
    fn = jax.jit(lambda q, k, v, lay: block_sparse_attention(q, k, v, lay, impl="mosaic_gpu"))
    text = fn.trace(jnp.asarray(p.q), jnp.asarray(p.k), jnp.asarray(p.v),
                    p.layout()).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "block_sparse_attention_triton" in text
    assert seen == [True]
    with pytest.raises(ValueError, match="BLASST"):
        real(jnp.asarray(p.q), jnp.asarray(p.k), jnp.asarray(p.v), p.layout(),
             blasst_threshold=0.5, prior=(jnp.asarray(p.q), jnp.zeros((1, 9, 512))),
             interpret=True)
