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
* ``ablation`` (what DuoAttention's gates optimize, without training): how far the model's
  answer predictions (teacher forcing) move when a head streams: ``--loss kl`` (default), the
  KL divergence from the dense model's next-token distributions, as DuoAttention penalizes
  deviation from full attention; ``--loss nll``, the answer's loss (on 12 prompts it picks heads
  whose streaming *lowers* the loss: overfitting). Greedy backward elimination in ``--rounds``
  rounds: each round scores every still-dense KV head with that head streaming on top of the
  heads already streaming, then streams the ``1/rounds`` of all heads that cost least. A
  head's score is its elimination order (later = more needed), so every ``--dense-fraction``
  cut keeps the heads eliminated last. One compile: the selection is data
  (:func:`jaxprefill.eval.probe.streamed_heads_nll`).

Scores are averaged over prompts; the ``--dense-fraction`` highest-scoring (layer, KV head)
pairs over the whole model become dense; the file is the ``head_config`` of ``streaming``.

    python -m scripts.tools.search_streaming_heads --lengths 4096 8192 --dense-fraction 0.5 \
        --out configs/sparse/streaming_heads_smollm2.json
    python -m scripts.tools.search_streaming_heads --criterion needle_mass --dense-fraction 0.25 \
        --tasks passkey niah_single niah_multikey --seeds 1000 1001 1002 1003 1004 \
        --out configs/sparse/streaming_retrieval_heads_smollm2.json
    python -m scripts.tools.search_streaming_heads --model $M --criterion ablation --rounds 6 \
        --lengths 4096 8192 --tasks passkey niah_single niah_multikey --seeds 1000 1001 \
        --dense-fraction 0.5 --out configs/sparse/streaming_heads_kl_smollm2.json

