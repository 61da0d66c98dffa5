"""Training-free retrieval-head search for the ``streaming`` policy (DuoAttention-style heads).

DuoAttention trains one gate per KV head to decide which heads need full attention
("retrieval heads") and which can keep only the sink and a recent window ("streaming heads").
Without training, we rank heads on calibration prompts (synthetic passkey / NIAH samples with
seeds disjoint from the evaluation's 0..3; one dense forward captures every layer's q/k), by
one of two criteria (``--criterion``):

* ``far_mass``: the attention mass that the prompt's last ``--rows`` queries (all query heads of
  the group) put on keys outside the sink + local window: what streaming would drop.
* ``needle_mass`` (retrieval heads, as in Wu et al. 2024, "Retrieval Head Mechanistically
  Explains Long-Context Factuality"): the prompt is followed by its answer (teacher forcing);
  for each answer token, the attention mass that the query predicting it puts on the same token
  inside the needle, averaged over answer tokens; a KV head scores the max over its group's
  query heads (one retrieving query head needs the KV head dense). Depths cycle over
  0.1 .. 0.9 across the seeds. Heads that copy from far away score high; heads that spread mass
  widely but retrieve nothing (high far mass) do not.

Scores are averaged over prompts; the ``--dense-fraction`` highest-scoring (layer, KV head)
pairs over the whole model become dense; the file is the ``head_config`` of ``streaming``.

    python scripts/search_streaming_heads.py --lengths 4096 8192 --dense-fraction 0.5 \
        --out configs/sparse/streaming_heads_smollm2.json
    python scripts/search_streaming_heads.py --criterion needle_mass --dense-fraction 0.25 \
        --tasks passkey niah_single niah_multikey --seeds 1000 1001 1002 1003 1004 \
        --out configs/sparse/streaming_retrieval_heads_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jaxprefill as jp  # noqa: E402
from jaxprefill.eval.probe import capture_qkv  # noqa: E402
from jaxprefill.eval.runner import prompt_tokens  # noqa: E402
from jaxprefill.eval.tasks import make_sample  # noqa: E402

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def far_mass(q_last: jax.Array, k: jax.Array, sink: int, local: int) -> np.ndarray:
    """q_last [L, R, Hq, D] (the prompt's last R queries), k [L, S, Hkv, D] -> [L, Hkv].

    Mass outside the window of each query (causal softmax over keys <= its position), averaged
    over the R queries and the group's query heads.
    """
    n_layers, r, hq, d = q_last.shape
    s, hkv = k.shape[1], k.shape[2]
    qg = q_last.astype(jnp.float32).reshape(n_layers, r, hkv, hq // hkv, d)
    logits = jnp.einsum("lrhgd,lshd->lhgrs", qg, k.astype(jnp.float32)) * d ** -0.5
    pos = s - r + jnp.arange(r)[:, None]  # [R, 1]
    key = jnp.arange(s)[None, :]
    p = jax.nn.softmax(jnp.where(key <= pos, logits, -jnp.inf), axis=-1)
    inside = (key < sink) | (key > pos - local)  # [R, S]
    far = jnp.sum(jnp.where(inside, 0.0, p), axis=-1)  # [L, Hkv, G, R]
    return np.asarray(far.mean(axis=(2, 3)))


def answer_targets(prompt: np.ndarray, answer: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """For a prompt [S0] followed by its answer tokens: (query positions [A], target key mask
    [A, S0]). Query S0 - 1 + j predicts answer token j; its targets are token j of every
    occurrence of the answer inside the prompt (the needle; passkey states it twice)."""
    a = len(answer)
    starts = [i for i in range(len(prompt) - a + 1) if list(prompt[i:i + a]) == answer]
    if not starts:
        raise ValueError("the answer's tokens do not occur in the prompt (tokenized differently "
                         "in context?)")
    targets = np.zeros((a, len(prompt)), bool)
    for i in starts:
        targets[np.arange(a), i + np.arange(a)] = True
    return len(prompt) - 1 + np.arange(a), targets


def needle_mass(q_rows: jax.Array, k: jax.Array, qpos: np.ndarray, targets: np.ndarray
                ) -> np.ndarray:
    """q_rows [L, A, Hq, D] (the answer-predicting queries at positions qpos [A]), k [L, S, Hkv,
    D], targets bool [A, S0] (S0 <= S) -> [L, Hkv]: per KV head the max over its query heads of
    the mean (over answer tokens) causal attention mass on the target keys."""
    n_layers, a, hq, d = q_rows.shape
    s, hkv = k.shape[1], k.shape[2]
    qg = q_rows.astype(jnp.float32).reshape(n_layers, a, hkv, hq // hkv, d)
    logits = jnp.einsum("lahgd,lshd->lhgas", qg, k.astype(jnp.float32)) * d ** -0.5
    key = jnp.arange(s)[None, :]
    p = jax.nn.softmax(jnp.where(key <= jnp.asarray(qpos)[:, None], logits, -jnp.inf), axis=-1)
    tgt = jnp.zeros((a, s), bool).at[:, :targets.shape[1]].set(jnp.asarray(targets))
    mass = jnp.sum(jnp.where(tgt, p, 0.0), axis=-1)  # [L, Hkv, G, A]
    return np.asarray(mass.mean(axis=-1).max(axis=-1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--tasks", nargs="+", default=["niah_multikey", "passkey"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001],
                    help="calibration seeds (the evaluation uses 0..3)")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--local", type=int, default=256)
    ap.add_argument("--rows", type=int, default=128, help="last queries scored per prompt")
    ap.add_argument("--dense-fraction", type=float, default=0.5)
    ap.add_argument("--criterion", default="far_mass", choices=["far_mass", "needle_mass"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--also", nargs="*", default=[], metavar="FRACTION:PATH",
                    help="more head configs from the same scores, other dense fractions")
    args = ap.parse_args()
    if not 0.0 <= args.dense_fraction <= 1.0:
        ap.error(f"--dense-fraction must be in [0, 1], got {args.dense_fraction}")

    model, tok = jp.load(args.model)
    prompts = [(n, t, s) for n in args.lengths for t in args.tasks for s in args.seeds]
    scores = []
    for length, task, seed in tqdm(prompts, desc="calibration prompts"):
        if args.criterion == "far_mass":
            tokens = prompt_tokens(tok, length, seed=seed, task=task)
            q, k, _ = capture_qkv(model, jnp.asarray(tokens))  # [L, 1, S, H, D]
            scores.append(far_mass(q[:, 0, -args.rows:], k[:, 0], args.sink, args.local))
            continue
        sample = make_sample(tok, task, length, DEPTHS[seed % len(DEPTHS)], seed)
        prompt = np.asarray(tok.encode_prompt(sample.messages, chat=True), np.int32)
        answer = tok.encode(" ".join(sample.answers[:1]), add_special_tokens=False)
        qpos, targets = answer_targets(prompt, answer)
        tokens = np.concatenate([prompt, np.asarray(answer[:-1], np.int32)])
        # Right padding to one shape per length (one compile; causal: earlier q/k unchanged).
        tokens = np.pad(tokens, (0, max(0, length + 64 - len(tokens))))[None]
        q, k, _ = capture_qkv(model, jnp.asarray(tokens))
        scores.append(needle_mass(q[:, 0, qpos], k[:, 0], qpos, targets))
    score = np.mean(scores, axis=0)  # [L, Hkv]
    outs = [(args.dense_fraction, args.out)] + [
        (float(f), path) for f, _, path in (item.partition(":") for item in args.also)]
    for fraction, path in outs:
        write_config(score, fraction, path, args)
    return 0


def write_config(score: np.ndarray, fraction: float, path: str, args) -> None:
    """The ``fraction`` highest-scoring (layer, KV head) pairs of score [L, Hkv] as dense heads."""
    n_layers, hkv = score.shape
    n_dense = int(round(fraction * score.size))
    order = np.argsort(-score, axis=None, kind="stable")[:n_dense]
    dense = {str(layer): [] for layer in range(n_layers)}
    for flat in order:
        layer, head = divmod(int(flat), hkv)
        dense[str(layer)].append(head)
    dense = {layer: sorted(heads) for layer, heads in dense.items() if heads}
    out = {"model": Path(args.model).name, "lengths": args.lengths, "tasks": args.tasks,
           "seeds": args.seeds, "sink": args.sink, "local": args.local,
           "dense_fraction": fraction, "criterion": args.criterion,
           args.criterion: [[round(float(x), 4) for x in row] for row in score],
           "dense_heads": dense}
    Path(path).write_text(json.dumps(out, indent=1) + "\n")
    for layer in range(n_layers):
        marks = " ".join(f"{score[layer, h]:.3f}{'*' if h in dense.get(str(layer), []) else ' '}"
                         for h in range(hkv))
        print(f"layer {layer:2d}: {marks}")
    print(f"{n_dense} of {score.size} KV heads dense; wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
