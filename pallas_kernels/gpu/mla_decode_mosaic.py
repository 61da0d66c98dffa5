"""Absorbed MLA decode over a paged latent cache for Hopper GPUs (Pallas, Mosaic GPU, sm90).

Reference: :func:`pallas_kernels.mla_reference.mla_decode_reference` (same arguments). Same API
as :func:`pallas_kernels.gpu.mla_decode_triton.mla_decode_triton`.

Why a second GPU kernel: with DeepSeek-V3's 128 query heads decode is compute-bound, not
bandwidth-bound (2 * 128 * (576 + 512) FLOPs per cached token of 1152 bytes, 242 FLOP/byte,
near the H100's ridge), and the Triton-lowered kernel runs QK^T, softmax and PV of one program
back to back at ~35% of the tensor cores. Here the heads are the wgmma M dimension and the work
of one 64-head tile is split over two consumer warpgroups so the tensor cores have a matmul to
run while the softmax is computed (the FlashMLA split, written for Pallas Mosaic GPU):

- One CTA = one (sequence, KV split, block of 64 heads) item; three warpgroups. Items are
  ordered heads-fastest, so the CTAs of the head blocks of one sequence run together and read
  its pages from L2 once.
- Producer (warpgroup 2): walks the sequence's page-table slice and TMA-copies each page
  ``cache[page_id]`` ([page = 64 tokens, Dc + Dr]) into a ring of ``num_stages`` shared-memory
  slots; a slot is refilled once both consumers released it.
- Consumer 0 (warpgroup 0): S = Q K^T over all Dc + Dr dims (wgmma, both operands in shared
  memory), online softmax in base 2 with float32 statistics, then hands P (bf16, through shared
  memory) and the rescale factor alpha to consumer 1, and accumulates O[:, :Dc/2] += P V_lo.
- Consumer 1 (warpgroup 1): for each page waits for P and alpha, rescales and accumulates
  O[:, Dc/2:] += P V_hi (V = the latent part of the same cached page).
  Splitting O by columns keeps each accumulator at 64 x 256 float32 (128 registers per thread;
  64 x 512 would not fit), and consumer 1's PV runs while consumer 0 computes the next softmax.
- ``schedule="seesaw"`` instead balances the matmuls: the consumers take turns computing QK^T
  and the softmax of a page (the owner publishes P, alpha and the running max in shared
  memory), and both accumulate their column half of every page's PV. It needs a ring of >= 3
  pages to keep the turn-taking fed, which fits only for narrower latents (TPLA shards,
  Dc = 256: 4 stages); ``"auto"`` picks it there for up to 64 heads. With more heads a shard
  is compute-bound and the default is the split schedule with two pages per step and no
  automatic barriers (H100, 128 heads: 5.3-5.6% fewer cycles than seesaw).
- Only a sequence's last page can be partial: it alone gets the key-length mask (seesaw: all
  pages, one select per score). A split with no pages writes out 0 and lse -inf; splits are
  merged by :func:`pallas_kernels.mla_reference.combine_splits` (a small XLA reduction).
- Epilogue: the two halves of ``out = acc / l`` are written through shared memory (aliasing the
  Q tile and the page ring, free by then) with TMA stores; ``lse = m ln 2 + ln l``.

Measured on an H100 (batch 64 x 32K, docs/performance.md): 94-96% of copy bandwidth at 16 and
64 heads (memory-bound), 82-84% at 128 heads (584-597 TFLOP/s, compute-bound; the Triton
kernel: 35%). That is with the Dc = 512 defaults ``split_cols=192`` (consumer 0, which also
computes QK^T and the softmax, takes 192 of the 512 PV columns) and ``no_auto_barriers=True``:
5.9% fewer cycles under Nsight Compute than Dc / 2 with Mosaic's automatic barriers, which
read 75-80% in the same runs.

Tried at 128 heads and not kept (H100, docs/history.md): FlashMLA's pair schedule, both
consumers computing QK^T of one page each of a pair (1.71-1.76 ms against the split schedule's
1.06-1.10 ms: the two-page ring leaves each pair's loads exposed), and multicasting each page
to a cluster of two CTAs (75.6% vs 75.7% of copy: the kernel is not L2-bound).

Constraints: bf16/f16 cache; page == 64 tokens; Dc a multiple of 128 and Dr a multiple of 64
(DeepSeek: 512 / 64; TPLA shards: 256 / 64) or zero-padded copies for test dims; the page ring
must fit shared memory (2 stages at Dc + Dr = 576).
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

from pallas_kernels.gpu import mla_decode_triton as mla_triton
from pallas_kernels.gpu.mosaic_common import MAX_SMEM, load, num_sms, round_up, smem
from pallas_kernels.mla_reference import check_mla_inputs, combine_splits

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_HEADS = 64  # query heads per CTA: the wgmma M of one warpgroup
PAGE = 64  # tokens per cache page (FlashMLA's page size; one K/V step)
SCHEDULES = ("auto", "split", "seesaw")


@dataclasses.dataclass(frozen=True)
class MLADecodeMosaicConfig:
    """Tuning knobs of :func:`mla_decode_mosaic` (static: part of the jit key). None picks the
    measured default for the call's shapes.

    num_splits: KV splits per sequence (default :func:`default_num_splits`).
    num_stages: shared-memory ring depth (default: the most, up to 4, that fit; 2 pages fit at
      Dc + Dr = 576, 4 at a TPLA shard's 320).
    schedule: how the two consumer warpgroups share a 64-head tile: "split" (consumer 0 does
      every QK^T and softmax, both do PV on their column half), "seesaw" (they alternate QK^T
      and softmax by page, both do PV on every page; it needs a deep ring: on the H100 4.5%
      faster with 4 stages at Dc=256, 2.6x slower with 2 at Dc=512) or "auto" (seesaw when the
      ring holds 4 pages of one step, else split).
    pages_per_step: cache pages (64 tokens each) per pipeline step and ring slot: 2 halves the
      per-step synchronisation (narrow latents, where a page is little work). Default: 2 for a
      TPLA g=2 shard (Dc = 256) with more than 64 heads, else 1.
    split_cols: output columns accumulated by consumer 0 (the rest by consumer 1), a multiple
      of 64 (default 192 for the split schedule at Dc = 512, else Dc / 2). With "split"
      consumer 0 also computes every QK^T and softmax, so fewer PV columns balance the two.
    no_auto_barriers: Mosaic's ``unsafe_no_auto_barriers`` (the kernel orders its shared
      memory accesses with mbarriers and ``commit_smem``); default True for the split schedule
      at Dc = 512 and for two pages per step at Dc = 256 with more than 64 heads (checked on
      the H100), else False.
    """

    num_splits: int | None = None
    num_stages: int | None = None
    schedule: str = "auto"
    pages_per_step: int | None = None
    split_cols: int | None = None
    no_auto_barriers: bool | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.pages_per_step not in (None, 1, 2):
            raise ValueError(f"pages_per_step must be 1 or 2, got {self.pages_per_step}")
        if self.num_stages is not None and self.num_stages < 2:
            raise ValueError(f"num_stages must be >= 2, got {self.num_stages}")
        if self.split_cols is not None and (self.split_cols % 64 or self.split_cols <= 0):
            raise ValueError(f"split_cols must be a positive multiple of 64, got "
                             f"{self.split_cols}")


@dataclasses.dataclass(frozen=True)
class _Ctx:
    """What the consumer warpgroups of one CTA share: refs, the item and static sizes."""
    q_ref: Any  # (q_latent [B, H, Dc], q_pe [B, H, Dr]) in global memory
    q_smem: Any  # (latent [64, Dc], rope [64, Dr]) shared memory
    k_smem: Any
    o_smem: Any
    p_smem: Any
    stats: Any  # f32 [4, 64] shared memory: alpha, m, l of consumer 0, l of consumer 1
    lse_smem: Any
    q_bar: Any
    k_bar: Any
    free_bar: Any
    hand: Any  # two hand-over barriers (see each schedule)
    done: Any  # both consumers finished the loop (2 arrivals)
    o_ref: Any
    lse_ref: Any
    b: Any
    split: Any
    h0: Any
    length: Any
    first: Any
    cnt: Any
    n_full: Any
    dc: int  # latent width (padded): V = the first dc values of a cached token
    cols: tuple  # per consumer: its output column chunks ((start, width), ...), widths <= 256
    stages: int
    step: int  # tokens per pipeline step (pages_per_step * PAGE)
    qk_scale: float
    dtype: Any


_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per head row of a wgmma tile


def _row_full(value: float) -> jax.Array:
    return plgpu.layout_cast(jnp.full((_HEADS,), value, jnp.float32), _ROW)


def _rows(vec: jax.Array, x: jax.Array) -> jax.Array:
    """Broadcasts a per-row vector [64] over the columns of x [64, n]."""
    return lax.broadcast_in_dim(vec, x.shape, [0])


def _scores(c: _Ctx, slot: Any, t: Any, masked: bool) -> jax.Array:
    """S = Q K^T for step t (in ring slot ``slot``): [64 heads, step tokens] float32, with keys
    past the sequence's length at -inf when ``masked``."""
    def qk(s_ref):  # latent part, then rope part, into one accumulator
        dc = c.dc
        k_slot = c.k_smem.at[slot]
        plgpu.wgmma(s_ref, c.q_smem[0], k_slot.at[:, pl.ds(0, dc)].transpose((1, 0)))
        plgpu.wgmma(s_ref, c.q_smem[1],
                    k_slot.at[:, pl.ds(dc, k_slot.shape[1] - dc)].transpose((1, 0)))
        return s_ref[...]

    s = pl.run_scoped(qk, plgpu.ACC((_HEADS, c.step), jnp.float32))
    if masked:
        kpos = (c.first + t) * c.step + plgpu.broadcasted_iota(
            jnp.int32, (_HEADS, c.step), 1, layout=plgpu.Layout.WGMMA)
        s = jnp.where(kpos < c.length, s, -jnp.inf)
    return s


