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

from jaxprefill.eval.metrics import head_stats, sample_rows
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
    lengths = jnp.full((b,), s, jnp.int32)
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
                mask = _mask_fn(policy, layer)(q_all[layer], k_all[layer], lengths)
                st = head_stats(q_all[layer], k_all[layer], v_all[layer], mask, lengths,
                                policy.block_size, sampled)
                d, r, e = st.density, st.recall, st.output_error
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


_MASK_FNS: dict = {}


def _mask_fn(policy, layer: int):
    layer = policy.layer_key(layer)
    key = (policy, layer)
    if key not in _MASK_FNS:
        _MASK_FNS[key] = jax.jit(lambda q, k, lengths: policy.block_mask(
            q, k, layer=layer, lengths=lengths))
    return _MASK_FNS[key]


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
