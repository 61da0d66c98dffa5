"""Ring attention over a mesh axis with the block-sparse kernel, and the online-softmax combine.

Each function runs its kernel calls under ``shard_map`` over the whole mesh: batch rows over
`data`/`fsdp`, heads over `tensor` (where they divide, `ContextParallel.head_axis`) and tokens
over the ring axis, so every device computes only its own rows and heads. Per ring step a
device runs `pallas_kernels.block_sparse_attention(..., return_lse=True)` on one (query shard,
key shard) pair and folds ``(out, lse)`` into its running result (:func:`merge`); the
``ppermute`` that brings the next shard is issued before the step's kernel, so the transfer can
hide behind it (the scheduler overlaps the two: they do not depend on each other).

* :func:`prompt_attention`: a whole prompt (or packed rows) in ring order, pass-KV. Step s
  gives device i the K/V shard of device ``(i - s) mod n``. Step 0 (its own shard) is causal
  with local indices (its chunks are in ascending order, so local order is global order);
  later steps are key chunks wholly before or after the local ones, so a layout that lists only
  the blocks before (``key block <= query block`` in global block numbers) makes them exact
  with no token mask. Dense: that layout, plus the segment structure of packed rows. Sparse:
  each device's rows of the policy's layout (:mod:`jaxprefill.parallel.rows`), cut per step;
  a step with no listed block runs no kernel (``ContextParallel.skip_empty``).
* :func:`chunk_attention`: queries at ``q_offset`` against a cache view in natural order, both
  split over the ring axis: pass-KV (K/V shards travel), pass-Q (query shards travel, partial
  outputs return by one all-to-all), chosen by :mod:`jaxprefill.parallel.plan`; or, when the
  queries do not split evenly (decode: one query), flash-decoding: every device attends the
  (replicated) queries to its own cache shard and the partials combine across the axis.

Both take ``differentiable=True`` for training: the steps then run a kernel with a backward pass
(:mod:`jaxprefill.parallel.backward`); ppermute, scan, cond and the combine differentiate as is.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import BlockSparseLayout, SegmentIds, block_sparse_attention
from pallas_kernels.layout import block_mask_to_layout_arrays, structured_layout
from jaxprefill.parallel import backward, plan, rows as rowlib, zigzag
from jaxprefill.parallel.context import ContextParallel, shard_map
from jaxprefill.sparse import Policy, Prefill


# ----------------------------------------------------------------------------- combine
def merge(out: jax.Array, lse: jax.Array, o: jax.Array, l: jax.Array
          ) -> tuple[jax.Array, jax.Array]:
    """Online-softmax combine of two partial attentions over disjoint key sets.

    out, o: [B, S, H, Dv] (out float32, o any float dtype); lse, l: float32 [B, H, S]
    (natural log; -inf where a row saw no key, whose output is 0). Returns float32
    (out, lse) of the union; a row empty in both stays (0, -inf).
    """
    return merge_many(out, lse, [(o, l)])


def merge_many(out: jax.Array, lse: jax.Array, parts: list) -> tuple[jax.Array, jax.Array]:
    """:func:`merge` of ``out, lse`` with several partials ``[(o, l), ...]`` at once: one pass
    over the float32 accumulator for all of them (XLA fuses it into one elementwise kernel)."""
    lses = [lse] + [l for _, l in parts]
    m = functools.reduce(jnp.maximum, lses)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    weights = [jnp.exp(l - m) for l in lses]
    total = functools.reduce(jnp.add, weights)
    safe = jnp.where(total > 0, total, 1.0)
    rows = lambda w: jnp.swapaxes(w / safe, 1, 2)[..., None]  # noqa: E731  [B,H,S] -> [B,S,H,1]
    new = out * rows(weights[0])
    for (o, _), w in zip(parts, weights[1:]):
        new = new + o.astype(jnp.float32) * rows(w)
    return new, jnp.where(total > 0, m + jnp.log(safe), -jnp.inf)


def empty_partial(q: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(out float32 zeros [B, Sq, Hq, Dv], lse -inf [B, Hq, Sq]): attention over no key."""
    b, s, h, _ = q.shape
    return (jnp.zeros((b, s, h, v.shape[-1]), jnp.float32),
            jnp.full((b, h, s), -jnp.inf, jnp.float32))