def _softmax_step(c: _Ctx, s: jax.Array, m_i: jax.Array, masked: bool):
    """Online softmax in base 2: (m_new, alpha = 2^(m - m_new), p = 2^(s c - m_new))."""
    m_new = jnp.maximum(m_i, s.max(axis=1) * c.qk_scale)
    # Every step holds a valid key, so m_new is finite; the guard is for safety only.
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
    return m_new, jnp.exp2(m_i - m_use), jnp.exp2(s * c.qk_scale - _rows(m_use, s))


def _column_chunks(start: int, stop: int) -> tuple:
    """Output columns [start, stop) as (start, width) chunks of <= 256 (the wgmma N limit)."""
    return tuple((s, min(256, stop - s)) for s in range(start, stop, 256))


def _zero_acc(c: _Ctx, w: int) -> tuple:
    """Consumer w's output accumulators, one float32 [64, width] array per column chunk."""
    return tuple(plgpu.layout_cast(jnp.zeros((_HEADS, width), jnp.float32), plgpu.Layout.WGMMA)
                 for _, width in c.cols[w])


def _rescale(acc: tuple, alpha: jax.Array) -> tuple:
    return tuple(a * _rows(alpha, a) for a in acc)


def _pv(c: _Ctx, acc: tuple, p: Any, slot: Any, w: int) -> tuple:
    """acc[j] [64, width_j] += p [64, step] @ V[:, chunk j of consumer w] of ring slot ``slot``
    (V is the latent part of the cached page); p is a register array or a shared-memory ref."""
    def pv(acc_refs):
        for ref, (start, width) in zip(acc_refs, c.cols[w]):
            plgpu.wgmma(ref, p, c.k_smem.at[slot, :, pl.ds(start, width)])

    return pl.run_state(pv)(tuple(plgpu.ACC.init(a) for a in acc))


