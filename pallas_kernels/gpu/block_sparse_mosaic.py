"""Block-sparse flash attention forward for Hopper GPUs (Pallas, Mosaic GPU lowering, sm90).

Reference: :func:`pallas_kernels.reference.block_sparse_attention_reference`. Same API and
semantics as :func:`pallas_kernels.gpu.block_sparse_triton.block_sparse_attention_triton`.

Design
------
One CTA (thread block) computes a tile of 128 query positions of one query head: three
warpgroups, two *consumers* of 64 rows each (wgmma needs M = 64 per warpgroup) and one
*producer*. Both consumers walk the same layout row ``kv_idx[b, hl, i, :kv_cnt]``, so each
listed K/V block is copied once per CTA and read by both.

- Producer (warpgroup 2, registers lowered to 40; one warp issues the copies, the other three
  exit, as in tokamax): for list entry ``t`` it waits until slot ``t % num_stages`` of the
  shared-memory ring is free (both consumers arrived on its "consumed" barrier), then issues
  TMA copies of K and V block ``kv_idx[t]`` into that slot; each copy completes on its own
  mbarrier, so QK^T can start before V lands.
- Consumers (registers raised to 232): QK^T with wgmma from shared memory (Q tile and K slot),
  online softmax in base 2 with float32 statistics, P cast to the input dtype and PV with wgmma
  (P from registers, V from shared memory). The two consumers take turns on the tensor cores
  (one does softmax while the other's matmul runs), as in FlashAttention-3; the turn taking
  and the slot-free signals are hardware named barriers (``bar.arrive``/``bar.sync``), which
  wake a waiting warp without polling shared memory as an mbarrier wait does.
- Masks only where needed: entries ``t < n_full`` (:func:`pallas_kernels._prep.full_prefix_count`,
  computed once on the host for the whole 128-row tile) run without any mask; the rest apply
  key-length, causal (``k <= q + q_offset[b]``) and segment masks. Rows whose keys are all
  masked keep ``m = -inf``; a guarded max keeps ``exp2`` away from ``-inf - -inf``.
- Schedule: work items are (query head, batch, 128-row tile). ``order="groups"`` puts the G
  query heads of a KV head first, then the tiles from the last (longest causal row) one, then
  the KV heads, so the CTAs running together read the same K/V from L2 (MHA/MLA: one head's
  tiles); ``"heads"`` puts all query heads first. ``persistent=True`` launches one CTA per SM
  which takes items round-robin (odd rounds reversed, a snake that evens out the totals as rows
  shrink); the K/V ring keeps streaming across items, so a CTA's next tile does not restart
  the pipeline (this matters for sparse rows of a few blocks). ``persistent=False``: one CTA per
  item, in item order.
- Epilogue: ``out = acc / l`` (0 for rows with ``l = 0``), written through shared memory with
  a TMA store; ``lse = m ln 2 + ln l`` (``-inf`` for empty rows). The CTA waits only until the
  stores have read shared memory, so the next CTA on the SM starts while the writes finish.

Tuned with Nsight Compute cycle counts (``scripts/profiling/profile_kernels_ncu.sh``, QUICK=1: SM active
cycles repeat to 0.01% between runs, where wall-clock timings move 1-5%): the named barriers,
the single producer warp, the read-only store wait and leaving the softmax order to the
compiler (no ``optimization_barrier``) took 2.4% of cycles off the kernel at 16K, to within
0.6% of tokamax's (docs/performance.md). Tried and removed (docs/history.md): mbarriers for the turn taking
and slot-free signals; tokamax's grid order (all tiles of a head from the shortest row);
Mosaic's automatic barriers; a full store wait; FA3's intra-warpgroup overlap (QK^T j + 1
issued with PV j, two accumulators live; 22% slower, register pressure) and issuing PV j and
QK^T j + 1 back to back with one wait (3-6% slower). A 3-stage ring (1.6% more cycles at 16K)
stays a config option.

Constraints: 16-bit inputs (bf16/f16); ``block_q`` a multiple of 128 (a layout block of 256
positions is two CTA tiles that share the list); ``block_k`` 64 or 128; head dims are
zero-padded to multiples of 64; sequences are zero-padded to block multiples (no copy when
already multiples). Layouts with the column path (``col_idx``) are not supported yet.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

try:  # MLIR bindings for the named-barrier inline PTX (present in JAX 0.10 and 0.11)
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm
except ImportError:  # pragma: no cover - then the kernel raises at trace time
    ir = llvm = None

from pallas_kernels import _prep
from pallas_kernels.gpu.mosaic_common import MAX_SMEM, load, num_sms, round_up, smem
from pallas_kernels.layout import BlockSparseLayout

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_WG_ROWS = 64  # query rows per consumer warpgroup (wgmma M)
_TILE_Q = 2 * _WG_ROWS  # query rows per CTA
ORDERS = ("groups", "heads")


@dataclasses.dataclass(frozen=True)
class BlockSparseMosaicConfig:
    """Tuning knobs of :func:`block_sparse_attention_mosaic` (static: part of the jit key).

    num_stages: depth of the K/V shared-memory ring (2 or 3; limited by shared memory; 3
      measured 1.6% more cycles at 16K on an H100).
    persistent: one CTA per SM looping over the tiles (round robin, snake), so a CTA's next tile
      starts while its K/V ring keeps streaming; False (default): one CTA per tile, whose
      producer is a single warp. One CTA per tile measured faster on an H100 at full density
      (16K: 3.70 vs 4.15 ms) and about equal at 128K densities 5-50% (docs/performance.md).
    order: tile order, "groups" (the q heads of a KV head, then tiles from the last, then KV
      heads: CTAs running together share K/V in L2) or "heads" (all q heads, then tiles).
    """

    num_stages: int = 2
    persistent: bool = False
    order: str = "groups"

    def __post_init__(self) -> None:
        if self.num_stages not in (2, 3):
            raise ValueError(f"num_stages must be 2 or 3, got {self.num_stages}")
        if not isinstance(self.persistent, bool):
            raise ValueError(f"persistent must be true or false, got {self.persistent!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")


# Hardware (named) barrier ids: Mosaic GPU keeps the low ids for itself.
_BAR_TURN = 4  # 4, 5: consumer 1 / consumer 0 may issue its matmul
_BAR_FREE = 6  # 6 .. 6 + 2 * num_stages - 1: K slots then V slots free again


def _named_barrier(op: str, bar_id: Any, n_threads: int) -> None:
    """PTX ``bar.arrive``/``bar.sync`` on hardware barrier ``bar_id`` (int or traced int32)
    counting ``n_threads`` threads: cheaper than an mbarrier (no shared-memory polling)."""
    if llvm is None:
        raise NotImplementedError("named barriers need jax._src.lib.mlir.dialects.llvm")
    void = lambda: ir.Type.parse("!llvm.void")  # noqa: E731
    if isinstance(bar_id, int):
        @plgpu.inline_mgpu()
        def _static(_ctx):
            llvm.inline_asm(void(), [], f"bar.{op} {bar_id}, {n_threads};", "",
                            has_side_effects=True)
        _static()
    else:
        @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WG_SPLAT,))
        def _dynamic(_ctx, bid):
            llvm.inline_asm(void(), [bid.registers[()]], f"bar.{op} $0, {n_threads};", "r",
                            has_side_effects=True)
        _dynamic(bar_id)


def _kernel(q_ref, k_ref, v_ref, idx_ref, meta_ref, off_ref, *refs,
            causal: bool, qk_scale: float, has_seg: bool, n_tiles: int, r: int, G: int,
            Gl: int, Hq: int, B: int, bk: int, seq_k: int, stages: int, dv: int, dtype: Any,
            n_ctas: int, order: str):
    """One CTA; ``n_ctas > 0``: persistent, CTA c takes items c, c + n_ctas, ... (see module).
    Otherwise one item per CTA and a single producer warp issues its copies."""
    producer_warp = not n_ctas
    if has_seg:
        qseg_ref, kseg_ref, o_ref, lse_ref = refs[:4]
    else:
        o_ref, lse_ref = refs[:2]
    qo_smem, k_smem, v_smem, lse_smem, q_bar, k_bar, v_bar = refs[-7:]
    q_smem, o_smem = qo_smem
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    col_layout = plgpu.Layout.WGMMA.reduce(0)
    wg = lax.axis_index("wg")

    def split(g, n_items):
        del n_items
        """Item index -> (q head, batch, tile); tiles counted from the last (longest) one."""
        if order == "heads":  # q heads fastest, then batch, then tiles
            return g % Hq, (g // Hq) % B, n_tiles - 1 - g // (Hq * B)
        # "groups": the G q heads of a KV head fastest, then tiles, then KV heads, then batch,
        # so the CTAs running at once share the K/V of one KV head in L2 (MHA: one head).
        gi, rest = g % G, g // G
        tile, rest = n_tiles - 1 - rest % n_tiles, rest // n_tiles
        hkv, b = rest % (Hq // G), rest // (Hq // G)
        return hkv * G + gi, b, tile

    if n_ctas:
        cta = lax.axis_index("sm")
        n_items = Hq * B * n_tiles
        full_rounds, rem = divmod(n_items, n_ctas)

        def slot_in_round(j):
            # Round j of the static schedule; odd rounds run backwards (snake), which evens
            # out the totals when items shrink along the order.
            return jnp.where(j % 2 == 0, cta, n_ctas - 1 - cta)

        my_items = full_rounds + (slot_in_round(full_rounds) < rem).astype(jnp.int32)

        def item_of(j):
            return split(j * n_ctas + slot_in_round(j), n_items)
    else:
        my_items = 1
        # producer_warp: warp_map bodies may not read grid axes, so read it out here.
        x_id = lax.axis_index("x") if producer_warp else None

        def item_of(j):
            del j
            return split(lax.axis_index("x") if x_id is None else x_id, Hq * B * n_tiles)

    def row_of(h, b, tile):
        i = tile // r  # layout query block
        hl = h // Gl
        return i, hl, meta_ref[b, hl, i, 0], meta_ref[b, hl, i, 1]

    # The consumers hand the tensor cores to each other FA3-style: consumer w signals barrier
    # _BAR_TURN + 1 - w after issuing QK^T and waits on _BAR_TURN + w before PV; slot-free
    # signals are bar.arrive (256 consumer threads) / bar.sync (the producer's 32 or 128).
    n_free = 2 * 128 + (32 if producer_warp else 128)

    def turn_signal():
        _named_barrier("arrive", _BAR_TURN + 1 - wg, 256)

    def turn_wait():
        _named_barrier("sync", _BAR_TURN + wg, 256)

    def free_arrive(which, slot):
        _named_barrier("arrive", _BAR_FREE + which * stages + slot, n_free)

    def free_wait(which, slot):
        _named_barrier("sync", _BAR_FREE + which * stages + slot, n_free)

    @pl.when(wg < 2)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")

        def item(j, base):
            # base: K/V steps of this CTA's earlier items; ring slot of step t is (base+t) % S.
            h, b, tile = item_of(j)
            i, hl, cnt, n_full = row_of(h, b, tile)
            q0 = tile * _TILE_Q + wg * _WG_ROWS
            if n_ctas:  # the previous item's output store may still read q_smem (aliased)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, _WG_ROWS), h], q_smem.at[wg],
                                    q_bar.at[wg])
            off = off_ref[b]
            if has_seg:
                qseg = load(qseg_ref.at[b, pl.ds(q0, _WG_ROWS)], layout=row_layout,
                             optimized=False)
            plgpu.barrier_wait(q_bar.at[wg])

            m_i = plgpu.layout_cast(jnp.full((_WG_ROWS,), -jnp.inf, jnp.float32), row_layout)
            l_i = plgpu.layout_cast(jnp.zeros((_WG_ROWS,), jnp.float32), row_layout)
            acc = plgpu.layout_cast(jnp.zeros((_WG_ROWS, dv), jnp.float32), plgpu.Layout.WGMMA)

            @pl.when(cnt > 0)
            def _():
                plgpu.barrier_wait(k_bar.at[lax.rem(base, stages)])

            # Consumer 1 lets consumer 0 issue the first QK^T; from then on they alternate.
            pl.when(wg == 1)(lambda: _named_barrier("sync", _BAR_TURN + 1, 256))

            def step(t, carry, masked: bool):
                acc, m_i, l_i = carry
                slot = lax.rem(base + t, stages)
                if masked:  # issue the scalar load early, it is needed after the matmul
                    k0 = idx_ref[b, hl, i, t] * bk

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem.at[wg], k_smem.at[slot].transpose((1, 0)))
                    turn_signal()
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((_WG_ROWS, bk), jnp.float32))
                free_arrive(0, slot)
                if masked:
                    shape = (_WG_ROWS, bk)
                    kpos = k0 + plgpu.broadcasted_iota(jnp.int32, shape, 1,
                                                       layout=plgpu.Layout.WGMMA)
                    ok = kpos < seq_k
                    if causal:
                        qpos = q0 + off + plgpu.broadcasted_iota(jnp.int32, shape, 0,
                                                                 layout=plgpu.Layout.WGMMA)
                        ok = ok & (kpos <= qpos)
                    if has_seg:
                        kseg = load(kseg_ref.at[b, pl.ds(k0, bk)], layout=col_layout,
                                     optimized=False)
                        ok = ok & (lax.broadcast_in_dim(qseg, shape, [0])
                                   == lax.broadcast_in_dim(kseg, shape, [1]))
                    s = jnp.where(ok, s, -jnp.inf)
                # m is kept in scaled base-2 units: p = exp2(s * c - m) is one FMA + exp2.
                m_new = jnp.maximum(m_i, s.max(axis=1) * qk_scale)
                # A row with no unmasked key so far keeps m = -inf; subtract 0 instead (p = 0).
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
                alpha = jnp.exp2(m_i - m_use)
                p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_use, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i = l_i * alpha + p.sum(axis=1)
                # (No optimization_barrier pinning this order: the compiler's own schedule
                # measured 0.8% fewer cycles under Nsight Compute.)
                p16 = p.astype(dtype)
                plgpu.barrier_wait(v_bar.at[slot])
                turn_wait()

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                    @pl.when(t + 1 < cnt)
                    def _():
                        plgpu.barrier_wait(k_bar.at[lax.rem(base + t + 1, stages)])

                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                free_arrive(1, slot)
                return acc, m_new, l_i

            carry = (acc, m_i, l_i)
            carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
            acc, m_i, l_i = lax.fori_loop(n_full, cnt, functools.partial(step, masked=True),
                                          carry)
            # Balances consumer 1's extra wait at the start.
            pl.when(wg == 0)(lambda: _named_barrier("arrive", _BAR_TURN + 1, 256))

            has = l_i > 0.0
            l_safe = jnp.where(has, l_i, 1.0)
            # acc is exactly 0 on rows with l = 0 (every p was 0), so no select is needed.
            out = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
            lse_smem.at[wg][...] = jnp.where(has, m_i * _LN2 + jnp.log(l_safe), -jnp.inf)
            o_smem.at[wg][...] = out.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[b, pl.ds(q0, _WG_ROWS), h])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(q0, _WG_ROWS)])
            return base + cnt

        lax.fori_loop(0, my_items, item, jnp.int32(0))
        # Only wait until the stores have read shared memory (the CTA may exit while the
        # writes to global memory are in flight; the next CTA on this SM starts earlier).
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def issue_row(base, b, hl, i, hkv, cnt):
            """TMA copies of the cnt K/V blocks of layout row (b, hl, i); ring step base + t."""
            def issue(t, _):
                g = base + t
                slot = lax.rem(g, stages)
                rows = (b, pl.ds(idx_ref[b, hl, i, t] * bk, bk), hkv)

                @pl.when(g >= stages)
                def _():
                    free_wait(0, slot)

                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bar.at[slot])

                @pl.when(g >= stages)
                def _():
                    free_wait(1, slot)

                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bar.at[slot])
                return None

            lax.fori_loop(0, cnt, issue, None)

        def item(j, base):
            h, b, tile = item_of(j)
            i, hl, cnt, _ = row_of(h, b, tile)
            issue_row(base, b, hl, i, h // G, cnt)
            return base + cnt

        if producer_warp:  # one warp issues the copies, the other three exit (as tokamax)
            # Non-persistent only (one item): the item's row is read before warp_map, whose
            # bodies can neither read grid axes nor lower integer floor division.
            h, b, tile = item_of(0)
            i, hl, cnt, _ = row_of(h, b, tile)
            hkv = h // G

            @plgpu.warp_map
            def _per_warp(warp):
                pl.when(warp == 0)(lambda: issue_row(0, b, hl, i, hkv, cnt))
        else:
            lax.fori_loop(0, my_items, item, jnp.int32(0))


def unsupported(q: jax.Array, k: jax.Array, v: jax.Array, layout: BlockSparseLayout,
                config: BlockSparseMosaicConfig = BlockSparseMosaicConfig()) -> str | None:
    """Why :func:`block_sparse_attention_mosaic` cannot take these inputs, or None (dtype,
    blocks, head dims within shared memory, no column path). Device checks are the caller's."""
    if getattr(layout, "col_idx", None) is not None:
        return "no column path (layouts with key columns, col_idx)"
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"needs bf16/f16 q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}"
    if layout.block_q % _TILE_Q or layout.block_k not in (64, 128):
        return (f"needs block_q % {_TILE_Q} == 0 and block_k in (64, 128), got "
                f"({layout.block_q}, {layout.block_k})")
    if q.ndim != 4:
        return f"needs q [B, S, H, D], got {q.shape}"
    dqk, dv = round_up(q.shape[-1], 64), round_up(v.shape[-1], 64)
    if _smem_bytes(dqk, dv, layout.block_k, config.num_stages) > MAX_SMEM:
        return (f"Dqk={q.shape[-1]}, Dv={v.shape[-1]}, block_k={layout.block_k}, "
                f"num_stages={config.num_stages} exceed shared memory")
    return None