def merge_stack(o: jax.Array, l: jax.Array) -> jax.Array:
    """Combine of partials stacked on axis 0: o [N, B, S, H, Dv], l [N, B, H, S] -> float32
    [B, S, H, Dv]."""
    m = jnp.max(l, axis=0)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(l - m)  # [N, B, H, S]
    total = jnp.sum(w, axis=0)
    w = w / jnp.where(total > 0, total, 1.0)
    return jnp.sum(o.astype(jnp.float32) * jnp.swapaxes(w, 2, 3)[..., None], axis=0)


# ----------------------------------------------------------------------------- one step
def _step(q, k, v, layout: BlockSparseLayout, *, causal: bool, q_offset, sm_scale: float,
          segs, impl: str, interpret: Any, options: dict, skip: bool,
          differentiable: bool = False):
    """(out [B, Sq, Hq, Dv] in q's dtype, lse float32 [B, Hq, Sq]) of one (query, key) shard
    pair; with ``skip``, a layout that lists nothing runs no kernel. ``differentiable``: the
    caller takes gradients (the "xla" kernel then runs with :func:`backward.xla_step`'s rule)."""

    def compute(_):
        if differentiable and impl == "xla":
            return backward.xla_step(q, k, v, layout, causal=causal, sm_scale=sm_scale,
                                     q_offset=q_offset, segment_ids=segs, options=options)
        return block_sparse_attention(q, k, v, layout, causal=causal, sm_scale=sm_scale,
                                      q_offset=q_offset, segment_ids=segs, return_lse=True,
                                      impl=impl, interpret=interpret, **options)

    if not skip:
        return compute(None)

    def empty(_):
        out, lse = empty_partial(q, v)
        return out.astype(q.dtype), lse

    return jax.lax.cond(rowlib.has_work(layout), compute, empty, None)


def dense_step_layout(mine: jax.Array, theirs: jax.Array, *, c: int, block: int, heads: int,
                      batch: int, causal: bool, q_seg: jax.Array | None,
                      kv_seg: jax.Array | None) -> BlockSparseLayout:
    """Layout [B, heads, m*cb, m*cb] of dense attention from the local query chunks ``mine`` to
    a shard holding chunks ``theirs``: key blocks at or before each query block (global block
    numbers; causal), blocks whose segment id ranges meet (packed rows)."""
    if q_seg is None:
        return _prefix_layout(mine, theirs, c=c, block=block, heads=heads, batch=batch,
                              causal=causal)
    gq = rowlib.visiting_blocks(mine, c, block)
    gk = rowlib.visiting_blocks(theirs, c, block)
    mask = jnp.ones((batch, gq.shape[0], gk.shape[0]), bool)
    if causal:
        mask &= (gk[None, :] <= gq[:, None])[None]
    qlo, qhi = rowlib.block_range(q_seg, block)
    klo, khi = rowlib.block_range(kv_seg, block)
    mask &= jnp.maximum(qlo[:, :, None], klo[:, None, :]) <= jnp.minimum(qhi[:, :, None],
                                                                         khi[:, None, :])
    kv_idx, kv_cnt = block_mask_to_layout_arrays(mask[:, None], gk.shape[0])  # one head
    kv_idx = jnp.broadcast_to(kv_idx, (batch, heads) + kv_idx.shape[2:])
    kv_cnt = jnp.broadcast_to(kv_cnt, (batch, heads) + kv_cnt.shape[2:])
    return BlockSparseLayout(kv_idx, kv_cnt, block, block, gk.shape[0])


