"""TPLA accuracy study: held-out perplexity of an MLA model under MLA vs TPLA decode.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
      python -m scripts.accuracy.tpla_accuracy --model runs/mla-small-h100/export \\
        --validation data/stdlib/validation.jsonl --train data/stdlib/train.jsonl \\
        --rows 16 --out benchmarks/results/tpla_accuracy.md

Teacher-forced (`jaxprefill.mla.tpla_model.tpla_logits`): every query's attention is computed
the TPLA way over its prefix, which is exactly what a TPLA decode step computes for that token,
so no token loop is needed. Two contexts:
  * mla  — the prefix's cache entries come from the exact MLA forward: "prefill with MLA, decode
           token t with TPLA" (the paper's prefill/decode split; each position is a first
           decode step after a prefill of everything before it);
  * tpla — every entry comes from TPLA hidden states (the whole text decoded token by token
           with TPLA: errors compound through the cache).
Rows are packed like training (concat_then_split, per-document positions and segment ids) and
the loss is the trainer's (next token within a document).

Design: for each g in {2, 4} and transform in {none, hadamard, pca}, the half fraction
rope x norm x logit_scale = {(replicated, global, 1), (replicated, per_shard, g),
(split, global, g), (split, per_shard, 1)} (every level of every switch at every g and
transform; main effects are aliased with two-switch interactions); `--design full` runs all 8.
PCA is fitted on latents of `--calib-rows` rows of the TRAIN split.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxprefill as jp
from jaxprefill.sharding import make_mesh
from jaxprefill.mla.tpla import TPLAConfig, reparameterize
from jaxprefill.mla.tpla_model import tpla_logits

HALF = (("replicated", "global", "1"), ("replicated", "per_shard", "g"),
        ("split", "global", "g"), ("split", "per_shard", "1"))
FULL = tuple(itertools.product(("replicated", "split"), ("global", "per_shard"), ("1", "g")))


def packed_rows(path: str, rows: int, seq_len: int) -> dict[str, np.ndarray]:
    """The first `rows` packed rows [rows, seq_len] of a JSONL split, byte tokens, no shuffle
    (the trainer's validation packing)."""
    from jaxprefill.data import make_loader, make_tokenizer, open_source

    loader = make_loader(open_source("jsonl", (path,), "text", key="data"), make_tokenizer("byte", None),
                         seq_len=seq_len, batch_size=rows, packing="concat_then_split",
                         shuffle=False, repeat=False, add_bos=False, add_eos=True)
    batch = next(iter(loader))
    return {k: np.asarray(batch[k], np.int32) for k in ("tokens", "positions", "segment_ids")}


def nll(logits: jax.Array, batch: dict) -> tuple[float, float]:
    """(summed next-token NLL within documents, predicted-token count) as `train.step`."""
    tokens, segs = batch["tokens"], batch["segment_ids"]
    targets = jnp.roll(tokens, -1, axis=1)
    mask = (segs == jnp.roll(segs, -1, axis=1)) & (segs > 0)
    mask = mask.at[:, -1].set(False)
    logz = jax.nn.logsumexp(logits, axis=-1)
    tl = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return float(jnp.where(mask, logz - tl, 0.0).sum()), float(mask.sum())


def unigram_nll(train_path: str, batch: dict, vocab: int) -> float:
    """Per-token NLL of a byte unigram model (add-one smoothed counts of the train split)."""
    counts = np.ones(vocab)
    rows = packed_rows(train_path, 256, 512)
    np.add.at(counts, rows["tokens"].ravel(), 1)
    logp = np.log(counts / counts.sum())
    tokens, segs = batch["tokens"], batch["segment_ids"]
    mask = (segs[:, :-1] == segs[:, 1:]) & (segs[:, :-1] > 0)
    return float(-(logp[tokens[:, 1:]] * mask).sum() / mask.sum())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported DeepSeek directory (jp.load)")
    p.add_argument("--validation", default="data/stdlib/validation.jsonl")
    p.add_argument("--train", default="data/stdlib/train.jsonl", help="PCA calibration text")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib-rows", type=int, default=8)
    p.add_argument("--groups", default="2,4")
    p.add_argument("--contexts", default="mla,tpla")
    p.add_argument("--transforms", default="none,hadamard,pca")
    p.add_argument("--design", choices=("half", "full"), default="half")
    p.add_argument("--out", default=None, help="also write the markdown here")
    args = p.parse_args(argv)

    t_start = time.time()
    model, _ = jp.load(args.model, dtype="float32")
    cfg = model.config
    batch = packed_rows(args.validation, args.rows, args.seq_len)
    calib = jnp.asarray(packed_rows(args.train, args.calib_rows, args.seq_len)["tokens"])
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    n_dev = len(jax.devices())
    groups = [int(g) for g in args.groups.split(",")]
    if max(groups) > n_dev:
        raise SystemExit(f"need {max(groups)} devices, have {n_dev}: set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count=8")

    mla_logits = jax.jit(lambda st, t, pos, seg: nnx.merge(graphdef, st)(t, pos, seg))
    graphdef, state = nnx.split(model)
    base_nll, count = nll(mla_logits(state, arrays["tokens"], arrays["positions"],
                                     arrays["segment_ids"]), batch)
    mla_loss = base_nll / count
    uni = unigram_nll(args.train, batch, cfg.vocab_size)
    say = lambda m: print(m, file=sys.stderr, flush=True)
    say(f"MLA: loss {mla_loss:.4f} ppl {math.exp(mla_loss):.3f} over {count:.0f} tokens; "
        f"unigram ppl {math.exp(uni):.2f}")

    folded = {t: nnx.split(reparameterize(model, t, calib_tokens=calib if t == "pca" else None))[1]
              for t in args.transforms.split(",")}
    fns = {}
    rows = []
    combos = HALF if args.design == "half" else FULL
    for g in groups:
        mesh = make_mesh(tensor=g, devices=jax.devices()[:g])
        # jp.load commits the weights to device 0; the shard_map runs on the mesh's g devices
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        on_mesh = {t: jax.device_put(st, replicated) for t, st in folded.items()}
        for context in args.contexts.split(","):
            for rope, norm, scale in combos:
                for transform, st in on_mesh.items():
                    tcfg = TPLAConfig(transform=transform, rope=rope, norm=norm, logit_scale=scale)
                    key = (g, context, rope, norm, scale)  # transform only changes weights
                    if key not in fns:
                        fns[key] = jax.jit(lambda st, t, pos, seg, tcfg=tcfg, mesh=mesh, c=context:
                                           tpla_logits(nnx.merge(graphdef, st), t, mesh=mesh,
                                                       tcfg=tcfg, positions=pos, segment_ids=seg,
                                                       context=c))
                    t0 = time.time()
                    total, _ = nll(fns[key](st, arrays["tokens"], arrays["positions"],
                                            arrays["segment_ids"]), batch)
                    loss = total / count
                    rows.append((g, context, transform, rope, norm, scale, loss))
                    say(f"g={g} {context:4s} {transform:8s} {rope:10s} {norm:9s} scale={scale}: "
                        f"ppl {math.exp(loss):.3f} ({time.time() - t0:.0f} s)")

    lines = [f"Held-out perplexity (byte-level, {count:.0f} predicted tokens = {args.rows} rows x "
             f"{args.seq_len} of `{args.validation}`), model `{args.model}`.",
             "",
             f"MLA (exact): **ppl {math.exp(mla_loss):.3f}** (loss {mla_loss:.4f} nats/byte); "
             f"byte-unigram baseline ppl {math.exp(uni):.2f}.",
             "",
             "| g | context | transform | rope | norm | logit scale | ppl | Δppl vs MLA | Δloss (nats) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for g, context, transform, rope, norm, scale, loss in rows:
        lines.append(f"| {g} | {context} | {transform} | {rope} | {norm} | {'τ' if scale == '1' else 'g·τ'} "
                     f"| {math.exp(loss):.3f} | {math.exp(loss) - math.exp(mla_loss):+.3f} "
                     f"| {loss - mla_loss:+.4f} |")
    lines += ["", f"Generated {datetime.date.today().isoformat()} by "
              f"`python -m scripts.accuracy.tpla_accuracy "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}` on {n_dev} "
              f"{jax.devices()[0].platform} devices in {time.time() - t_start:.0f} s."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
