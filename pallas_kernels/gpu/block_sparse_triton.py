"""Block-sparse flash attention forward for NVIDIA GPUs (Pallas, Triton lowering).

Reference: :func:`pallas_kernels.reference.block_sparse_attention_reference`.

Design
------
The Triton lowering has no scalar prefetch, so each program receives its own list row
(``kv_idx[b, hl, i, :]`` padded to a power of two) and a 4-int row of metadata
``(kv_cnt, n_full, q_offset[b], 0)`` through ordinary BlockSpecs, and the whole K/V sequence of
its KV head; it loops over the listed blocks with ``pl.ds(kv_idx[t] * block_k, block_k)``.

- Grid ``(Hp, B, n_sub)``: ``n_sub`` query tiles of ``bq_sub`` positions, walked in reverse so
  the longest (causal, late) rows start first; heads vary fastest, so neighbouring programs
  share K/V in L2.
- GQA packing: when the layout is per KV head and ``G = Hq // Hkv`` is a power of two, one
  program can take the ``G`` query heads of a KV head for ``bq_sub = min(block_q, block_m // G)``
  positions (``bq_sub * G`` rows) and read each listed K/V block once for the whole group.
  Otherwise one program per query head and ``bq_sub = min(block_q, block_m)`` positions.
  ``pack_gqa=None`` (default) packs only when ``block_q < block_m``, i.e. when packing makes the
  programs taller: with ``block_q = block_m = 128`` both forms read the same K/V bytes per row
  and the unpacked one measured faster on an H100 (16K tokens, full causal: 6.04 ms unpacked vs
  6.24 ms packed; docs/performance.md); packing pays off for small query blocks
  (short chunks, ``block_q`` 16-64) where unpacked programs would have too few rows.
- Two loops: list positions ``t < n_full`` (see :func:`pallas_kernels._prep.full_prefix_count`)
  run without masks; the rest apply key-length, causal and segment masks. Online softmax in
  base 2, float32 accumulators; fully masked rows give 0 and lse -inf.
- Column path: a third loop walks the row's ``col_idx`` (one more BlockSpec input, padded to a
  power of two of ``block_k`` chunks; ``col_cnt`` rides in the metadata's 4th slot) in chunks
  of ``block_k`` positions, gathering K/V rows with a vector index (``k_ref[pos, :]``) and
  masking by the gathered positions (causal, segment ids, padding past ``col_cnt``).
- A prior softmax (``prior=(out, lse)``: a blocks-only kernel's result over other keys of the
  same rows) starts the online softmax instead of an empty one: ``acc = out``, ``m = lse``
  (base 2), ``l = 1`` (0 for rows it left empty), so the result is one softmax over both key
  sets and the separate log-sum-exp merge pass (``pallas_kernels.column_merge``) is not needed.
- BLASST (``blasst_threshold``): rows whose tile max is below their running max by more than
  ``ln(lambda)`` get zero probabilities; a tile that every row skips takes a ``lax.cond`` branch
  that skips the exp, the V load and the P.V MMA (the Q.K MMA is needed for the decision).

Constraints (Triton block shapes are powers of two): ``block_k`` and ``block_q`` powers of two
>= 16; head dims are zero-padded to the next power of two (MLA's Dqk=192 costs a padded copy of
q and k); sequences are zero-padded to block multiples (no copy when already multiples).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gpu._triton_common import (
    CompilerParams as _CompilerParams, LOG2E as _LOG2E, pow2 as _pow2, is_pow2 as _is_pow2,
    f32_dot_precision,
)

from pallas_kernels import _prep
from pallas_kernels.layout import BlockSparseLayout
from pallas_kernels.online_softmax import normalize_rows


def _kernel(q_ref, k_ref, v_ref, idx_ref, meta_ref, *rest,
            causal: bool, qk_scale: float, has_seg: bool, has_cols: bool, has_prior: bool,
            log2_thr: float | None, n_sub: int, bq_sub: int, gk: int, bk: int, seq_k: int,
            precision: Any, n_alias: int):
    if has_cols:
        col_ref, rest = rest[0], rest[1:]
    if has_prior:
        po_ref, plse_ref, rest = rest[0], rest[1], rest[2:]
    rest = rest[n_alias:]  # skip the aliased poison inputs
    if has_seg:
        qs_ref, ks_ref, o_ref, lse_ref = rest
    else:
        o_ref, lse_ref = rest
    m_rows = bq_sub * gk
    i_sub = n_sub - 1 - pl.program_id(2)
    cnt = meta_ref[0]
    n_full = meta_ref[1]
    off = meta_ref[2]

    q = q_ref[...]  # [bq_sub, gk, Dqk]
    q = q.reshape(m_rows, q.shape[-1])
    qpos = i_sub * bq_sub + lax.broadcasted_iota(jnp.int32, (m_rows,), 0) // gk + off
    if has_seg:
        qseg = jnp.broadcast_to(qs_ref[...][:, None], (bq_sub, gk)).reshape(m_rows)

    def fold(carry, k, load_v, ok):
        """Online softmax with one [bk, D] key tile; ok: bool [m_rows, bk] or None (no mask)."""
        acc, m_prev, l_prev = carry
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * qk_scale
        if ok is not None:
            s = jnp.where(ok, s, -jnp.inf)
        tmax = jnp.max(s, axis=1)
        m_next = jnp.maximum(m_prev, tmax)

        def update():
            m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next) if ok is not None else m_next
            p = jnp.exp2(s - m_safe[:, None])
            if log2_thr is not None:
                p = jnp.where((tmax < m_prev + log2_thr)[:, None], 0.0, p)
            alpha = jnp.exp2(m_prev - m_safe)
            l_next = alpha * l_prev + jnp.sum(p, axis=1)
            v = load_v()
            pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 precision=precision, preferred_element_type=jnp.float32)
            return acc * alpha[:, None] + pv, m_next, l_next

        if log2_thr is None:
            return update()
        # BLASST: when every row of the tile skips it, the running max cannot move (the tile's
        # max is below it), so skip the exp, the V load and the P.V MMA altogether.
        n_keep = jnp.sum((tmax >= m_prev + log2_thr).astype(jnp.int32))
        return lax.cond(n_keep == 0, lambda: (acc, m_prev, l_prev), update)

    def masks(kpos):
        ok = jnp.broadcast_to((kpos < seq_k)[None, :], (m_rows, bk))
        if causal:
            ok = jnp.logical_and(ok, kpos[None, :] <= qpos[:, None])
        return ok

    def block_body(t, carry, masked: bool):
        start = pl.multiple_of(idx_ref[t] * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        ok = None
        if masked:
            ok = masks(start + lax.broadcasted_iota(jnp.int32, (bk,), 0))
            if has_seg:
                kseg = ks_ref[pl.ds(start, bk)]
                ok = jnp.logical_and(ok, qseg[:, None] == kseg[None, :])
        return fold(carry, k, lambda: v_ref[pl.ds(start, bk), :], ok)

    def column_body(c, carry):
        cstart = pl.multiple_of(c * bk, bk)
        kpos = col_ref[pl.ds(cstart, bk)]  # [bk] key positions (clipped to [0, Sk))
        k = k_ref[kpos, :]  # gathered rows
        listed = cstart + lax.broadcasted_iota(jnp.int32, (bk,), 0) < meta_ref[3]
        ok = jnp.logical_and(masks(kpos), listed[None, :])
        if has_seg:
            ok = jnp.logical_and(ok, qseg[:, None] == ks_ref[kpos][None, :])
        return fold(carry, k, lambda: v_ref[kpos, :], ok)

    dv = o_ref.shape[-1]
    if has_prior:  # the prior's normalized output weighs exp2(lse2 - m) = 1 at m = lse2
        m0 = plse_ref[...].reshape(m_rows) * _LOG2E
        carry = (po_ref[...].reshape(m_rows, dv).astype(jnp.float32), m0,
                 jnp.where(m0 == -jnp.inf, 0.0, 1.0))
    else:
        carry = (
            jnp.zeros((m_rows, dv), jnp.float32),
            jnp.full((m_rows,), -jnp.inf, jnp.float32),
            jnp.zeros((m_rows,), jnp.float32),
        )
    carry = lax.fori_loop(0, n_full, functools.partial(block_body, masked=False), carry)
    carry = lax.fori_loop(n_full, cnt, functools.partial(block_body, masked=True), carry)
    if has_cols:
        carry = lax.fori_loop(0, (meta_ref[3] + bk - 1) // bk, column_body, carry)
    out, lse = normalize_rows(*carry, base2=True)
    o_ref[...] = out.reshape(bq_sub, gk, dv).astype(o_ref.dtype)
    lse_ref[...] = lse.reshape(bq_sub, gk)


@functools.partial(
    jax.jit,
    static_argnames=("causal", "sm_scale", "interpret", "block_m", "num_warps", "num_stages",
                     "pack_gqa", "poison_output", "blasst_threshold", "f32_dot"))
def block_sparse_attention_triton(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layout: BlockSparseLayout,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    q_offset: Any = None,
    segment_ids: Any = None,
    blasst_threshold: float | None = None,
    interpret: Any = False,
    block_m: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    pack_gqa: bool | None = None,
    poison_output: bool = False,
    f32_dot: str = "tf32x3",
    prior: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Pallas GPU (Triton lowering) block-sparse attention.

    Args:
        q: ``[B, Sq, Hq, Dqk]``; k: ``[B, Sk, Hkv, Dqk]``; v: ``[B, Sk, Hkv, Dv]``.
        layout: heads Hq or Hkv, batch B or 1; ``block_q``/``block_k`` powers of two >= 16.
        interpret: run in Pallas interpret mode (any backend).
        block_m: query rows (positions x packed heads) per program; default 128, 64 for
            float32 inputs with head dims above 64 (the split TF32 operands of 128 rows do not
            fit shared memory).
        num_warps, num_stages: Triton launch parameters (default 8 warps for ``block_m >= 128``
            and ``D >= 128``, else 4; 2 stages for 16-bit inputs when the K/V tiles fit in
            shared memory (not MLA's Dqk=192 -> 256), else 1).
        pack_gqa: GQA packing (layout per KV head, power-of-two group): True, False, or None
            to pack only when ``block_q < block_m``.
        poison_output: alias NaN-filled buffers to the outputs, so elements the kernel fails to
            write stay NaN (checks only).
        f32_dot: how float32 inputs are multiplied: ``"tf32x3"`` (default: three TF32
            tensor-core products, float32 accuracy), ``"ieee"`` (CUDA cores, exact products:
            38-55x slower on an H100) or ``"tf32"`` (one product, ~4e-4 relative error);
            ignored for 16-bit inputs and in interpret mode (exact there). H100, S=8192,
            causal (docs/performance.md): max error / max |out| 5-7e-7 for tf32x3 and 3-4e-7
            for ieee and for XLA's block gather, which tf32x3 outruns 2.7-5.1x.
        prior: ``(out [B, Sq, Hq, Dv], lse [B, Hq, Sq])`` of attention over a key set disjoint
            from this layout's (a blocks-only kernel's result, for the column merge): the
            result is the softmax over both (module docstring). Not with BLASST, whose skip
            test needs the running max of logits.
        Others: see ``block_sparse_attention``.
    Returns:
        ``out [B, Sq, Hq, Dv]`` (``q.dtype``), ``lse [B, Hq, Sq]`` float32.
    """
    d = _prep.check_inputs(q, k, v, layout)
    bq, bk = d.block_q, d.block_k
    if block_m is None:
        block_m = 64 if q.dtype == jnp.float32 and max(d.Dqk, d.Dv) > 64 else 128
    if not (_is_pow2(bq) and _is_pow2(bk) and bq >= 16 and bk >= 16):
        raise ValueError(f"pallas_gpu needs power-of-two blocks >= 16, got ({bq}, {bk})")
    layout = layout.broadcast_batch(d.B)
    off = _prep.normalize_q_offset(q_offset, d.B)
    seg = _prep.pad_segment_ids(_prep.normalize_segment_ids(segment_ids, d), d)
    scale = _prep.default_scale(sm_scale, d.Dqk)
    n_full = _prep.full_prefix_count(layout, off, d.Sk, causal, seg is not None)
    log_thr = _prep.blasst_log_threshold(blasst_threshold)
    log2_thr = None if log_thr is None else log_thr * _LOG2E  # the kernel works in base 2
    has_cols = layout.has_columns
    if prior is not None and log2_thr is not None:
        raise ValueError("block_sparse_attention_triton: a prior softmax does not go with BLASST")

    can_pack = d.Hl == d.Hkv and d.G > 1 and _is_pow2(d.G)
    pack = can_pack and (pack_gqa if pack_gqa is not None else bq < block_m)
    gk = d.G if pack else 1
    hp = d.Hkv if pack else d.Hq
    bq_sub = min(bq, max(16, block_m // gk))
    n_sub = d.nq * bq // bq_sub
    r = bq // bq_sub  # sub-tiles per layout query block
    Hl, Gl, G = d.Hl, d.Gl, d.G

    dqk_p, dv_p = max(16, _pow2(d.Dqk)), max(16, _pow2(d.Dv))
    sq_pad, sk_pad = d.nq * bq, d.nk * bk
    qp = _prep.pad_axis(_prep.pad_axis(q, 1, sq_pad), 3, dqk_p).reshape(d.B, sq_pad, hp, gk, dqk_p)
    kp = _prep.pad_axis(_prep.pad_axis(k, 1, sk_pad), 3, dqk_p)
    vp = _prep.pad_axis(_prep.pad_axis(v, 1, sk_pad), 3, dv_p)
    nnz_p = _pow2(layout.max_nnz)
    kv_idx = layout.kv_idx
    if nnz_p != layout.max_nnz:
        kv_idx = jnp.concatenate(
            [kv_idx, jnp.repeat(kv_idx[..., -1:], nnz_p - layout.max_nnz, axis=-1)], axis=-1)
    ccnt = layout.col_cnt if has_cols else jnp.zeros_like(layout.kv_cnt)
    meta = jnp.stack([layout.kv_cnt, n_full,
                      jnp.broadcast_to(off[:, None, None], layout.kv_cnt.shape),
                      ccnt], axis=-1)  # [B, Hl, nq, 4]

    def i_of(s):
        return n_sub - 1 - s

    def row_map(h, b, s):
        return (b, h if pack else h // Gl, i_of(s) // r, 0)

    def kv_map(h, b, s):
        return (b, 0, h if pack else h // G, 0)

    q_spec = pl.BlockSpec((None, bq_sub, None, gk, dqk_p), lambda h, b, s: (b, i_of(s), h, 0, 0))
    o_spec = pl.BlockSpec((None, bq_sub, None, gk, dv_p), lambda h, b, s: (b, i_of(s), h, 0, 0))
    lse_spec = pl.BlockSpec((None, bq_sub, None, gk), lambda h, b, s: (b, i_of(s), h, 0))
    in_specs = [
        q_spec,
        pl.BlockSpec((None, sk_pad, None, dqk_p), kv_map),
        pl.BlockSpec((None, sk_pad, None, dv_p), kv_map),
        pl.BlockSpec((None, None, None, nnz_p), row_map),
        pl.BlockSpec((None, None, None, 4), row_map),
    ]
    args = [qp, kp, vp, kv_idx, meta]
    if has_cols:  # the row's column positions, padded to a power of two of block_k chunks
        cidx, n_chunks = _prep.padded_columns(layout)
        c_p = _pow2(n_chunks) * bk
        cidx = jnp.clip(cidx, 0, d.Sk - 1)
        if c_p != cidx.shape[-1]:
            cidx = jnp.concatenate(
                [cidx, jnp.repeat(cidx[..., -1:], c_p - cidx.shape[-1], axis=-1)], axis=-1)
        in_specs.append(pl.BlockSpec((None, None, None, c_p), row_map))
        args.append(cidx)
    if prior is not None:  # in the kernel's own layouts: [B, S, hp, gk, Dv], lse [B, S, hp, gk]
        p_out, p_lse = prior
        p_out = _prep.pad_axis(_prep.pad_axis(p_out, 1, sq_pad), 3, dv_p)
        p_lse = _prep.pad_axis(p_lse.astype(jnp.float32).transpose(0, 2, 1), 1, sq_pad)
        in_specs += [o_spec, lse_spec]
        args += [p_out.reshape(d.B, sq_pad, hp, gk, dv_p), p_lse.reshape(d.B, sq_pad, hp, gk)]
    n_fixed = len(args)
    if seg is not None:
        in_specs += [pl.BlockSpec((None, bq_sub), lambda h, b, s: (b, i_of(s))),
                     pl.BlockSpec((None, sk_pad), lambda h, b, s: (b, 0))]
        args += [seg.q, seg.kv]
    out_shape = [
        jax.ShapeDtypeStruct((d.B, sq_pad, hp, gk, dv_p), q.dtype),
        jax.ShapeDtypeStruct((d.B, sq_pad, hp, gk), jnp.float32),
    ]
    aliases = {}
    n_alias = 0
    if poison_output:
        # Inserted right after the fixed inputs; the kernel skips them.
        poison = [jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape]
        args = args[:n_fixed] + poison + args[n_fixed:]
        in_specs = in_specs[:n_fixed] + [o_spec, lse_spec] + in_specs[n_fixed:]
        aliases = {n_fixed: 0, n_fixed + 1: 1}
        n_alias = 2
    if num_warps is None:
        num_warps = 8 if (bq_sub * gk >= 128 and max(dqk_p, dv_p) >= 128) else 4
    if num_stages is None:
        # Shared memory: K/V tiles per stage plus the q tile; H100 allows 227 KiB per block.
        isz = q.dtype.itemsize
        smem2 = 2 * bk * (dqk_p + dv_p) * isz + bq_sub * gk * dqk_p * isz
        num_stages = 2 if (isz < 4 and smem2 <= 200 * 1024) else 1
    precision = f32_dot_precision(f32_dot, q.dtype, interpret)
    kernel = functools.partial(
        _kernel, causal=causal, qk_scale=scale * _LOG2E, has_seg=seg is not None,
        has_cols=has_cols, has_prior=prior is not None, log2_thr=log2_thr, n_sub=n_sub,
        bq_sub=bq_sub, gk=gk, bk=bk, seq_k=d.Sk, precision=precision, n_alias=n_alias)
    out, lse = pl.pallas_call(
        kernel,
        grid=(hp, d.B, n_sub),
        in_specs=in_specs,
        out_specs=[o_spec, lse_spec],
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="block_sparse_attention_triton",
    )(*args)
    out = out.reshape(d.B, sq_pad, d.Hq, dv_p)[:, : d.Sq, :, : d.Dv]
    lse = lse.reshape(d.B, sq_pad, d.Hq)[:, : d.Sq].transpose(0, 2, 1)
    return out, lse