def _prefix_layout(mine: jax.Array, theirs: jax.Array, *, c: int, block: int, heads: int,
                   batch: int, causal: bool) -> BlockSparseLayout:
    """:func:`dense_step_layout` without segments. A shard's chunks are in ascending global
    order (``zigzag.chunk_table``), so the key blocks at or before a query block are a prefix
    of the shard's blocks, and their count (a sum over the shard's few chunks) is the whole
    layout: a step's layout, built at run time from traced device and step indices, takes a
    couple of elementwise kernels instead of a mask and a sort. Same arrays as
    ``block_mask_to_layout_arrays``: entries past the count repeat the last listed block (0
    when none)."""
    cb = c // block
    nk = theirs.shape[0] * cb
    gq = rowlib.visiting_blocks(mine, c, block)  # [m*cb] global query blocks
    if causal:  # key blocks theirs[t]*cb + u, u < cb, at or before gq
        cnt = sum(jnp.clip(gq - theirs[t] * cb + 1, 0, cb) for t in range(theirs.shape[0]))
        cnt = cnt.astype(jnp.int32)
    else:
        cnt = jnp.full(gq.shape, nk, jnp.int32)
    idx = jnp.minimum(jnp.arange(nk, dtype=jnp.int32)[None, :], jnp.maximum(cnt - 1, 0)[:, None])
    kv_idx = jnp.broadcast_to(idx, (batch, heads) + idx.shape)
    kv_cnt = jnp.broadcast_to(cnt, (batch, heads) + cnt.shape)
    return BlockSparseLayout(kv_idx, kv_cnt, block, block, nk)


def ring_steps(axis: str | None, n: int, shard: Any, visit, fold, acc: Any, group: int = 1,
               send=None) -> Any:
    """Folds the n steps of a ring pass, ``group`` steps at a time:
    ``acc = fold(acc, steps, [visit(step, shard) for step in steps])``, where at step s this
    device holds the ``shard`` device ``(i - s) mod n`` started with.

    The transfer of the next shard is issued before each visit (they are independent, so the
    scheduler overlaps them). The first group (its step 0 is the int 0: the device's own shard)
    and the last (nothing left to send after its last step) run outside the loop; the groups
    between run in a ``lax.scan`` (traced steps), so the program holds one group's buffers
    whatever n. Folding several steps at once lets a merge pass over the accumulator once per
    group instead of once per step. ``send`` replaces the ``ppermute`` over ``axis`` (virtual
    rings on one device).
    """
    if send is None:
        perm = [(j, (j + 1) % n) for j in range(n)]
        send = lambda x: jax.lax.ppermute(x, axis, perm)  # noqa: E731
    group = max(1, min(group, n))

    def run(held, steps, acc, last):
        parts = []
        for t, step in enumerate(steps):
            nxt = None if last and t == len(steps) - 1 else send(held)
            parts.append(visit(step, held))
            held = nxt
        return held, fold(acc, steps, parts)

    first = list(range(group))
    held, acc = run(shard, first, acc, last=n == group)
    rest = n - group
    middle, tail = (rest - 1) // group if rest else 0, None
    if rest:
        tail = list(range(group + middle * group, n))
    if middle:
        def body(carry, base):
            held, acc = carry
            return run(held, [base + t for t in range(group)], acc, last=False), None

        bases = group + group * jnp.arange(middle, dtype=jnp.int32)
        (held, acc), _ = jax.lax.scan(body, (held, acc), bases)
    if tail:
        held, acc = run(held, tail, acc, last=True)
    return acc


def merge_fold(acc, steps, parts):
    """``fold`` of :func:`ring_steps` that merges (out, lse) partials; acc starts as
    float32 zeros and -inf lse (:func:`empty_partial`)."""
    return merge_many(*acc, parts)


def _kernel_name(ctx: ContextParallel, call: Prefill | None) -> str:
    return ctx.kernel if ctx.kernel != "auto" or call is None else call.kernel


def _specs(ctx: ContextParallel, b: int, hq: int, hkv: int):
    bax, hax = ctx.batch_axes(b), ctx.head_axis(hq, hkv)
    return bax, hax, P(bax, ctx.axis, hax, None)