The model runs in ``--dtype`` (bfloat16 by default, as the accuracy protocol runs it: in
float32 the GPU's block-sparse "auto" runs the Triton kernel, the Mosaic one taking 16-bit
inputs only, and Triton is far slower in float32). The ablation search above takes ~75 s on an
H100 (~300 forwards of 12 prompts x 8K tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jaxprefill as jp
from jaxprefill.eval.probe import capture_qkv, streamed_heads_logprobs
from jaxprefill.eval.runner import prompt_tokens
from jaxprefill.eval.tasks import make_sample

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


def answer_prompt(tok, task: str, length: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """A calibration sample: (chat prompt tokens [S0], answer tokens)."""
    sample = make_sample(tok, task, length, DEPTHS[seed % len(DEPTHS)], seed)
    prompt = np.asarray(tok.encode_prompt(sample.messages, chat=True), np.int32)
    return prompt, tok.encode(" ".join(sample.answers[:1]), add_special_tokens=False)


def ablation_scores(model, tok, prompts, args) -> np.ndarray:
    """[L, Hkv] elimination order / heads (see the module docstring; higher = keep dense)."""
    rows = [answer_prompt(tok, task, length, seed) for length, task, seed in prompts]
    width = max(len(p) + len(a) for p, a in rows)
    width = -(-width // args.block) * args.block
    n_ans = max(len(a) for _, a in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    qpos = np.zeros((len(rows), n_ans), np.int32)
    targets = np.zeros((len(rows), n_ans), np.int32)
    valid = np.zeros((len(rows), n_ans), bool)
    for i, (prompt, answer) in enumerate(rows):  # prompt + answer[:-1]: teacher forcing
        seq = np.concatenate([prompt, np.asarray(answer, np.int32)])
        tokens[i, :len(seq) - 1] = seq[:-1]
        a = len(answer)
        qpos[i, :a] = len(prompt) - 1 + np.arange(a)
        targets[i, :a] = answer
        valid[i, :a] = True

    def logprobs(stream: np.ndarray) -> jax.Array:
        return streamed_heads_logprobs(model, tokens, stream, qpos, sink=args.sink,
                                       local=args.local, block=args.block, impl=args.impl)

    n_layers, hkv = len(model.layers), model.config.num_kv_heads
    stream = np.zeros((n_layers, hkv), bool)
    dense_logp = logprobs(stream)  # [B, A, V]
    w = jnp.asarray(valid, jnp.float32) / valid.sum()

    def loss(stream: np.ndarray) -> float:
        logp = logprobs(stream)
        if args.loss == "nll":
            per = -jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
        else:  # KL(dense || streamed) per answer position
            per = jnp.sum(jnp.exp(dense_logp) * (dense_logp - logp), axis=-1)
        return float(jnp.sum(per * w))

    base = loss(stream)  # 0 for KL; the dense answer loss for NLL
    t0 = time.perf_counter()  # compiled by dense_logp: this times one forward
    every = loss(~stream)
    print(f"{args.loss}: dense {base:.4f}, every head streaming {every:.4f} over {len(rows)} "
          f"prompts [{tokens.shape[0]} x {tokens.shape[1]}]; one forward "
          f"{time.perf_counter() - t0:.2f} s", flush=True)
    fractions = [args.dense_fraction] + [float(item.partition(":")[0]) for item in args.also]
    goal = stream.size - int(round(min(fractions) * stream.size))  # heads that must stream
    order = []  # (layer, head) in elimination order
    per_round = max(1, -(-stream.size // args.rounds))
    while True:
        cand = [(l, h) for l in range(n_layers) for h in range(hkv) if not stream[l, h]]
        costs = []
        for l, h in tqdm(cand, desc=f"round {len(order) // per_round + 1}", leave=False):
            trial = stream.copy()
            trial[l, h] = True
            costs.append(loss(trial))
        ranked = [cand[i] for i in np.argsort(costs, kind="stable")]
        if len(order) >= goal:  # the rest stay dense: ordered by this round's cost
            order += ranked
            break
        for l, h in ranked[:per_round]:
            stream[l, h] = True
        order += ranked[:per_round]
        print(f"streaming {len(order)}/{stream.size} heads: answer loss {loss(stream):.4f} "
              f"(dense {base:.4f})", flush=True)
    score = np.zeros((n_layers, hkv))
    for rank, (l, h) in enumerate(order):
        score[l, h] = (rank + 1) / stream.size
    return score


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
    ap.add_argument("--criterion", default="far_mass",
                    choices=["far_mass", "needle_mass", "ablation"])
    ap.add_argument("--rounds", type=int, default=10,
                    help="ablation: elimination rounds (1 = rank by single-head ablation)")
    ap.add_argument("--block", type=int, default=128, help="ablation: streaming block size")
    ap.add_argument("--impl", default="auto",
                    help="ablation: block-sparse kernel (auto, triton, mosaic_gpu, xla, reference)")
    ap.add_argument("--loss", default="kl", choices=["kl", "nll"], help="ablation: what a "
                    "streaming head costs (see the module docstring)")
    ap.add_argument("--dtype", default="bfloat16",
                    help="compute dtype (bfloat16, as sparse_accuracy_gpu.py runs the model)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--also", nargs="*", default=[], metavar="FRACTION:PATH",
                    help="more head configs from the same scores, other dense fractions")
    args = ap.parse_args()
    if not 0.0 <= args.dense_fraction <= 1.0:
        ap.error(f"--dense-fraction must be in [0, 1], got {args.dense_fraction}")

    model, tok = jp.load(args.model, dtype=args.dtype)
    prompts = [(n, t, s) for n in args.lengths for t in args.tasks for s in args.seeds]
    if args.criterion == "ablation":
        score = ablation_scores(model, tok, prompts, args)
        outs = [(args.dense_fraction, args.out)] + [
            (float(f), path) for f, _, path in (item.partition(":") for item in args.also)]
        for fraction, path in outs:
            write_config(score, fraction, path, args)
        return 0
    scores = []
    for length, task, seed in tqdm(prompts, desc="calibration prompts"):
        if args.criterion == "far_mass":
            tokens = prompt_tokens(tok, length, seed=seed, task=task)
            q, k, _ = capture_qkv(model, jnp.asarray(tokens))  # [L, 1, S, H, D]
            scores.append(far_mass(q[:, 0, -args.rows:], k[:, 0], args.sink, args.local))
            continue
        prompt, answer = answer_prompt(tok, task, length, seed)
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
           **({"loss": args.loss, "rounds": args.rounds} if args.criterion == "ablation" else {}),
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
