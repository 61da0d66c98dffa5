"""Evaluation drivers: attention statistics per policy, and task accuracy dense vs sparse.

Both write plain rows (dicts) that :func:`markdown_table` renders; the CLI (`jaxprefill analyze`,
`jaxprefill eval`) and scripts call these.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprefill.eval.metrics import keep_recall_error, row_density, row_recall_error, sample_rows
from jaxprefill.eval.probe import capture_qkv
from jaxprefill.eval.tasks import make_sample
from jaxprefill.sparse import SparseConfig


def prompt_tokens(tokenizer, length: int, seed: int = 0, task: str = "passkey") -> np.ndarray:
    """int32 [1, ~length] tokens of a real long prompt (a synthetic-task sample)."""
    s = make_sample(tokenizer, task, length, 0.5, seed)
    return np.asarray([tokenizer.encode_prompt(s.messages, chat=True)], np.int32)


def attention_stats(model, tokens: np.ndarray, configs: dict[str, SparseConfig],
                    rows: int = 64, log: Callable[[str], None] = print) -> list[dict]:
    """Per policy: mean density, recall and output error over layers and heads.

    One dense forward captures every layer's q, k, v; each policy's layout is built from them
    (the activations a first sparse layer would see; later layers see slightly different ones
    in a sparse forward). Recall and error are exact on ``rows`` sampled query rows per prompt.
    Layers a config leaves dense count as density 1, recall 1.
    """
    q_all, k_all, v_all = capture_qkv(model, jnp.asarray(tokens))
    b, s = tokens.shape
    sampled = sample_rows(np.full(b, s), rows, min_pos=min(s - 1, 256))
    out = []
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        dens, rec, err, per_layer = [], [], [], []
        for layer in range(q_all.shape[0]):
            policy = cfg.policy_for(layer)
            if policy is None or s < cfg.min_length:
                d, r, e = np.ones(q_all.shape[3]), np.ones(q_all.shape[3]), np.zeros(q_all.shape[3])
            else:
                d, r, e = (x.mean(axis=0) for x in layer_stats(
                    policy, layer, q_all[layer], k_all[layer], v_all[layer], np.full(b, s),
                    sampled))
            dens.append(d)
            rec.append(r)
            err.append(e)
            per_layer.append((float(np.mean(d)), float(np.mean(r))))
        row = {"policy": name, "length": s, "density": float(np.mean(dens)),
               "recall": float(np.mean(rec)), "min_head_recall": float(np.min(rec)),
               "output_error": float(np.mean(err)), "per_layer": per_layer,
               "per_head_density": np.concatenate(dens).tolist(),
               "per_head_recall": np.concatenate(rec).tolist()}
        log(f"  {name:>14s} @ {s}: density {row['density']:.3f} recall {row['recall']:.4f} "
            f"err {row['output_error']:.4f} ({time.perf_counter() - t0:.0f}s)")
        out.append(row)
    return out


def layer_stats(policy, layer: int, q, k, v, lengths: np.ndarray, sampled: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One layer under ``policy``: (density, recall, output error), each float64 [B, Hq].

    q [B, S, Hq, D], k/v [B, S, Hkv, D], lengths [B], sampled [B, R] query positions.
    Block-mask policies are measured on their block mask; pbs (selection over permuted keys)
    on its token-level keep mapped back to original key positions.
    """
    hq = q.shape[2]
    lengths_j = jnp.asarray(lengths, jnp.int32)
    if getattr(policy, "columns", False):  # minference's column path: count columns as tokens
        d, r, e = column_layout_stats(_layout_fn(policy, layer)(q, k, lengths_j), q, k, v,
                                      lengths, sampled)
        return np.repeat(d, hq // d.shape[1], axis=1), r, e
    mask = _mask_fn(policy, layer)(q, k, lengths_j)
    if hasattr(policy, "key_mask"):
        d = row_density(_fold_pbs(np.asarray(mask), mask.shape[-2]), lengths, policy.block_size)
        keep = _keep_fn(policy)(q, k, jnp.asarray(sampled), lengths_j)
        r, e = keep_recall_error(q, k, v, keep, sampled)
    else:
        d = row_density(np.asarray(mask), lengths, policy.block_size)
        r, e = row_recall_error(q, k, v, mask, sampled, policy.block_size)
    return np.repeat(d, hq // d.shape[1], axis=1), r, e


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


def _layout_fn(policy, layer: int):
    layer = policy.layer_key(layer)
    key = (policy, layer, "layout")
    if key not in _MASK_FNS:
        _MASK_FNS[key] = jax.jit(lambda q, k, lengths: policy.build(
            q, k, layer=layer, lengths=lengths))
    return _MASK_FNS[key]


_MASK_FNS: dict = {}


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
                        log: Callable[[str], None] = print) -> dict[str, dict[str, np.ndarray]]:
    """Per config and batch row: density and attention recall averaged over layers and heads.

    q_all [L, B, S, Hq, D], k_all / v_all [L, B, S, Hkv, D] (``capture_qkv`` of right-padded
    rows), lengths int [B] valid tokens per row. Rows of different lengths share one batch (and
    one compiled mask function per policy): each row's layout equals its layout alone. Recall is
    exact on ``rows`` sampled query positions per row; layers a config leaves dense count as
    density 1, recall 1. Returns {config: {"density": [B], "recall": [B],
    "min_head_recall": [B], "output_error": [B]}} as float64 numpy.
    """
    n_layers, b, s, hq = q_all.shape[:4]
    lens = np.asarray(lengths, np.int32)
    sampled = sample_rows(lens, rows, min_pos=256)
    out = {}
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        dens, rec, err = [], [], []  # each [L] of [B, Hq]
        for layer in range(n_layers):
            policy = cfg.policy_for(layer) if cfg is not None else None
            if policy is None:
                dens.append(np.ones((b, hq)))
                rec.append(np.ones((b, hq)))
                err.append(np.zeros((b, hq)))
                continue
            d, r, e = layer_stats(policy, layer, q_all[layer], k_all[layer], v_all[layer], lens,
                                  sampled)
            # Rows shorter than min_length are dense in the model: measure what the model runs.
            short = lens < cfg.min_length
            dens.append(np.where(short[:, None], 1.0, d))
            rec.append(np.where(short[:, None], 1.0, r))
            err.append(np.where(short[:, None], 0.0, e))
        dens, rec, err = np.stack(dens), np.stack(rec), np.stack(err)  # [L, B, Hq]
        out[name] = {"density": dens.mean(axis=(0, 2)), "recall": rec.mean(axis=(0, 2)),
                     "min_head_recall": rec.min(axis=(0, 2)), "output_error": err.mean(axis=(0, 2))}
        log(f"  stats {name:>20s}: density {out[name]['density'].mean():.3f} recall "
            f"{out[name]['recall'].mean():.4f} ({time.perf_counter() - t0:.0f}s)")
    return out


def greedy_answers(model, tokenizer, tokens: np.ndarray, lengths: np.ndarray,
                   sparse: SparseConfig | None, max_new_tokens: int) -> tuple[list[str], float]:
    """Greedy completions of right-padded prompt rows, prefill sparse, decode dense.

    tokens int32 [B, P] (P a multiple of 64: one compiled prefill per shape and config),
    lengths [B]. Same computation as ``jp.generate(..., sparse=...)`` (whose decode is dense
    too), but the decode step is compiled once for the dense graph and shared by every config,
    and no EOS early exit (a fixed number of steps; text is cut at the first EOS).
    Returns (texts, seconds of the prefill call, compile included on a first call).
    """
    from flax import nnx

    from jaxprefill.decoding import Sampling, decode_step, prefill_step, sparse_graphdef
    from jaxprefill.models import KVCache

    graphdef, state = nnx.split(model)
    pre_graph = graphdef if sparse is None else sparse_graphdef(model, sparse)
    b, p = tokens.shape
    cache = KVCache.zeros(model.config, b, p + max_new_tokens, model.dtype)
    sampling = Sampling.make(b)
    t0 = time.perf_counter()
    nxt, cache = prefill_step(pre_graph, state, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                          sampling)
    nxt = np.asarray(nxt)
    prefill_s = time.perf_counter() - t0
    out = [nxt]
    index = np.asarray(lengths, np.int32).copy()
    for step in range(1, max_new_tokens):
        nxt, cache = decode_step(graphdef, state, jnp.asarray(nxt[:, None]), jnp.asarray(index),
                             cache, sampling, step)
        nxt = np.asarray(nxt)
        out.append(nxt)
        index += 1
    gen = np.stack(out, axis=1)  # [B, max_new_tokens]
    eos = set(int(e) for e in (tokenizer.eos_token_ids or model.config.eos_token_ids))
    texts = []
    for row in gen.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        texts.append(tokenizer.decode(row[:cut]))
    return texts, prefill_s


def task_accuracy(model, tokenizer, configs: dict[str, SparseConfig | None], tasks: Iterable[str],
                  lengths: Iterable[int], depths: Iterable[float], seeds: Iterable[int],
                  max_new_tokens: int = 24, log: Callable[[str], None] = print,
                  jsonl=None) -> list[dict]:
    """Greedy answers of every (task, length, depth, seed) sample under each config.

    Returns one row per (config, task, length, sample): score, prefill seconds, answer text.
    Each row is also appended to ``jsonl`` (a path) as it completes, so long runs keep partial
    results.
    """
    import json

    import jaxprefill as jp

    rows = []
    for task in tasks:
        for length in lengths:
            for depth in depths:
                for seed in seeds:
                    sample = make_sample(tokenizer, task, length, depth, seed)
                    for name, cfg in configs.items():
                        outs = jp.generate(model, tokenizer, [sample.messages], chat=True,
                                           max_new_tokens=max_new_tokens, sparse=cfg)
                        text = outs[0].text
                        rows.append({"config": name, "task": task, "length": length,
                                     "depth": depth, "seed": seed, "score": sample.score(text),
                                     "prefill_s": outs.stats.prefill_s, "text": text.strip()})
                        if jsonl is not None:
                            with open(jsonl, "a") as f:
                                f.write(json.dumps(rows[-1]) + "\n")
                        log(f"  {task} L={length} depth={depth:.2f} seed={seed} {name:>12s}: "
                            f"{'ok ' if rows[-1]['score'] else 'MISS'} "
                            f"({outs.stats.prefill_s:.1f}s) {text.strip()[:40]!r}")
    return rows


def summarize_accuracy(rows: list[dict]) -> list[dict]:
    """Mean score and sample count per (config, task, length)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["config"], r["task"], r["length"]), []).append(r["score"])
    return [{"config": c, "task": t, "length": n, "correct": int(sum(v)), "samples": len(v),
             "accuracy": float(np.mean(v))} for (c, t, n), v in groups.items()]


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """Rows of dicts -> a GitHub markdown table of ``columns`` (floats to 4 digits)."""
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