def _load_q(c: _Ctx) -> None:
    """TMA of the 64-head query tile: latent and rope parts into their own shared memory (no
    concatenated copy of the queries in global memory)."""
    for i in range(2):
        plgpu.copy_gmem_to_smem(c.q_ref[i].at[c.b, pl.ds(c.h0, _HEADS)], c.q_smem[i],
                                c.q_bar.at[i])


def _wait_q(c: _Ctx) -> None:
    plgpu.barrier_wait(c.q_bar.at[0])
    plgpu.barrier_wait(c.q_bar.at[1])


def _store_out(c: _Ctx, w: int, acc: tuple, inv_l: jax.Array) -> None:
    """Writes this consumer's columns of out = acc / l through shared memory."""
    for smem, a in zip(c.o_smem[w], acc):
        smem[...] = a * _rows(inv_l, a)
    plgpu.commit_smem()
    for smem, (start, width) in zip(c.o_smem[w], c.cols[w]):
        plgpu.copy_smem_to_gmem(smem, c.o_ref.at[c.b, c.split, pl.ds(c.h0, _HEADS),
                                                 pl.ds(start, width)])


def _store_lse(c: _Ctx, m_i: jax.Array, l_i: jax.Array) -> None:
    has = l_i > 0.0
    c.lse_smem[...] = jnp.where(has, m_i * _LN2 + jnp.log(jnp.where(has, l_i, 1.0)), -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(c.lse_smem, c.lse_ref.at[c.b, c.split, pl.ds(c.h0, _HEADS)])


def _inverse(l_i: jax.Array) -> jax.Array:
    has = l_i > 0.0
    return jnp.where(has, 1.0 / jnp.where(has, l_i, 1.0), 0.0)


def _split_consumers(c: _Ctx, wg: Any) -> None:
    """schedule="split": consumer 0 computes every QK^T and softmax and hands P and alpha to
    consumer 1 (hand[0]: P ready, hand[1]: P read); each accumulates its column half of O."""
    p_ready, p_free = c.hand.at[0], c.hand.at[1]
    alpha_smem = c.stats.at[0]

    @pl.when(wg == 0)
    def _softmax_consumer():
        plgpu.set_max_registers(232, action="increase")
        _load_q(c)
        _wait_q(c)
        acc = _zero_acc(c, 0)

        def step(t, carry, masked: bool):
            acc, m_i, l_i = carry
            slot = lax.rem(t, c.stages)
            plgpu.barrier_wait(c.k_bar.at[slot])
            s = _scores(c, slot, t, masked)
            m_new, alpha, p = _softmax_step(c, s, m_i, masked)
            l_i = l_i * alpha + p.sum(axis=1)
            p16 = p.astype(c.dtype)

            @pl.when(t > 0)  # consumer 1 is done reading the previous P
            def _():
                plgpu.barrier_wait(p_free)

            c.p_smem[...] = p16
            alpha_smem[...] = alpha
            plgpu.commit_smem()
            plgpu.barrier_arrive(p_ready)
            acc = _pv(c, _rescale(acc, alpha), p16, slot, 0)
            plgpu.barrier_arrive(c.free_bar.at[slot])
            return acc, m_new, l_i

        carry = (acc, _row_full(-jnp.inf), _row_full(0.0))
        carry = lax.fori_loop(0, c.n_full, functools.partial(step, masked=False), carry)
        acc, m_i, l_i = lax.fori_loop(c.n_full, c.cnt, functools.partial(step, masked=True),
                                      carry)
        inv_l = _inverse(l_i)

        # Last hand-over: 1 / l for consumer 1, after it released the last P. By then both
        # consumers are done with Q and the ring, so the aliased output tiles may be written.
        @pl.when(c.cnt > 0)
        def _():
            plgpu.barrier_wait(p_free)

        alpha_smem[...] = inv_l
        plgpu.commit_smem()
        plgpu.barrier_arrive(p_ready)
        _store_lse(c, m_i, l_i)
        _store_out(c, 0, acc, inv_l)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _pv_consumer():
        plgpu.set_max_registers(232, action="increase")
        acc = _zero_acc(c, 1)

        def step(t, acc):
            slot = lax.rem(t, c.stages)
            plgpu.barrier_wait(c.k_bar.at[slot])
            plgpu.barrier_wait(p_ready)
            alpha = load(alpha_smem, layout=_ROW, optimized=False)
            acc = _pv(c, _rescale(acc, alpha), c.p_smem, slot, 1)
            plgpu.barrier_arrive(p_free)
            plgpu.barrier_arrive(c.free_bar.at[slot])
            return acc

        acc = lax.fori_loop(0, c.cnt, step, acc)
        plgpu.barrier_wait(p_ready)
        _store_out(c, 1, acc, load(alpha_smem, layout=_ROW, optimized=False))
        plgpu.wait_smem_to_gmem(0)


def _seesaw_consumers(c: _Ctx, wg: Any) -> None:
    """schedule="seesaw": consumer w computes QK^T and the softmax of the steps t = w (mod 2)
    and both accumulate their column half of O for every step, so each does the same matmul
    work. The owner of step t publishes P_t, alpha_t and the running max m_t in shared memory
    and arrives on hand[w]; the other consumer waits there, uses them for its half of P_t V_t
    and continues the softmax chain from m_t with its own step t + 1, whose QK^T it issued
    before waiting (so the tensor cores are busy while the chain waits). One P buffer
    suffices: the next writer of P is always the consumer that just finished reading it."""
    alpha_smem, m_smem = c.stats.at[0], c.stats.at[1]

    def consumer(w: int):
        plgpu.set_max_registers(232, action="increase")
        if w == 0:
            _load_q(c)
        _wait_q(c)
        mine, theirs = c.hand.at[w], c.hand.at[1 - w]

        def follow(t, acc, l_i):
            """The other consumer's step t: its P, alpha and m from shared memory."""
            slot = lax.rem(t, c.stages)
            plgpu.barrier_wait(c.k_bar.at[slot])
            plgpu.barrier_wait(theirs)
            alpha = load(alpha_smem, layout=_ROW, optimized=False)
            m_i = load(m_smem, layout=_ROW, optimized=False)
            acc = _pv(c, _rescale(acc, alpha), c.p_smem, slot, w)
            plgpu.barrier_arrive(c.free_bar.at[slot])
            return acc, m_i, l_i * alpha

        def own(j, carry):
            acc, m_i, l_i = carry
            t = 2 * j + w
            slot = lax.rem(t, c.stages)
            plgpu.barrier_wait(c.k_bar.at[slot])
            s = _scores(c, slot, t, masked=True)  # cheap: one select per score
            if w == 1:  # step t - 1 (always exists for consumer 1) came from consumer 0
                acc, m_i, l_i = follow(t - 1, acc, l_i)
            else:
                acc, m_i, l_i = lax.cond(
                    t > 0, lambda a: follow(t - 1, *a), lambda a: (a[0], m_i, a[1]),
                    (acc, l_i))
            m_new, alpha, p = _softmax_step(c, s, m_i, masked=True)
            l_i = l_i * alpha + p.sum(axis=1)
            p16 = p.astype(c.dtype)
            c.p_smem[...] = p16
            alpha_smem[...] = alpha
            m_smem[...] = m_new
            plgpu.commit_smem()
            plgpu.barrier_arrive(mine)
            acc = _pv(c, _rescale(acc, alpha), p16, slot, w)
            plgpu.barrier_arrive(c.free_bar.at[slot])
            return acc, m_new, l_i

        acc = _zero_acc(c, w)
        n_own = jnp.maximum(c.cnt - w + 1, 0) // 2
        carry = lax.fori_loop(0, n_own, own, (acc, _row_full(-jnp.inf), _row_full(0.0)))
        last = c.cnt - 1  # a last step owned by the other consumer is still to be followed
        acc, m_i, l_i = lax.cond((c.cnt > 0) & (lax.rem(last, 2) != w),
                                 lambda a: follow(last, a[0], a[2]), lambda a: a, carry)
        # Each consumer summed the row sums of its own steps (rescaled along the whole
        # chain): l = l_0 + l_1. The barrier also tells both that Q and the ring are free.
        c.stats.at[2 + w][...] = l_i
        plgpu.barrier_arrive(c.done)
        plgpu.barrier_wait(c.done)
        l_i = l_i + load(c.stats.at[3 - w], layout=_ROW, optimized=False)
        if w == 0:
            _store_lse(c, m_i, l_i)
        _store_out(c, w, acc, _inverse(l_i))
        plgpu.wait_smem_to_gmem(0)

    pl.when(wg == 0)(lambda: consumer(0))
    pl.when(wg == 1)(lambda: consumer(1))


def _kernel(ql_ref, qp_ref, cache_ref, pt_ref, len_ref, o_ref, lse_ref, *scratch, dk: int,
            dc: int, cols: tuple, stages: int, steps_per_split: int, pages_per_step: int,
            n_hb: int, n_splits: int, qk_scale: float, dtype: Any, schedule: str):
    union, p_smem, stats, lse_smem, q_bar, k_bar, free_bar, hand, done = scratch
    (q_smem, k_smem), o_smem = union
    wg = lax.axis_index("wg")
    item = lax.axis_index("x")
    hb, rest = item % n_hb, item // n_hb
    split, b = rest % n_splits, rest // n_splits
    h0 = hb * _HEADS
    length = len_ref[b]
    step = pages_per_step * PAGE
    first = split * steps_per_split  # step s = pages page_table[b, s * pages_per_step + i]
    cnt = jnp.clip((length + step - 1) // step - first, 0, steps_per_split)
    n_full = jnp.clip(length // step - first, 0, cnt)  # steps of this split with no padding
    ctx = _Ctx((ql_ref, qp_ref), q_smem, k_smem, o_smem, p_smem, stats, lse_smem, q_bar, k_bar,
               free_bar, hand, done, o_ref, lse_ref, b, split, h0, length, first, cnt, n_full,
               dc, cols, stages, step, qk_scale, dtype)
    consumers = _split_consumers if schedule == "split" else _seesaw_consumers
    consumers(ctx, wg)

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        n_pages = (length + PAGE - 1) // PAGE

        def issue(t, _):
            slot = lax.rem(t, stages)

            @pl.when(t >= stages)
            def _():
                plgpu.barrier_wait(free_bar.at[slot])

            for i in range(pages_per_step):
                j = (first + t) * pages_per_step + i  # a page past the sequence: page 0, masked
                page_id = jnp.where(j < n_pages, jnp.maximum(pt_ref[b, j], 0), 0)
                dst = k_smem.at[slot, pl.ds(i * PAGE, PAGE)] if pages_per_step > 1 else \
                    k_smem.at[slot]
                plgpu.copy_gmem_to_smem(cache_ref.at[page_id], dst, k_bar.at[slot])
            return None

        lax.fori_loop(0, cnt, issue, None)


def _smem_bytes(dk: int, dc: int, stages: int, step: int = PAGE) -> int:
    """Shared memory of one CTA (Q tile + page ring, aliased by the f32 output halves; P;
    softmax statistics; lse; barriers), an estimate: Mosaic checks the exact figure."""
    ring = 2 * dk * (_HEADS + stages * step)
    return max(ring, 4 * _HEADS * dc) + 2 * _HEADS * step + 5 * 4 * _HEADS + 1024


def unsupported(q_latent: jax.Array, cache: jax.Array,
                config: MLADecodeMosaicConfig = MLADecodeMosaicConfig()) -> str | None:
    """Why :func:`mla_decode_mosaic` cannot take these inputs, or None (16-bit cache, pages of
    64 tokens, dims that fit shared memory with a ring of ``num_stages`` pages, at least 2).
    Device checks are the caller's."""
    if cache.dtype not in (jnp.bfloat16, jnp.float16):
        return f"needs a bf16/f16 cache, got {cache.dtype}"
    if cache.ndim != 3 or cache.shape[1] != PAGE:
        return f"needs pages of {PAGE} tokens [num_pages, {PAGE}, Dc + Dr], got {cache.shape}"
    dc = round_up(q_latent.shape[-1], 128)
    dk = dc + round_up(cache.shape[-1] - q_latent.shape[-1], 64)
    stages = config.num_stages or 2
    step = (config.pages_per_step or 1) * PAGE
    if _smem_bytes(dk, dc, stages, step) > MAX_SMEM:
        return (f"Dc={q_latent.shape[-1]}, Dr={cache.shape[-1] - q_latent.shape[-1]} with "
                f"{stages} stages of {step} tokens exceed shared memory")
    return None


def default_num_splits(batch: int, head_blocks: int, pages: int, num_sms: int) -> int:
    """KV splits per sequence: one CTA per SM at a time (the accumulators fill the register
    file), so the Triton kernel's rule for 64-head programs applies: the split count whose last
    wave of CTAs is fullest (at most 4 waves, at least 90% of the SMs busy)."""
    return mla_triton.default_num_splits(batch, head_blocks, pages, num_sms, block_h=_HEADS)


@functools.partial(jax.jit, static_argnames=("sm_scale", "config", "interpret",
                                             "poison_output"))
def mla_decode_mosaic(q_latent: jax.Array, q_pe: jax.Array, cache: jax.Array,
                      page_table: jax.Array, lengths: jax.Array, *, sm_scale: float,
                      config: MLADecodeMosaicConfig = MLADecodeMosaicConfig(),
                      interpret: Any = False, poison_output: bool = False
                      ) -> tuple[jax.Array, jax.Array]:
    """Pallas Mosaic GPU `mla_decode`: (out_latent f32 [B, H, Dc], lse f32 [B, H]).

    Args:
        q_latent: [B, H, Dc]; q_pe: [B, H, Dr]; cache: [num_pages, 64, Dc + Dr] bf16/f16;
            page_table: int32 [B, P] (slots past a sequence's pages are ignored);
            lengths: int32 [B], 0 <= lengths <= P * 64.
        sm_scale: softmax scale (DeepSeek: qk_head_dim^-0.5 * mscale^2).
        config: the tuning knobs (:class:`MLADecodeMosaicConfig`).
        interpret: API parity with the other kernels (the Mosaic GPU interpreter of JAX 0.10
            cannot run ``run_state``; numerics are checked on a GPU).
        poison_output: partial outputs start as NaN so unwritten elements show (checks only).
    Raises:
        ValueError: unsupported dtype, page size or dims that do not fit shared memory.
    """
    b, h, dc, dr, page = check_mla_inputs(q_latent, q_pe, cache, page_table, lengths)
    reason = unsupported(q_latent, cache, config)
    if reason is not None:
        raise ValueError(f"mla_decode_mosaic: {reason}")
    num_splits, num_stages, schedule = config.num_splits, config.num_stages, config.schedule
    pages_per_step, split_cols = config.pages_per_step, config.split_cols
    no_auto_barriers = config.no_auto_barriers
    # One step = one page: the PV wgmma's K dimension (tokens) must be a multiple of 64 with
    # the 128-byte swizzle the 576-wide ring needs, so half-page steps are not possible.
    dc_p, dr_p = round_up(dc, 128), round_up(dr, 64)
    dk = dc_p + dr_p
    tpla_shard = dc_p == 256 and h > _HEADS  # a TPLA g=2 shard of DeepSeek-V3 (128 heads)
    if pages_per_step is None:
        # A TPLA g=2 shard (Dc = 256) with more than one 64-head block is compute-bound: two
        # pages per step (half the hand-overs) without automatic barriers take 5.3-5.6% fewer
        # cycles than seesaw at 128 heads on the H100 (Nsight Compute); at
        # 16-64 heads all forms read 92-96% of copy.
        fits = num_stages is None or _smem_bytes(dk, dc_p, num_stages, 2 * PAGE) <= MAX_SMEM
        pages_per_step = 2 if tpla_shard and schedule != "seesaw" and fits else 1
    step = pages_per_step * PAGE
    if num_stages is None:
        num_stages = max([2] + [n for n in (3, 4) if _smem_bytes(dk, dc_p, n, step) <= MAX_SMEM])
    if schedule == "auto":
        schedule = "seesaw" if num_stages * pages_per_step >= 4 and pages_per_step == 1 else "split"
    if _smem_bytes(dk, dc_p, num_stages, step) > MAX_SMEM:
        raise ValueError(f"mla_decode_mosaic: Dc={dc}, Dr={dr}, num_stages={num_stages}, "
                         f"pages_per_step={pages_per_step} exceed shared memory")
    dtype = cache.dtype
    if (dc_p, dr_p) != (dc, dr):  # test-size dims only: pad a copy of the cache
        cache = jnp.concatenate([
            jnp.pad(cache[..., :dc], ((0, 0), (0, 0), (0, dc_p - dc))),
            jnp.pad(cache[..., dc:], ((0, 0), (0, 0), (0, dr_p - dr)))], axis=-1)
    h_pad = round_up(h, _HEADS)
    # (no copies when the dtype, head count and dims already fit: DeepSeek's 128 heads)
    q_lat = jnp.pad(q_latent.astype(dtype), ((0, 0), (0, h_pad - h), (0, dc_p - dc)))
    q_pe = jnp.pad(q_pe.astype(dtype), ((0, 0), (0, h_pad - h), (0, dr_p - dr)))
    n_hb = h_pad // _HEADS
    p_max = page_table.shape[1]
    if num_splits is None:
        num_splits = default_num_splits(b, n_hb, p_max, num_sms())
    steps = -(-p_max // pages_per_step)
    sps = -(-steps // num_splits)  # steps per split
    # The last split may start past the table: pad it so every pt_ref read is in bounds.
    width = sps * num_splits * pages_per_step
    pt = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, width - p_max)))
    # DeepSeek's Dc = 512 with the split schedule: consumer 0 (QK^T + softmax) takes 192 of
    # the 512 PV columns and Mosaic's automatic barriers are off (H100, 128 heads: 82-84% of
    # copy vs 75-80% for Dc / 2 with them, 5.9% fewer cycles; equal at 16 and 64 heads). A
    # TPLA shard's two-page steps (see pages_per_step) also run without them.
    tuned_512 = schedule == "split" and dc_p == 512
    tuned_256 = schedule == "split" and tpla_shard and pages_per_step == 2
    if split_cols is None:
        split_cols = 192 if tuned_512 else dc_p // 2
    if no_auto_barriers is None:
        no_auto_barriers = tuned_512 or tuned_256
    if not split_cols < dc_p:
        raise ValueError(f"split_cols must be a multiple of 64 in (0, {dc_p}), got {split_cols}")
    cols = (_column_chunks(0, split_cols), _column_chunks(split_cols, dc_p))
    scratch = [
        plgpu.RefUnion(((smem((_HEADS, dc_p), dtype), smem((_HEADS, dr_p), dtype)),
                        smem((num_stages, step, dk), dtype)),
                       tuple(tuple(plgpu.SMEM((_HEADS, width), jnp.float32) for _, width in chunks)
                             for chunks in cols)),  # Q + ring | out column chunks
        smem((_HEADS, step), dtype),  # P handed between the consumers
        plgpu.SMEM((4, _HEADS), jnp.float32),  # alpha, m, l of each consumer
        plgpu.SMEM((_HEADS,), jnp.float32),  # lse
        plgpu.Barrier(num_barriers=2),  # Q loaded (latent, rope)
        plgpu.Barrier(num_arrivals=pages_per_step, num_barriers=num_stages),  # slot loaded
        plgpu.Barrier(num_arrivals=2, num_barriers=num_stages),  # slot free: both consumers
        plgpu.Barrier(num_barriers=2),  # hand-overs between the consumers (per schedule)
        plgpu.Barrier(num_arrivals=2),  # both consumers done with Q and the ring
    ]
    kernel = functools.partial(
        _kernel, dk=dk, dc=dc_p, cols=cols, stages=num_stages, steps_per_split=sps,
        pages_per_step=pages_per_step, n_hb=n_hb, n_splits=num_splits,
        qk_scale=float(sm_scale) * _LOG2E, dtype=dtype, schedule=schedule)
    out_type = (jax.ShapeDtypeStruct((b, num_splits, h_pad, dc_p), jnp.float32),
                jax.ShapeDtypeStruct((b, num_splits, h_pad), jnp.float32))
    params = plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0,
                                  unsafe_no_auto_barriers=no_auto_barriers)
    grid = dict(grid=(b * num_splits * n_hb,), grid_names=("x",), num_threads=3,
                thread_name="wg")
    extra = {} if interpret is False or interpret is None else {"interpret": interpret}
    args = (q_lat, q_pe, cache, pt, lengths.astype(jnp.int32))
    if not poison_output:
        outs, lses = plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch,
                                  compiler_params=params, **grid, **extra)(*args)
    else:  # NaN-filled outputs passed as mutable refs: unwritten elements stay NaN
        o_ref, lse_ref = (jax.new_ref(jnp.full(t.shape, jnp.nan, t.dtype)) for t in out_type)

        def body(*refs):
            pl.run_scoped(functools.partial(kernel, *refs), *scratch, collective_axes="wg")

        pl.kernel(body, out_type=(), mesh=plgpu.Mesh(**grid), compiler_params=params,
                  **extra)(*args, o_ref, lse_ref)
        outs, lses = o_ref[...], lse_ref[...]
    if num_splits == 1:  # already normalized: skip the merge (a pass over the outputs)
        out, lse = outs[:, 0], lses[:, 0]
    else:
        out, lse = combine_splits(outs, lses)
    return out[:, :h, :dc], lse[:, :h]
