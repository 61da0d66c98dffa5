"""Evaluation drivers: attention statistics per sparse config, and greedy answers.

* :func:`prompt_attention_stats` / :func:`attention_stats`: density, attention recall and output
  error of each config's layouts, from the dense forward's q/k/v, computed one chunk of prompts
  and one layer at a time (memory bounded whatever the number of prompts or layers; inside a
  layer the recall computation is split over groups of KV heads, see
  ``metrics.STATS_CALL_BYTES``).
* :func:`greedy_answers`: greedy completions of a fixed-shape batch, prefill through a sparse
  config, decode dense.

Rows are plain dicts that :func:`markdown_table` renders; `jaxprefill analyze` /
`jaxprefill eval` (``jaxprefill.eval.cli`` / ``suite``) and scripts call these.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprefill.decoding import Sampling, decode_step, prefill_step, sparse_graphdef
from jaxprefill.eval.metrics import keep_recall_error, row_density, row_recall_error, sample_rows
from jaxprefill.eval.probe import layer_qkv
from jaxprefill.eval.tasks import make_sample
from jaxprefill.models import KVCache
from jaxprefill.sparse import SparseConfig

_METRICS = ("density", "recall", "output_error", "last_recall")
_ONES = ("density", "recall", "last_recall")  # what a dense layer counts as


def prompt_tokens(tokenizer, length: int, seed: int = 0, task: str = "passkey") -> np.ndarray:
    """int32 [1, ~length] tokens of a real long prompt (a synthetic-task sample, dev split)."""
    s = make_sample(tokenizer, task, length, 0.5, seed)
    return np.asarray([tokenizer.encode_prompt(s.messages, chat=True)], np.int32)


def layer_head_stats(model, tokens: np.ndarray, lengths, configs: dict[str, SparseConfig | None],
                     rows: int = 64, chunk: int = 1, min_pos: int = 256,
                     log: Callable[[str], None] = print) -> dict[str, dict[str, np.ndarray]]:
    """Per config, layer, prompt and query head: density, recall, output error, and the recall
    of each prompt's last query (the one whose output makes the first generated token).

    tokens int32 [N, S] right-padded prompts, lengths [N] valid tokens. Prompts go through the
    dense model ``chunk`` at a time (the last chunk padded with copies of its first row), one
    layer at a time (:func:`jaxprefill.eval.probe.layer_qkv`); each config's layout of a layer
    is built from that layer's q/k/v (the activations a first sparse layer would see). Recall
    and error are exact on ``rows`` sampled query positions per prompt (from ``min_pos`` on).
    Layers a config leaves dense, and prompts shorter than its ``min_length``, count as density
    1, recall 1, error 0 (what the model runs).
    Returns {config: {"density" | "recall" | "output_error" | "last_recall": float64
    [L, N, Hq]}}.
    """
    tokens = np.asarray(tokens, np.int32)
    lens = np.asarray(lengths, np.int32)
    n = tokens.shape[0]
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    n_layers, hq = model.config.num_layers, model.config.num_heads
    sampled = sample_rows(lens, rows, min_pos=min_pos)
    out = {name: {m: np.zeros((n_layers, n, hq)) for m in _METRICS} for name in configs}
    for name in configs:
        for m in _ONES:
            out[name][m][:] = 1.0
    for c0 in range(0, n, chunk):
        t0 = time.perf_counter()
        idx = np.arange(c0, c0 + chunk)
        real = idx < n
        idx = np.where(real, idx, c0)  # pad a short last chunk with copies of its first row
        sources: dict = {}  # config -> (layer, q, k) of the layer whose layout others share
        for layer, q, k, v in layer_qkv(model, jnp.asarray(tokens[idx])):
            for name, cfg in configs.items():
                policy = cfg.policy_for(layer) if cfg is not None else None
                if policy is None:
                    continue
                src = cfg.layout_source(layer)
                if src == layer and policy.share_layers > 1:
                    sources[name] = (layer, q, k)
                got = layer_stats(policy, layer, q, k, v, lens[idx], sampled[idx],
                                  source=sources[name] if src != layer else None)
                sparse_rows = real & (lens[idx] >= cfg.min_length)
                for m, x in zip(_METRICS, got):
                    out[name][m][layer, idx[sparse_rows]] = x[sparse_rows]
            del q, k, v
        log(f"  stats: prompts {c0 + 1}-{min(c0 + chunk, n)} of {n} "
            f"({time.perf_counter() - t0:.1f}s)")
    return out


def prompt_attention_stats(model, tokens: np.ndarray, lengths, configs: dict,
                           rows: int = 64, chunk: int = 1,
                           log: Callable[[str], None] = print) -> dict[str, dict[str, np.ndarray]]:
    """Per config and prompt, averaged over layers and heads (see :func:`layer_head_stats`):
    {config: {"density", "recall", "min_head_recall", "output_error", "last_recall",
    "min_last_recall": float64 [N]}}."""
    per = layer_head_stats(model, tokens, lengths, configs, rows=rows, chunk=chunk, log=log)
    return {name: _reduce(s) for name, s in per.items()}


def _reduce(s: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"density": s["density"].mean(axis=(0, 2)), "recall": s["recall"].mean(axis=(0, 2)),
            "min_head_recall": s["recall"].min(axis=(0, 2)),
            "output_error": s["output_error"].mean(axis=(0, 2)),
            "last_recall": s["last_recall"].mean(axis=(0, 2)),
            "min_last_recall": s["last_recall"].min(axis=(0, 2))}


def attention_stats(model, tokens: np.ndarray, configs: dict[str, SparseConfig],
                    rows: int = 64, log: Callable[[str], None] = print) -> list[dict]:
    """Per config: mean density, recall and output error over layers and heads of the prompts
    ``tokens`` int32 [B, S] (all S tokens valid), with per-layer and per-head values for plots.
    Computed by :func:`layer_head_stats` (memory bounded)."""
    b, s = tokens.shape
    per = layer_head_stats(model, tokens, np.full(b, s), configs, rows=rows,
                           min_pos=min(s - 1, 256), log=log)
    out = []
    for name, st in per.items():
        dens, rec, err, last = (st[m].mean(axis=1) for m in _METRICS)  # [L, Hq]
        row = {"policy": name, "length": s, "density": float(dens.mean()),
               "recall": float(rec.mean()), "min_head_recall": float(rec.min()),
               "output_error": float(err.mean()), "last_recall": float(last.mean()),
               "min_last_recall": float(last.min()),
               "per_layer": [(float(d.mean()), float(r.mean())) for d, r in zip(dens, rec)],
               "per_head_density": dens.ravel().tolist(), "per_head_recall": rec.ravel().tolist()}
        log(f"  {name:>14s} @ {s}: density {row['density']:.3f} recall {row['recall']:.4f} "
            f"err {row['output_error']:.4f}")
        out.append(row)
    return out


def layer_stats(policy, layer: int, q, k, v, lengths: np.ndarray, sampled: np.ndarray,
                source: tuple | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One layer under ``policy``: (density, recall, output error, last-query recall), each
    float64 [B, Hq].

    q [B, S, Hq, D], k/v [B, S, Hkv, D], lengths [B], sampled [B, R] query positions; the last
    recall is that of each row's last valid query. Block-mask policies are measured on their
    block mask; pbs (selection over permuted keys) on its token-level keep mapped back to
    original key positions. ``source`` (layer, q, k): the layer whose layout this one shares
    (``share_layers``); the layout comes from its q and k, the recall from this layer's.
    """
    hq = q.shape[2]
    lengths_j = jnp.asarray(lengths, jnp.int32)
    last = (np.asarray(lengths, np.int32) - 1)[:, None]  # [B, 1]
    src_layer, q_src, k_src = (layer, q, k) if source is None else source
    if getattr(policy, "has_columns", False):  # the column path: count columns as tokens
        layout = _layout_fn(policy, src_layer)(q_src, k_src, lengths_j)
        d, r, e = column_layout_stats(layout, q, k, v, lengths, sampled)
        rl = column_layout_stats(layout, q, k, v, lengths, last)[1]
        return np.repeat(d, hq // d.shape[1], axis=1), r, e, rl
    mask = _mask_fn(policy, src_layer)(q_src, k_src, lengths_j)
    if hasattr(policy, "key_mask"):
        d = row_density(_fold_pbs(np.asarray(mask), mask.shape[-2]), lengths, policy.block_size)
        keep = _keep_fn(policy)(q, k, jnp.asarray(sampled), lengths_j)
        r, e = keep_recall_error(q, k, v, keep, sampled)
        rl = keep_recall_error(q, k, v, _keep_fn(policy)(q, k, jnp.asarray(last), lengths_j),
                               last)[0]
    else:
        d = row_density(np.asarray(mask), lengths, policy.block_size)
        r, e = row_recall_error(q, k, v, mask, sampled, policy.block_size)
        rl = row_recall_error(q, k, v, mask, last, policy.block_size)[0]
    return np.repeat(d, hq // d.shape[1], axis=1), r, e, rl


def column_layout_stats(layout, q, k, v, lengths: np.ndarray, sampled: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(density [B, H], recall [B, Hq], error [B, Hq]) of a layout with key columns.

    Density counts each listed column as 1 / block_k of a block (the kernel gathers columns in
    chunks of block_k); recall and error use the exact token set: listed blocks | columns.
    """
    block = layout.block_q
    s = q.shape[1]
    bm = np.asarray(layout.to_block_mask())  # [B, H, n, n]
    cm = np.asarray(layout.column_mask(s))  # [B, H, n, S]
    n = bm.shape[-1]
    nb = (np.asarray(lengths) + block - 1) // block
    valid_q = np.arange(n)[None, :] < nb[:, None]  # [B, n]
    cols = (cm.sum(-1) * valid_q[:, None]).sum(-1) / layout.block_k  # [B, H] block-equivalents
    d = row_density(bm, lengths, block) + cols / (nb * (nb + 1) / 2)[:, None]
    qb = np.asarray(sampled) // block  # [B, R]
    take = lambda m: np.stack([m[b][:, qb[b]] for b in range(m.shape[0])])  # noqa: E731
    keep = np.repeat(take(bm), layout.block_k, axis=-1)[..., :s] | take(cm)
    r, e = keep_recall_error(q, k, v, keep, sampled)
    return d, r, e


_MASK_FNS: dict = {}


def _layout_fn(policy, layer: int):
    layer = policy.layer_key(layer)
    key = (policy, layer, "layout")
    if key not in _MASK_FNS:
        _MASK_FNS[key] = jax.jit(lambda q, k, lengths: policy.build(
            q, k, layer=layer, lengths=lengths))
    return _MASK_FNS[key]


def _fold_pbs(mask: np.ndarray, n: int) -> np.ndarray:
    """PBS mask [B, H, n, 2n] (permuted blocks | original blocks) -> [B, H, n, n] with the same
    row counts: permuted blocks lie in earlier segments, original ones in the row's own segment,
    so OR-ing the halves keeps every count (only the density of it is used)."""
    return mask[..., :n] | mask[..., n:]


def _keep_fn(policy):
    key = (policy, "keep")
    if key not in _MASK_FNS:
        _MASK_FNS[key] = jax.jit(lambda q, k, rows, lengths: policy.key_mask(
            q, k, rows, lengths=lengths))
    return _MASK_FNS[key]


def _mask_fn(policy, layer: int):
    layer = policy.layer_key(layer)
    key = (policy, layer)
    if key not in _MASK_FNS:
        _MASK_FNS[key] = jax.jit(lambda q, k, lengths: policy.block_mask(
            q, k, layer=layer, lengths=lengths))
    return _MASK_FNS[key]


def row_attention_stats(q_all: jax.Array, k_all: jax.Array, v_all: jax.Array,
                        lengths: np.ndarray, configs: dict[str, SparseConfig], rows: int = 64,
                        log: Callable[[str], None] = print,
                        chunk: int = 4) -> dict[str, dict[str, np.ndarray]]:
    """Per config and batch row: density and attention recall averaged over layers and heads,
    from q/k/v captured beforehand.

    q_all [L, B, S, Hq, D], k_all / v_all [L, B, S, Hkv, D] (``capture_qkv`` of right-padded
    rows), lengths int [B] valid tokens per row. Rows go through the policies ``chunk`` at a
    time (a short last chunk padded with copies of its first row: one compile per shape); each
    row's layout equals its layout alone. Prefer :func:`prompt_attention_stats`, which never
    holds every layer's activations. Returns {config: {"density", "recall", "min_head_recall",
    "output_error", "last_recall", "min_last_recall": [B]}} as float64 numpy.
    """
    n_layers, b, s, hq = q_all.shape[:4]
    chunk = max(1, min(chunk, b))
    lens = np.asarray(lengths, np.int32)
    sampled = sample_rows(lens, rows, min_pos=256)
    out = {}
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        st = {m: np.zeros((n_layers, b, hq)) for m in _METRICS}
        for m in _ONES:
            st[m][:] = 1.0
        for layer in range(n_layers):
            policy = cfg.policy_for(layer) if cfg is not None else None
            if policy is None:
                continue
            for c0 in range(0, b, chunk):
                idx = np.arange(c0, c0 + chunk)
                real = idx < b
                idx = np.where(real, idx, c0)
                src = cfg.layout_source(layer)
                got = layer_stats(policy, layer, q_all[layer][idx], k_all[layer][idx],
                                  v_all[layer][idx], lens[idx], sampled[idx],
                                  source=None if src == layer else
                                  (src, q_all[src][idx], k_all[src][idx]))
                # Rows shorter than min_length are dense in the model: measure what it runs.
                keep = real & (lens[idx] >= cfg.min_length)
                for m, x in zip(_METRICS, got):
                    st[m][layer, idx[keep]] = x[keep]
        out[name] = _reduce(st)
        log(f"  stats {name:>20s}: density {out[name]['density'].mean():.3f} recall "
            f"{out[name]['recall'].mean():.4f} ({time.perf_counter() - t0:.0f}s)")
    return out


def greedy_answers(model, tokenizer, tokens: np.ndarray, lengths: np.ndarray,
                   sparse: SparseConfig | None, max_new_tokens: int,
                   cache_len: int | None = None) -> tuple[list[str], float]:
    """Greedy completions of right-padded prompt rows, prefill sparse, decode dense.

    tokens int32 [B, P] (one compiled prefill per shape and config), lengths [B]. Same
    computation as ``jp.generate(..., sparse=...)`` (whose decode is dense too), but the decode
    step is compiled once for the dense graph and shared by every config. ``cache_len`` (>= P +
    max_new_tokens; default exactly that) fixes the cache shape, so calls with different
    ``max_new_tokens`` share one compiled decode step. Decoding stops once every row has
    produced an EOS; text is cut at the first EOS.
    Returns (texts, seconds of the prefill call, compile included on a first call).
    """
    graphdef, state = nnx.split(model)
    pre_graph = graphdef if sparse is None else sparse_graphdef(model, sparse)
    b, p = tokens.shape
    cache_len = p + max_new_tokens if cache_len is None else cache_len
    if cache_len < p + max_new_tokens:
        raise ValueError(f"cache_len {cache_len} < prompt {p} + max_new_tokens {max_new_tokens}")
    cache_class = getattr(model, "cache_class", KVCache)  # DeepSeek: paged latent cache
    cache = cache_class.zeros(model.config, b, cache_len, model.dtype,
                              **getattr(model, "cache_options", {}))
    sampling = Sampling.make(b)
    eos = np.asarray(sorted(int(e) for e in (tokenizer.eos_token_ids
                                             or model.config.eos_token_ids)), np.int64)
    t0 = time.perf_counter()
    nxt, cache = prefill_step(pre_graph, state, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                              sampling)
    nxt = np.asarray(nxt)
    prefill_s = time.perf_counter() - t0
    out = [nxt]
    done = np.isin(nxt, eos)
    index = np.asarray(lengths, np.int32).copy()
    for step in range(1, max_new_tokens):
        if done.all():
            break
        nxt, cache = decode_step(graphdef, state, jnp.asarray(nxt[:, None]), jnp.asarray(index),
                                 cache, sampling, step)
        nxt = np.asarray(nxt)
        out.append(nxt)
        done |= np.isin(nxt, eos)
        index += 1
    gen = np.stack(out, axis=1)  # [B, steps]
    texts, eos_ids = [], set(eos.tolist())
    for row in gen.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
        texts.append(tokenizer.decode(row[:cut]))
    return texts, prefill_s


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """Rows of dicts -> a GitHub markdown table of ``columns`` (floats to 4 digits)."""
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
