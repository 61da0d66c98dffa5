"""DeepSeek sparse attention (DSA) ops: the lightning indexer's top-k and sparse MLA.

    idx = index_topk(q, weights, k, topk, q_offset=..., segment_ids=...)   # int32 [B, S, K]
    out_latent, lse = sparse_mla(q_latent, q_pe, kv, rows, sm_scale)        # rows from idx

Semantics: :mod:`pallas_kernels.dsa_reference` (top-k per query under the causal limit, lower
key index first among equal scores, selected indices ascending then -1; the absorbed MQA
attention over the selected latent rows). Shapes: q [B, S, Hi, D] (V3.2: 64 x 128), weights
float32 [B, S, Hi] (every scale folded in), k [B, T, D]; q_latent [B, S, H, Dc], q_pe
[B, S, H, Dr], kv [N, Dc + Dr] (a latent cache's pages flattened, or a prompt's latents),
rows int32 [B, S, K] indices into kv (-1: none; a query's valid rows first).

Backends (one resolver per op: :func:`index_topk_backend`, :func:`sparse_mla_backend`):

    triton       NVIDIA GPUs. index_topk: the fused score kernel writes order keys for a chunk
                 of query rows [B, C, T] (never [S, T]); each 8K-key segment's top-k is
                 searched, selected and compacted on registers, then the candidates' (a
                 tournament, _dsa_common.topk_keys); sparse_mla: gathers block_k rows per step.
    mosaic_tpu   TPUs: the same score kernel and k-th key search, the selections compacted by
                 XLA; opt-in: verified in TPU interpret mode only.
    xla          anywhere: chunks of query rows, `lax.top_k` (scores [B, C, Hi, T] per chunk);
                 chunks of queries gathering [B, C, K, Dc + Dr] rows. What CPUs run.
    reference    float32, everything materialized (tests).

FP8 (``fp8=True``): q and k rounded to float8 e4m3 with one scale per 128-value row (DeepSeek's
per-128 blocks at D = 128), the score products in FP8 with float32 accumulation; every backend
computes the same rounded scores, so selections agree up to summation order.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import backends
from pallas_kernels._dsa_common import kth_key_xla, kth_select, order_key, topk_keys
from pallas_kernels._estimation_common import pow2
from pallas_kernels.dsa_reference import (allowed, canonical, check_index_inputs,
                                          check_sparse_inputs, fp8_index_inputs,
                                          fp8_index_queries, index_scores_reference,
                                          query_positions, select_topk, sparse_mla_reference)
from pallas_kernels.gpu import dsa_index_triton as tri
from pallas_kernels.gpu.sparse_mla_triton import default_block_h as sparse_block_h
from pallas_kernels.gpu.sparse_mla_triton import sparse_mla_triton
from pallas_kernels.tpu import dsa_index_tpu as tpu
from pallas_kernels.tpu.sparse_mla_tpu import sparse_mla_tpu

# Bytes of the largest per-chunk intermediate each path allows itself (the chunk of query rows
# is sized from it): XLA scores [B, C, Hi, T] float32, kernel order keys [B, C, T] int32,
# gathered rows [B, C, K, Dc + Dr].
CHUNK_BYTES = 1 << 28
GPU_SMS = 132  # programs per wave the Triton launch heuristics aim at (H100 SXM)


@dataclasses.dataclass(frozen=True)
class IndexCall:
    """What the index_topk backends look at."""

    q: Any
    k: Any
    topk: int
    interpret: bool = False


@dataclasses.dataclass(frozen=True)
class SparseMLACall:
    """What the sparse_mla backends look at."""

    q_latent: Any
    kv: Any
    interpret: bool = False


def _triton_index_refusal(call: IndexCall) -> str | None:
    if call.q.shape[-1] > 256:
        return f"index head dims > 256 (got {call.q.shape[-1]}) exceed its query tile"
    return None


def _triton_sparse_refusal(call: SparseMLACall) -> str | None:
    if call.kv.dtype == jnp.float32 and not call.interpret:
        return "float32 latents: its tiles overflow shared memory at 64 heads (use xla)"
    return None


INDEX_BACKENDS = (
    backends.Backend("triton", ("gpu",), _triton_index_refusal),
    backends.Backend("mosaic_tpu", ("tpu",), auto=False,
                     auto_note="opt-in: verified in TPU interpret mode only"),
    backends.Backend("xla"),
    backends.Backend("reference", auto=False, auto_note="tests only (materializes [B, S, T])"),
)
SPARSE_BACKENDS = (
    backends.Backend("triton", ("gpu",), _triton_sparse_refusal),
    backends.Backend("mosaic_tpu", ("tpu",), auto=False,
                     auto_note="opt-in: verified in TPU interpret mode only"),
    backends.Backend("xla"),
    backends.Backend("reference", auto=False, auto_note="tests only (float32, all rows gathered)"),
)
INDEX_IMPLS = ("auto",) + tuple(b.name for b in INDEX_BACKENDS)
SPARSE_IMPLS = ("auto",) + tuple(b.name for b in SPARSE_BACKENDS)


def index_topk_backend(q: jax.Array, k: jax.Array, topk: int, *, impl: str = "auto",
                       interpret: bool = False) -> str:
    """The implementation :func:`index_topk` runs for these inputs (see module)."""
    return backends.resolve("index_topk", INDEX_BACKENDS, impl,
                            IndexCall(q, k, topk, bool(interpret)), interpret=bool(interpret))


def sparse_mla_backend(q_latent: jax.Array, kv: jax.Array, *, impl: str = "auto",
                       interpret: bool = False) -> str:
    """The implementation :func:`sparse_mla` runs for these inputs (see module)."""
    return backends.resolve("sparse_mla", SPARSE_BACKENDS, impl,
                            SparseMLACall(q_latent, kv, bool(interpret)),
                            interpret=bool(interpret))


# ---- index_topk ----------------------------------------------------------------------------

def _chunked(fn, s: int, chunk: int, per_row: tuple, fills: tuple):
    """fn over chunks of `chunk` query rows (axis 1 of each array in per_row, padded with the
    matching value of `fills`), concatenated back along axis 1 and cut to s rows."""
    if s <= chunk:
        return fn(*per_row)
    n = -(-s // chunk)
    padded = [jnp.pad(x, ((0, 0), (0, n * chunk - s)) + ((0, 0),) * (x.ndim - 2),
                      constant_values=f) for x, f in zip(per_row, fills)]
    split = [x.reshape(x.shape[0], n, chunk, *x.shape[2:]).swapaxes(0, 1) for x in padded]
    out = jax.lax.map(lambda xs: fn(*xs), tuple(split))  # [n, B, chunk, ...]
    out = out.swapaxes(0, 1)
    return out.reshape(out.shape[0], n * chunk, *out.shape[3:])[:, :s]


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def _xla_topk(q, w, k, topk, q_pos, seg_q, seg_k, k_scale, chunk):
    b, s, hi, _ = q.shape
    t = k.shape[1]
    if chunk is None:
        chunk = _pow2_floor(max(1, CHUNK_BYTES // (4 * b * hi * t)))

    if k.dtype == jnp.float8_e4m3fn:  # e4m3 values are exact in bf16: any device's dots
        q, k = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)

    def one(qc, wc, posc, sqc):
        dots = jnp.einsum("bchd,btd->bcht", qc, k, preferred_element_type=jnp.float32)
        sc = jnp.einsum("bch,bcht->bct", wc, jnp.maximum(dots, 0.0))
        if k_scale is not None:
            sc = sc * k_scale[:, None, :]
        ok = allowed(posc, t, None if seg_q is None else sqc, seg_k)
        kk = min(topk, t)
        _, idx = jax.lax.top_k(jnp.where(ok, canonical(sc), -jnp.inf), kk)  # lower index first
        n_ok = jnp.minimum(jnp.sum(ok, axis=-1, keepdims=True), kk)
        picked = jnp.sort(jnp.where(jnp.arange(kk) < n_ok, idx, t), axis=-1)
        return jnp.where(picked < t, picked, -1).astype(jnp.int32)

    sq = jnp.zeros((b, s), jnp.int32) if seg_q is None else seg_q
    return _chunked(one, s, chunk, (q, w.astype(jnp.float32), q_pos, sq), (0, 0, -1, 0))


def _kernel_chunk(b: int, t: int) -> int:
    """Query rows per step of the kernel paths: order keys [B, C, T] int32 within CHUNK_BYTES."""
    return _pow2_floor(max(8, CHUNK_BYTES // (4 * b * t)))


def _kernel_topk(q, w, k, topk, q_pos, seg_q, seg_k, k_scale, chunk, keys_fn, seg_topk, width):
    b, s = q.shape[:2]
    t = k.shape[1]

    def one(qc, wc, posc, sqc):
        keys = keys_fn(qc, wc, k, posc, None if seg_q is None else sqc, seg_k, k_scale)
        c = qc.shape[1]
        return topk_keys(keys.reshape(b * c, t), topk, seg_topk, width).reshape(b, c, -1)

    sq = jnp.zeros((b, s), jnp.int32) if seg_q is None else seg_q
    return _chunked(one, s, chunk, (q, w.astype(jnp.float32), q_pos, sq), (0, 0, -1, 0))


def _triton_keys(config: dict, interpret: bool, b: int, rows: int, hi: int):
    """index_keys_triton with ``config``; by default enough key splits to fill the GPU when
    the query blocks alone do not (decode: one query per sequence)."""
    config = dict(config)
    if "key_splits" not in config:
        bq = config.get("block_q") or tri.scores_block_q(pow2(hi), rows)
        blocks = b * -(-rows // bq)
        config["key_splits"] = max(1, -(-2 * GPU_SMS // blocks))
    return functools.partial(tri.index_keys_triton, interpret=interpret, **config)


def index_topk(q: jax.Array, weights: jax.Array, k: jax.Array, topk: int, *,
               q_offset: jax.Array | None = None,
               segment_ids: tuple[jax.Array, jax.Array] | None = None, fp8: bool = False,
               k_scale: jax.Array | None = None, impl: str = "auto", interpret: bool = False,
               chunk: int | None = None, config: dict | None = None) -> jax.Array:
    """int32 [B, S, min(topk, T)]: each query's selected key indices, ascending, then -1.

    Args:
      q [B, S, Hi, D], weights float32 [B, S, Hi], k [B, T, D]: module docstring.
      q_offset: int32 [B], the position of each row's first query (default 0): key j is
        allowed for query i iff j <= q_offset + i (chunked prefill, decode).
      segment_ids: (seg_q int32 [B, S], seg_k int32 [B, T]): keys of other segments are not
        allowed (packed rows).
      fp8: score in float8 e4m3 (module docstring).
      k_scale: float32 [B, T] when k is already float8 e4m3 (``quantize_e4m3``'s values and
        scales: keys stored in FP8, as a DSA cache can keep them); implies fp8, only q is
        quantized here. The result equals ``fp8=True`` on the keys before quantization.
      impl, interpret: see the module docstring and :mod:`pallas_kernels.backends`.
      chunk: query rows per step of the chunked paths (default: from ``CHUNK_BYTES``).
      config: kernel knobs (triton: block_q, block_k, key_splits, num_warps, num_stages;
        mosaic_tpu: block_q, block_k).
    """
    b, s, _, _, t = check_index_inputs(q, weights, k, q_offset, segment_ids)
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive integer, got {topk!r}")
    if k_scale is not None and (k.dtype != jnp.float8_e4m3fn or jnp.shape(k_scale) != (b, t)):
        raise ValueError(f"k_scale [B, T]={b, t} goes with float8_e4m3fn keys; got k "
                         f"{k.dtype}, k_scale shape {jnp.shape(k_scale)}")
    name = index_topk_backend(q, k, topk, impl=impl, interpret=interpret)
    if config is not None and name not in ("triton", "mosaic_tpu"):
        raise ValueError(f"index_topk: {name} takes no config")
    if k_scale is not None:
        q, weights = fp8_index_queries(q, weights)
        k_scale = k_scale.astype(jnp.float32)
    elif fp8:
        q, weights, k, k_scale = fp8_index_inputs(q, weights, k)
    seg_q, seg_k = segment_ids if segment_ids is not None else (None, None)
    q_pos = query_positions(b, s, q_offset)
    if name == "reference":
        qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
        sc = index_scores_reference(qf, weights, kf)
        if k_scale is not None:
            sc = canonical(sc * k_scale[:, None, :])
        return select_topk(sc, allowed(q_pos, t, seg_q, seg_k), topk)
    if name == "xla":
        return _xla_topk(q, weights, k, topk, q_pos, seg_q, seg_k, k_scale, chunk)
    chunk = chunk or _kernel_chunk(b, t)
    if name == "triton":
        keys = _triton_keys(config or {}, interpret, b, min(s, chunk), q.shape[2])
        seg_topk = functools.partial(tri.segment_topk_triton, interpret=interpret)
        return _kernel_topk(q, weights, k, topk, q_pos, seg_q, seg_k, k_scale, chunk, keys,
                            seg_topk, tri.MAX_COLUMNS)
    tpu_interp = pltpu.InterpretParams() if interpret else False
    keys = functools.partial(tpu.index_keys_tpu, interpret=tpu_interp, **(config or {}))
    seg_topk = kth_select(functools.partial(tpu.kth_key_tpu, interpret=tpu_interp))
    return _kernel_topk(q, weights, k, topk, q_pos, seg_q, seg_k, k_scale, chunk, keys,
                        seg_topk, tpu.MAX_COLUMNS)


# ---- sparse_mla ----------------------------------------------------------------------------

def _sparse_xla(q_latent, q_pe, kv, rows, sm_scale):
    """One chunk of queries: gathered rows [B, C, K, Dc + Dr] in kv's dtype, float32 softmax."""
    dc = q_latent.shape[-1]
    valid = rows >= 0
    g = jnp.take(kv, jnp.clip(rows, 0, kv.shape[0] - 1), axis=0)
    q = jnp.concatenate([q_latent, q_pe], axis=-1).astype(kv.dtype)
    sc = jnp.einsum("bchd,bcrd->bchr", q, g, preferred_element_type=jnp.float32) * sm_scale
    sc = jnp.where(valid[:, :, None, :], sc, -jnp.inf)
    m = jnp.max(sc, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(sc - m)
    denom = jnp.sum(p, axis=-1)
    out = jnp.einsum("bchr,bcrd->bchd", p.astype(kv.dtype), g[..., :dc],
                     preferred_element_type=jnp.float32)
    has = denom > 0
    safe = jnp.where(has, denom, 1.0)
    out = jnp.where(has[..., None], out / safe[..., None], 0.0)
    return out, jnp.where(has, m[..., 0] + jnp.log(safe), -jnp.inf)


def sparse_mla(q_latent: jax.Array, q_pe: jax.Array, kv: jax.Array, rows: jax.Array,
               sm_scale: float, *, impl: str = "auto", num_splits: int | None = None,
               interpret: bool = False, chunk: int | None = None, config: dict | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """(out_latent float32 [B, S, H, Dc], lse float32 [B, S, H]) of each query over its rows
    (module docstring; W_UV is applied by the caller). ``sm_scale`` is required: DeepSeek's is
    qk_head_dim^-0.5 * mscale^2. num_splits: programs per query over its rows (triton; default:
    enough to fill the GPU). chunk: queries per step (a `lax.map` over chunks, bounding the
    intermediates: the XLA path's gathered rows, the kernels' float32 outputs; default: from
    ``CHUNK_BYTES`` for XLA, none for the kernels). config: kernel knobs (triton: block_h,
    block_k, num_warps, num_stages, f32_dot, poison_output; mosaic_tpu: block_k)."""
    b, s, h, dc, _, kk = check_sparse_inputs(q_latent, q_pe, kv, rows)
    name = sparse_mla_backend(q_latent, kv, impl=impl, interpret=interpret)
    if config is not None and name not in ("triton", "mosaic_tpu"):
        raise ValueError(f"sparse_mla: {name} takes no config")
    if name == "reference":
        run = functools.partial(sparse_mla_reference, kv=kv, sm_scale=sm_scale)
    elif name == "xla":
        run = functools.partial(_sparse_xla, kv=kv, sm_scale=sm_scale)
        if chunk is None:  # bound the gathered rows [B, C, K, Dc + Dr]
            chunk = _pow2_floor(max(1, CHUNK_BYTES // (b * kk * kv.shape[-1] * kv.dtype.itemsize)))
    elif name == "triton":
        config = dict(config or {})
        if num_splits is None:  # few queries (decode): split each one's rows among programs
            block_h = config.get("block_h") or sparse_block_h(h)
            programs = b * min(s, chunk or s) * -(-h // block_h)
            num_splits = max(1, -(-2 * GPU_SMS // programs))
        run = functools.partial(sparse_mla_triton, kv=kv, sm_scale=sm_scale,
                                num_splits=num_splits, interpret=interpret, **config)
    else:
        run = functools.partial(sparse_mla_tpu, kv=kv, sm_scale=sm_scale,
                                interpret=pltpu.InterpretParams() if interpret else False,
                                **(config or {}))

    if chunk is None or s <= chunk:
        return run(q_latent, q_pe, rows=rows)

    def joined(ql, qp, rc):  # one array through lax.map: [.., Dc] output | lse
        out, lse = run(ql, qp, rows=rc)
        return jnp.concatenate([out, lse[..., None]], axis=-1)

    both = _chunked(joined, s, chunk, (q_latent, q_pe, rows), (0, 0, -1))
    return both[..., :dc], both[..., dc]


__all__ = ["CHUNK_BYTES", "INDEX_BACKENDS", "INDEX_IMPLS", "SPARSE_BACKENDS", "SPARSE_IMPLS",
           "index_topk", "index_topk_backend", "kth_key_xla", "order_key", "sparse_mla",
           "sparse_mla_backend"]