def _smem_bytes(dqk: int, dv: int, bk: int, stages: int) -> int:
    """Shared memory of one CTA: Q (output aliased when Dv <= Dqk), the K/V ring, lse, barriers
    (an estimate; Mosaic checks the exact figure when lowering)."""
    qo = 2 * _WG_ROWS * (dqk if dv <= dqk else dqk + dv)
    return 2 * (qo + stages * bk * (dqk + dv)) + 2 * _WG_ROWS * 4 + 1024


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "interpret", "config",
                                              "poison_output"))
def block_sparse_attention_mosaic(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layout: BlockSparseLayout,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    q_offset: Any = None,
    segment_ids: Any = None,
    interpret: Any = False,
    config: BlockSparseMosaicConfig = BlockSparseMosaicConfig(),
    poison_output: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Pallas Mosaic GPU (Hopper) block-sparse attention.

    Args:
        q: ``[B, Sq, Hq, Dqk]``; k: ``[B, Sk, Hkv, Dqk]``; v: ``[B, Sk, Hkv, Dv]``; bf16 or f16.
        layout: heads Hq or Hkv, batch B or 1; ``block_q % 128 == 0``, ``block_k`` in (64, 128).
        interpret: passed to ``plgpu.kernel`` (API parity with the other kernels; JAX
            0.10.2's Mosaic GPU interpret mode has no rule for ``run_state`` and cannot run
            this kernel).
        config: the tuning knobs (:class:`BlockSparseMosaicConfig`).
        poison_output: start from NaN-filled outputs so that elements the kernel fails to
            write stay NaN (checks only).
        Others: see ``block_sparse_attention``.
    Returns:
        ``out [B, Sq, Hq, Dv]`` (``q.dtype``), ``lse [B, Hq, Sq]`` float32.
    Raises:
        ValueError: unsupported dtype, block sizes, head dims or a layout with columns.
    """
    d = _prep.check_inputs(q, k, v, layout)
    reason = unsupported(q, k, v, layout, config)
    if reason is not None:
        raise ValueError(f"block_sparse_attention_mosaic: {reason}")
    bq, bk = d.block_q, d.block_k
    num_stages, persistent = config.num_stages, config.persistent
    dqk_p, dv_p = round_up(d.Dqk, 64), round_up(d.Dv, 64)
    layout = layout.broadcast_batch(d.B)
    off = _prep.normalize_q_offset(q_offset, d.B)
    seg = _prep.pad_segment_ids(_prep.normalize_segment_ids(segment_ids, d), d)
    scale = _prep.default_scale(sm_scale, d.Dqk)
    n_full = _prep.full_prefix_count(layout, off, d.Sk, causal, seg is not None)
    meta = jnp.stack([layout.kv_cnt, n_full], axis=-1).astype(jnp.int32)  # [B, Hl, nq, 2]

    sq_pad, sk_pad = d.nq * bq, d.nk * bk
    qp = _prep.pad_axis(_prep.pad_axis(q, 1, sq_pad), 3, dqk_p)
    kp = _prep.pad_axis(_prep.pad_axis(k, 1, sk_pad), 3, dqk_p)
    vp = _prep.pad_axis(_prep.pad_axis(v, 1, sk_pad), 3, dv_p)
    args = [qp, kp, vp, layout.kv_idx.astype(jnp.int32), meta, off]
    if seg is not None:
        args += [seg.q, seg.kv]
    n_tiles = sq_pad // _TILE_Q
    q_buf, o_buf = smem((2, _WG_ROWS, dqk_p), q.dtype), smem((2, _WG_ROWS, dv_p), q.dtype)
    # Each consumer writes its output tile over its own Q tile once its last QK^T is done. With
    # Dv <= Dqk, o[wg] starts inside q[wg] or (o[1]) q[0]'s tail, which consumer 0 no longer
    # reads: consumer 1 leaves its loop only after consumer 0 passed its final schedule barrier.
    qo = plgpu.RefUnion(q_buf, o_buf) if dv_p <= dqk_p else (q_buf, o_buf)
    scratch = [
        qo,
        smem((num_stages, bk, dqk_p), q.dtype),
        smem((num_stages, bk, dv_p), q.dtype),
        plgpu.SMEM((2, _WG_ROWS), jnp.float32),
        plgpu.Barrier(num_barriers=2),  # q loaded (one per consumer)
        plgpu.Barrier(num_barriers=num_stages),  # k slot loaded
        plgpu.Barrier(num_barriers=num_stages),  # v slot loaded
    ]  # (slot-free signals and the consumers' turn taking use hardware named barriers)
    n_items = d.Hq * n_tiles * d.B
    n_ctas = min(num_sms(), n_items) if persistent else 0
    kernel = functools.partial(
        _kernel, causal=causal, qk_scale=scale * _LOG2E, has_seg=seg is not None,
        n_tiles=n_tiles, r=bq // _TILE_Q, G=d.G, Gl=d.Gl, Hq=d.Hq, B=d.B, bk=bk, seq_k=d.Sk,
        stages=num_stages, dv=dv_p, dtype=q.dtype, n_ctas=n_ctas, order=config.order)
    extra = {} if interpret is False or interpret is None else {"interpret": interpret}
    out_type = (jax.ShapeDtypeStruct((d.B, sq_pad, d.Hq, dv_p), q.dtype),
                jax.ShapeDtypeStruct((d.B, d.Hq, sq_pad), jnp.float32))
    # No cross-warp reductions here (a row of the wgmma layout lives in one warp), so no
    # reduction scratch: the 2 KiB let a 3-stage K/V ring fit at D=128.
    # No automatic barriers: the kernel orders its shared memory accesses itself (mbarriers,
    # named barriers, commit_smem); 0-1.5% faster.
    params = plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0,
                                  unsafe_no_auto_barriers=True)
    if n_ctas:
        grid = dict(grid=(n_ctas,), grid_names=("sm",), num_threads=3, thread_name="wg")
    else:  # one CTA per item, launched in item order
        grid = dict(grid=(n_items,), grid_names=("x",), num_threads=3, thread_name="wg")
    if not poison_output:
        out, lse = plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch,
                                compiler_params=params, **grid, **extra)(*args)
    else:
        # plgpu.kernel has no input/output aliasing: pass NaN-filled mutable refs as the
        # outputs instead (pl.kernel aliases refs in and out), so unwritten elements stay NaN.
        o_ref, lse_ref = (jax.new_ref(jnp.full(t.shape, jnp.nan, t.dtype)) for t in out_type)

        def body(*refs):
            pl.run_scoped(functools.partial(kernel, *refs), *scratch, collective_axes="wg")

        pl.kernel(body, out_type=(), mesh=plgpu.Mesh(**grid), compiler_params=params,
                  **extra)(*args, o_ref, lse_ref)
        out, lse = o_ref[...], lse_ref[...]
    return out[:, : d.Sq, :, : d.Dv], lse[:, :, : d.Sq]