# ----------------------------------------------------------------------------- prompts
def prompt_attention(ctx: ContextParallel, q: jax.Array, k: jax.Array, v: jax.Array, *,
                     causal: bool = True,
                     segment_ids: tuple[jax.Array, jax.Array] | None = None,
                     sm_scale: float | None = None, policy: Policy | None = None,
                     call: Prefill | None = None, differentiable: bool = False) -> jax.Array:
    """Ring attention (pass-KV) of a prompt in ring order (module docstring).

    Args:
      q [B, S, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv]: in ring order
        (:mod:`jaxprefill.parallel.zigzag`), S a multiple of the ring's chunks x block.
      segment_ids: (q_seg, kv_seg) int32 [B, S] in ring order (packed rows), or None.
      policy, call: the sparse policy and its classified call (kind "prompt" or "packed"),
        or None for dense attention.
      differentiable: the caller takes gradients: the kernel must be one of
        `backward.DIFFERENTIABLE` (ValueError otherwise; `ContextParallel.kernel` "auto" with no
        sparse kernel named runs "xla").
    Returns:
      [B, S, Hq, Dv] in q's dtype, in ring order, sharded like q.
    """
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    n, m, zig = ctx.n, ctx.chunks_per_device, ctx.zigzag
    if k.shape[1] != s:
        raise ValueError(f"context parallelism: a prompt needs as many queries as keys, got "
                         f"{s} and {k.shape[1]}")
    block = policy.block_size if policy is not None else ctx.block
    if s % (n * m) or (s // (n * m)) % block:
        raise ValueError(f"context parallelism: {s} tokens do not split into {n * m} chunks of "
                         f"whole {block}-token blocks; pad to ContextParallel.padded_length "
                         f"(models do) and keep the policy's block_size <= "
                         f"ContextParallel.block")
    c = s // (n * m)
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale
    bax, hax, seq = _specs(ctx, b, hq, hkv)
    if policy is not None:
        rowlib.check_policy(policy, tensor_split=hax is not None)
    lengths = None if call is None else call.lengths
    # The call's arrays enter shard_map as arguments; the rest of it is static.
    bare = None if call is None else dataclasses.replace(call, lengths=None, q_offset=None,
                                                         segment_ids=None)
    options = {} if policy is None else policy.kernel_options(s)
    impl, axis = _kernel_name(ctx, call), ctx.axis
    if differentiable:
        impl = backward.differentiable_kernel(ctx.kernel, "auto" if call is None else call.kernel)
    if call is not None and call.kernel_config is not None and impl == call.kernel:
        options = {**options, "config": call.kernel_config}  # the sparse config's knobs
    has_seg, has_len = segment_ids is not None, lengths is not None
    table = zigzag.chunk_table(n, zig)
    # Dense zigzag steps are never empty; everything else may be (a cond skips the kernel).
    skip = ctx.skip_empty and (policy is not None or (causal and not zig))

    def body(q, k, v, *extra):
        extra = list(extra)
        q_seg = extra.pop(0) if has_seg else None
        kv_seg = extra.pop(0) if has_seg else None
        lens = extra.pop(0) if has_len else None
        i = jax.lax.axis_index(axis)
        chunks = jnp.asarray(table)
        mine = chunks[i]
        rows = None
        if policy is not None:
            rows = rowlib.device_rows(policy, bare, q, k, axis_name=axis, n=n, zig=zig,
                                      mine=mine, lengths=lens,
                                      q_seg=q_seg if bare.kind == "packed" else None)

        def visit(step, shard):
            k_s, v_s, seg_s = shard
            theirs = chunks[(i - step) % n]
            own = isinstance(step, int) and step == 0
            if rows is None:
                layout = dense_step_layout(mine, theirs, c=c, block=block, heads=k.shape[2],
                                           batch=q.shape[0], causal=causal, q_seg=q_seg,
                                           kv_seg=seg_s)
            else:
                layout = rowlib.step_layout(rows, mine, theirs, c=c, block=block,
                                            causal=causal, own=own)
            segs = None if q_seg is None else SegmentIds(q_seg, seg_s)
            return _step(q, k_s, v_s, layout, causal=causal and own, q_offset=None,
                         sm_scale=sm_scale, segs=segs, impl=impl, interpret=ctx.interpret,
                         options=options, skip=skip, differentiable=differentiable)

        out, _ = ring_steps(axis, n, (k, v, kv_seg), visit, merge_fold, empty_partial(q, v),
                            group=ctx.merge_every)
        return out.astype(q.dtype)

    args, specs = [q, k, v], [seq, seq, seq]
    if has_seg:
        args += [segment_ids[0], segment_ids[1]]
        specs += [P(bax, axis), P(bax, axis)]
    if has_len:
        args.append(jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), (b,)))
        specs.append(P(bax))
    fn = shard_map(body, mesh=ctx.mesh, in_specs=tuple(specs), out_specs=seq, check_vma=False)
    return fn(*args)


