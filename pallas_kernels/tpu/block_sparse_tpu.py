"""Block-sparse flash attention forward for TPU (Pallas Mosaic, scalar prefetch).

Reference: :func:`pallas_kernels.reference.block_sparse_attention_reference`.

Design
------
Grid ``(B, Hq, nq, max_nnz)``: batch, query head, query block, list position (the last axis is
sequential, ``"arbitrary"``; the others ``"parallel"``). Four int32 arrays go to SMEM through
``pltpu.PrefetchScalarGridSpec`` (flattened to 1-D to avoid SMEM tile padding): ``kv_idx``,
``kv_cnt``, ``n_full`` (leading entries needing no mask, from
:func:`pallas_kernels._prep.full_prefix_count`) and ``q_offset``.

- K/V ``index_map``s read ``kv_idx[b, h // Gl, i, min(t, kv_cnt - 1)]``: steps past the row's
  count re-point at the last valid block, so the pipeline issues no new DMA for them, and the
  kernel body skips them with ``pl.when``.
- Online softmax state ``m, l`` ``[bq, 1]`` and ``acc`` ``[bq, Dv]`` (float32) lives in VMEM
  scratch across the list axis; the output and the logsumexp are written at the last step.
- Per block, ``t < n_full`` takes the mask-free path; other blocks apply the key-length,
  causal (``j <= i + q_offset[b]``) and segment masks. Fully masked rows give 0 and lse -inf.
- Column path (``layout.col_idx``): the grid's last axis grows by ``n_chunks =
  ceil(max_cols / block_k)`` steps after the list. The listed K/V rows (and their positions and
  segment ids, for the masks) are gathered *outside* the kernel into ``[B, Hl, nq,
  n_chunks * block_k, D]`` arrays that ordinary BlockSpecs tile by chunk; ``col_cnt`` is a 5th
  scalar-prefetch array. This costs ``O(B * Hl * nq * max_cols * D)`` HBM (fine for tests and
  short rows; a production TPU kernel would DMA the rows from HBM inside the kernel instead).
- BLASST (``blasst_threshold``): rows whose tile max is below their running max by more than
  ``ln(lambda)`` get zero probabilities for the tile (reference semantics, per row); on TPU the
  DMA is pipelined anyway, so nothing but VPU/MXU work could be saved (not attempted).

Layouts: q/out are transposed to ``[B, H, S, D]`` (head-major) so blocks are ``(bq, D)`` tiles;
the segment ids go in as ``[B, Sq, 1]`` (q) and ``[B, 1, Sk]`` (kv) so each block is a legal
TPU tile. On hardware ``block_k`` should be a multiple of 128 and ``block_q`` of 8; interpret
mode accepts any size.

VMEM budget (per grid step, double-buffered blocks, bf16 inputs, D = Dqk = Dv = 128; f32 ``s``/``p``
temporaries counted 3x; ``[bq, 1]`` f32 arrays lane-padded to 128), from :func:`vmem_bytes`:

==========  ==========  =========================
block_q     block_k     VMEM (no seg / with seg)
==========  ==========  =========================
128         128         0.75 MiB / 0.88 MiB
256         256         1.88 MiB / 2.14 MiB
512         512         5.25 MiB / 5.78 MiB
512         1024        8.75 MiB / 9.31 MiB
==========  ==========  =========================

All fit the default scoped VMEM (16 MiB v5e, 32 MiB v6e). SMEM holds the scalar-prefetch
arrays, ``4 * B * Hl * nq * (max_nnz + 2) + 4 * B`` bytes: at 128K tokens with 128-blocks a
per-KV-head layout (Hl=8, nq=1024, max_nnz=1024) needs 32 MiB, far above SMEM (~1 MiB); long
contexts on real TPUs need larger blocks or a call per head / query-block chunk (not done
here: no TPU was reachable; the kernel is verified in TPU interpret mode only).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _prep
from pallas_kernels.layout import BlockSparseLayout
from pallas_kernels.online_softmax import normalize_rows

_CompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")


def vmem_bytes(block_q: int, block_k: int, d_qk: int = 128, d_v: int = 128, itemsize: int = 2,
               segments: bool = False) -> int:
    """Approximate VMEM bytes of one grid step (see module docstring)."""
    lanes = 128
    blocks = 2 * itemsize * (block_q * d_qk + block_k * d_qk + block_k * d_v + block_q * d_v)
    blocks += 2 * 4 * block_q * lanes  # lse output block [bq, 1] lane-padded
    if segments:
        blocks += 2 * 4 * (block_q * lanes + 8 * block_k)
    scratch = 2 * 4 * block_q * lanes + 4 * block_q * d_v
    temps = 3 * 4 * block_q * block_k
    return blocks + scratch + temps


def _kernel(*refs, causal: bool, scale: float, has_seg: bool, has_cols: bool,
            log_thr: float | None, Hl: int, Gl: int, nq: int, nnz: int, n_chunks: int,
            bq: int, bk: int, seq_k: int):
    n_scalar = 5 if has_cols else 4
    idx_ref, cnt_ref, nfull_ref, off_ref = refs[:4]  # scalar prefetch (SMEM)
    ccnt_ref = refs[4] if has_cols else None
    rest = list(refs[n_scalar:])
    q_ref, k_ref, v_ref = rest[:3]
    rest = rest[3:]
    if has_cols:
        kc_ref, vc_ref, cpos_ref = rest[:3]
        rest = rest[3:]
    if has_seg:
        qs_ref, ks_ref = rest[:2]
        rest = rest[2:]
        if has_cols:
            cs_ref = rest[0]
            rest = rest[1:]
    o_ref, lse_ref, m_sc, l_sc, acc_sc = rest
    b, h, i, t = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    row = (b * Hl + h // Gl) * nq + i
    cnt = cnt_ref[row]
    n_full = nfull_ref[row]

    @pl.when(t == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def fold(k, v, ok):
        """Online-softmax update with one [bk, D] tile; ok: bool [bq, bk] mask or None."""
        s = lax.dot_general(q_ref[...], k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale  # [bq, bk]
        if ok is not None:
            s = jnp.where(ok, s, -jnp.inf)
        m_prev = m_sc[...]
        tmax = jnp.max(s, axis=1, keepdims=True)
        m_next = jnp.maximum(m_prev, tmax)
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next) if ok is not None else m_next
        p = jnp.exp(s - m_safe)
        if log_thr is not None:  # BLASST: rows whose tile max is far below their running max
            p = jnp.where(tmax < m_prev + log_thr, 0.0, p)
        alpha = jnp.exp(m_prev - m_safe)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        acc_sc[...] = alpha * acc_sc[...] + pv
        m_sc[...] = m_next

    def masks(kpos):
        """bool [bq, bk]: key-length and causal masks for key positions kpos [bq, bk]."""
        ok = kpos < seq_k
        if causal:
            qpos = i * bq + off_ref[b] + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            ok = jnp.logical_and(ok, kpos <= qpos)
        return ok

    def block_step(masked: bool):
        if not masked:
            fold(k_ref[...], v_ref[...], None)
            return
        blk = idx_ref[row * nnz + t]
        ok = masks(blk * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1))
        if has_seg:
            ok = jnp.logical_and(ok, qs_ref[...] == ks_ref[...])  # [bq,1] == [1,bk]
        fold(k_ref[...], v_ref[...], ok)

    @pl.when(t < n_full)
    def _full():
        block_step(masked=False)

    @pl.when(jnp.logical_and(t >= n_full, t < cnt))
    def _partial():
        block_step(masked=True)

    if has_cols:
        c = t - nnz

        @pl.when(jnp.logical_and(t >= nnz, c * bk < ccnt_ref[row]))
        def _columns():
            kpos = jnp.broadcast_to(cpos_ref[...], (bq, bk))  # gathered positions [1, bk]
            listed = c * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1) < ccnt_ref[row]
            ok = jnp.logical_and(listed, masks(kpos))
            if has_seg:
                ok = jnp.logical_and(ok, qs_ref[...] == cs_ref[...])
            fold(kc_ref[...], vc_ref[...], ok)

    @pl.when(t == nnz + n_chunks - 1)
    def _finish():
        out, lse = normalize_rows(acc_sc[...], m_sc[...], l_sc[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "interpret",
                                             "blasst_threshold"))
def block_sparse_attention_tpu(
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
) -> tuple[jax.Array, jax.Array]:
    """Pallas TPU block-sparse attention.

    Args:
        q: ``[B, Sq, Hq, Dqk]``; k: ``[B, Sk, Hkv, Dqk]``; v: ``[B, Sk, Hkv, Dv]``.
        layout: heads Hq or Hkv, batch B or 1.
        interpret: ``False`` on TPU; ``True`` or ``pltpu.InterpretParams(...)`` elsewhere.
        Others: see ``block_sparse_attention``.
    Returns:
        ``out [B, Sq, Hq, Dv]`` (``q.dtype``), ``lse [B, Hq, Sq]`` float32.
    """
    d = _prep.check_inputs(q, k, v, layout)
    layout = layout.broadcast_batch(d.B)
    off = _prep.normalize_q_offset(q_offset, d.B)
    seg = _prep.pad_segment_ids(_prep.normalize_segment_ids(segment_ids, d), d)
    scale = _prep.default_scale(sm_scale, d.Dqk)
    bq, bk, nnz = d.block_q, d.block_k, layout.max_nnz
    sq_pad, sk_pad = d.nq * bq, d.nk * bk
    n_full = _prep.full_prefix_count(layout, off, d.Sk, causal, seg is not None)
    log_thr = _prep.blasst_log_threshold(blasst_threshold)
    has_cols = layout.has_columns
    n_chunks = layout.column_chunks()

    qt = _prep.pad_axis(q, 1, sq_pad).transpose(0, 2, 1, 3)  # [B, Hq, Sq_pad, Dqk]
    kt = _prep.pad_axis(k, 1, sk_pad).transpose(0, 2, 1, 3)  # [B, Hkv, Sk_pad, Dqk]
    vt = _prep.pad_axis(v, 1, sk_pad).transpose(0, 2, 1, 3)  # [B, Hkv, Sk_pad, Dv]

    Hl, Gl, G, nq = d.Hl, d.Gl, d.G, d.nq

    def kv_block(b, h, i, t, idx_ref, cnt_ref, *refs):
        row = (b * Hl + h // Gl) * nq + i
        tt = jnp.minimum(t, jnp.maximum(cnt_ref[row] - 1, 0))
        return idx_ref[row * nnz + tt]

    def col_chunk(b, h, i, t, idx_ref, cnt_ref, nfull_ref, off_ref, ccnt_ref):
        # Block steps prefetch chunk 0; steps past the row's chunks stay on its last one.
        row = (b * Hl + h // Gl) * nq + i
        last = jnp.maximum((ccnt_ref[row] + bk - 1) // bk - 1, 0)
        return jnp.clip(t - nnz, 0, last)

    def q_map(b, h, i, t, *refs):
        return (b, h, i, 0)

    def kv_map(b, h, i, t, *refs):
        return (b, h // G, kv_block(b, h, i, t, *refs), 0)

    in_specs = [
        pl.BlockSpec((None, None, bq, d.Dqk), q_map),
        pl.BlockSpec((None, None, bk, d.Dqk), kv_map),
        pl.BlockSpec((None, None, bk, d.Dv), kv_map),
    ]
    args = [qt, kt, vt]
    scalars = [layout.kv_idx.reshape(-1), layout.kv_cnt.reshape(-1), n_full.reshape(-1), off]
    if has_cols:
        # Gathered outside the kernel: [B, Hl, nq, n_chunks * bk, D] (see module docstring).
        cidx, _ = _prep.padded_columns(layout)
        cidx = jnp.clip(cidx, 0, d.Sk - 1)
        kvh = (jnp.arange(Hl) * Gl) // G
        bb, hh = jnp.arange(d.B)[:, None, None, None], kvh[None, :, None, None]
        kc, vc = kt[bb, hh, cidx], vt[bb, hh, cidx]
        cmap = lambda b, h, i, t, *refs: (b, h // Gl, i, col_chunk(b, h, i, t, *refs), 0)
        pmap = lambda b, h, i, t, *refs: (b, h // Gl, i, 0, col_chunk(b, h, i, t, *refs))
        in_specs += [pl.BlockSpec((None, None, None, bk, d.Dqk), cmap),
                     pl.BlockSpec((None, None, None, bk, d.Dv), cmap),
                     pl.BlockSpec((None, None, None, 1, bk), pmap)]
        args += [kc, vc, cidx[:, :, :, None, :]]
        scalars.append(layout.col_cnt.reshape(-1))
    if seg is not None:
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda b, h, i, t, *refs: (b, i, 0)),
            pl.BlockSpec((None, 1, bk),
                         lambda b, h, i, t, *refs: (b, 0, kv_block(b, h, i, t, *refs))),
        ]
        args += [seg.q[:, :, None], seg.kv[:, None, :]]
        if has_cols:
            in_specs.append(pl.BlockSpec((None, None, None, 1, bk), pmap))
            args.append(seg.kv[jnp.arange(d.B)[:, None, None, None], cidx][:, :, :, None, :])
    out_specs = [
        pl.BlockSpec((None, None, bq, d.Dv), q_map),
        pl.BlockSpec((None, None, bq, 1), q_map),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((d.B, d.Hq, sq_pad, d.Dv), q.dtype),
        jax.ShapeDtypeStruct((d.B, d.Hq, sq_pad, 1), jnp.float32),
    ]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(scalars),
        grid=(d.B, d.Hq, nq, nnz + n_chunks),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, d.Dv), jnp.float32),
        ],
    )
    kernel = functools.partial(
        _kernel, causal=causal, scale=scale, has_seg=seg is not None, has_cols=has_cols,
        log_thr=log_thr, Hl=Hl, Gl=Gl, nq=nq, nnz=nnz, n_chunks=n_chunks, bq=bq, bk=bk,
        seq_k=d.Sk)
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=_CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="block_sparse_attention_tpu",
    )(*scalars, *args)
    out = out.transpose(0, 2, 1, 3)[:, : d.Sq]
    return out, lse[..., 0][:, :, : d.Sq]