def virtual_ring(q: jax.Array, k: jax.Array, v: jax.Array, n: int, *, block: int = 128,
                 zig: bool = True, causal: bool = True, sm_scale: float | None = None,
                 impl: str = "auto", interpret: Any = False, ordered: bool = False,
                 merge_every: int = 8) -> jax.Array:
    """Dense ring attention of n *virtual* devices on one device: every (device, step) kernel
    call of :func:`prompt_attention` and its combine, one after another (what splitting costs,
    without a network; GPU checks and benchmarks). Devices run in a ``lax.map``, their steps as
    :func:`ring_steps` groups them (``merge_every``). A visiting shard is read in place: the
    step's layout lists its blocks of the whole ring-order K/V (a device of a real ring
    attends to the buffer the transfer filled; a sliced copy per step would add traffic that
    no real ring has).

    q [B, S, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv] in natural order (``ordered``: in
    ring order, as a model's activations are), S a multiple of the ring's chunks x block.
    Returns [B, S, Hq, Dv] in the inputs' order.
    """
    b, s, hq, d = q.shape
    m = zigzag.chunks_per_device(zig)
    if s % (n * m) or (s // (n * m)) % block:
        raise ValueError(f"virtual_ring: {s} tokens do not split into {n * m} chunks of whole "
                         f"{block}-token blocks")
    c, local = s // (n * m), s // n
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale
    qr, kr, vr = (x if ordered else zigzag.to_ring(x, n, zig) for x in (q, k, v))
    table = jnp.asarray(zigzag.chunk_table(n, zig))
    shard = lambda x, j: jax.lax.dynamic_slice_in_dim(x, j * local, local, axis=1)  # noqa: E731

    def device(i):
        q_i = shard(qr, i)

        def visit(step, _):
            j = (i - step) % n
            own = isinstance(step, int) and step == 0
            layout = dense_step_layout(table[i], table[j], c=c, block=block, heads=k.shape[2],
                                       batch=b, causal=causal, q_seg=None, kv_seg=None)
            layout = dataclasses.replace(layout, kv_idx=layout.kv_idx + j * (local // block),
                                         num_kv_blocks=s // block)
            # own step: local query r sits at key index i * local + r of the whole K/V
            q_offset = jnp.full((b,), i * local, jnp.int32) if own else None
            return _step(q_i, kr, vr, layout, causal=causal and own, q_offset=q_offset,
                         sm_scale=sm_scale, segs=None, impl=impl, interpret=interpret,
                         options={}, skip=False)

        acc = ring_steps(None, n, None, visit, merge_fold, empty_partial(q_i, v),
                         group=merge_every, send=lambda x: x)
        return acc[0].astype(q.dtype)

    outs = jax.lax.map(device, jnp.arange(n, dtype=jnp.int32))  # [n, B, local, Hq, Dv]
    out = jnp.moveaxis(outs, 0, 1).reshape(b, s, hq, v.shape[-1])
    return out if ordered else zigzag.from_ring(out, n, zig)


# ----------------------------------------------------------------------------- chunks
def chunk_attention(ctx: ContextParallel, q: jax.Array, k: jax.Array, v: jax.Array, *,
                    q_offset: jax.Array, causal: bool = True, sm_scale: float | None = None,
                    kernel: str = "auto", differentiable: bool = False) -> jax.Array:
    """Queries at ``q_offset`` against a cache view, both in natural order (module docstring).

    Args:
      q [B, Sq, Hq, D]: query i of row b at key index q_offset[b] + i.
      k [B, Sk, Hkv, D], v [B, Sk, Hkv, Dv]: the cache view, Sk a multiple of the ring length
        (its slots split contiguously over the axis).
      q_offset: int32 [B] or scalar.
      kernel: the step kernel when ``ctx.kernel`` is "auto".
      differentiable: the caller takes gradients (as in :func:`prompt_attention`).
    Returns:
      [B, Sq, Hq, Dv] in q's dtype.
    """
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    n, axis = ctx.n, ctx.axis
    if sk % n:
        raise ValueError(f"context parallelism: a cache view of {sk} slots does not split over "
                         f"the {n} devices of mesh axis {axis!r}")
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale
    off = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (b,))
    bax, hax, seq = _specs(ctx, b, hq, hkv)
    schedule = schedule_for(ctx, sq, sk, hq, hkv, q.dtype.itemsize)
    sk_l = sk // n
    impl = ctx.kernel if ctx.kernel != "auto" else kernel
    if differentiable:
        impl = backward.differentiable_kernel(ctx.kernel, kernel)
    step_kw = dict(sm_scale=sm_scale, segs=None, impl=impl, interpret=ctx.interpret, options={},
                   skip=ctx.skip_empty, differentiable=differentiable)

    def shard_layout(rel, sq_l, heads):
        bq = ctx.block if sq_l >= ctx.block else 16 if sq_l < 64 else 64
        return structured_layout(sq_l, sk_l, rel.shape[0], heads, block_q=bq,
                                 block_k=ctx.block, causal=causal, q_offset=rel,
                                 segment_ids=None)

    def attend_shard(qs, ks, vs, rel):
        layout = shard_layout(rel, qs.shape[1], ks.shape[2])
        return _step(qs, ks, vs, layout, causal=causal, q_offset=rel, **step_kw)

    if schedule == "replicated":
        def body(q, k, v, off):
            d_i = jax.lax.axis_index(axis)
            o, l = attend_shard(q, k, v, off - d_i * sk_l)
            top = jax.lax.pmax(l, axis)
            top = jnp.where(jnp.isfinite(top), top, 0.0)
            w = jnp.exp(l - top)  # [B, H, Sq]
            num = jax.lax.psum(o.astype(jnp.float32) * jnp.swapaxes(w, 1, 2)[..., None], axis)
            den = jax.lax.psum(w, axis)
            den = jnp.swapaxes(jnp.where(den > 0, den, 1.0), 1, 2)[..., None]
            return (num / den).astype(q.dtype)

        rep = P(bax, None, hax, None)
        fn = shard_map(body, mesh=ctx.mesh, in_specs=(rep, seq, seq, P(bax)), out_specs=rep,
                       check_vma=False)
        return fn(q, k, v, off)

    sq_l = sq // n

    def pass_kv(q, k, v, off):
        i = jax.lax.axis_index(axis)

        def visit(step, shard):
            return attend_shard(q, shard[0], shard[1], off + i * sq_l - ((i - step) % n) * sk_l)

        out, _ = ring_steps(axis, n, (k, v), visit, merge_fold, empty_partial(q, v),
                            group=ctx.merge_every)
        return out.astype(q.dtype)

    def pass_q(q, k, v, off):
        i = jax.lax.axis_index(axis)

        def visit(step, shard):
            return attend_shard(shard, k, v, off + ((i - step) % n) * sq_l - i * sk_l)

        def keep(acc, steps, parts):  # step s holds owner (i - s) mod n's queries
            for step, (o, l) in zip(steps, parts):
                owner = (i - step) % n
                acc = (acc[0].at[owner].set(o.astype(jnp.float32)), acc[1].at[owner].set(l))
            return acc

        o0, l0 = empty_partial(q, v)
        acc = (jnp.zeros((n,) + o0.shape, jnp.float32), jnp.full((n,) + l0.shape, -jnp.inf))
        o_by_owner, l_by_owner = ring_steps(axis, n, q, visit, keep, acc)
        # Send each owner its partials (entry d of the result: device d's part), then combine.
        o_home = jax.lax.all_to_all(o_by_owner, axis, 0, 0, tiled=True)
        l_home = jax.lax.all_to_all(l_by_owner, axis, 0, 0, tiled=True)
        return merge_stack(o_home, l_home).astype(q.dtype)

    body = pass_kv if schedule == "pass_kv" else pass_q
    fn = shard_map(body, mesh=ctx.mesh, in_specs=(seq, seq, seq, P(bax)), out_specs=seq,
                   check_vma=False)
    return fn(q, k, v, off)


def schedule_for(ctx: ContextParallel, sq: int, sk: int, hq: int, hkv: int,
                 itemsize: int) -> str:
    """"replicated" (queries that do not split evenly: flash-decoding), or the configured /
    cost-rule schedule. The rule takes the cached prefix as Sk - Sq (static shapes only)."""
    if sq % ctx.n:
        return "replicated"
    if ctx.schedule != "auto":
        return ctx.schedule
    return plan.choose_schedule(sq, sk - sq, ctx.n, hq, hkv, itemsize)


__all__ = ["chunk_attention", "dense_step_layout", "empty_partial", "merge", "merge_fold",
           "merge_stack", "prompt_attention", "ring_steps", "schedule_for", "virtual_ring"]
