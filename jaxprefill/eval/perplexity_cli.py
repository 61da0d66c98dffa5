"""`jaxprefill perplexity`: held-out perplexity of long documents against the context length.

    jaxprefill perplexity --model smollm2-135m-instruct --docs data/longctx/validation.jsonl \
        --lengths 1024 2048 4096 8192 16384 32768 --label base --out-dir eval/ppl
    jaxprefill perplexity ... --override max_position_embeddings=32768 \
        'rope_scaling={rope_type: yarn, factor: 4.0}' --label yarn-x4-free --out-dir eval/ppl
    jaxprefill perplexity ... --adapter runs/smollm2-32k-lora --label lora-32k --out-dir eval/ppl

Every document ({"text": ...} per JSONL line) is tokenized as the trainer tokenizes text (the
model's tokenizer, no special tokens); documents of at least max(--lengths) + 1 tokens are kept
and truncated to that, the others are skipped and counted. One dense forward per document at
the longest length gives every shorter length (:mod:`jaxprefill.eval.perplexity`). A length
beyond the model's ``max_position_embeddings`` is still evaluated (that is what the comparison
is about) and marked in the table.

Output directory, shared by the runs that are compared (one ``--label`` each):
  perplexity.json       {"labels": {label: entry}}: each run's identity (model, adapter,
                        overrides, dtype, documents' sha256, --docs-limit, lengths), perplexity
                        per length and per position bucket, per-document mean NLL. A run adds
                        or replaces its own label's entry only when it has finished (atomic
                        write under a lock): other labels are kept, a finished one is never lost.
  perplexity.md / .png  the table (label x length, position buckets) and the plot of all labels.
  perplexity_nll/<label>-<identity>.npz
                        the per-token NLL rows, float32 [documents, max length], saved after
                        every document: an interrupted run resumes at the next document.
A rerun of a finished label with the same identity computes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np

from jaxprefill.data.tokenize import HFTokenizer
from jaxprefill.eval import plots
from jaxprefill.eval.cli import check_out_dir, load_model, parse_overrides
from jaxprefill.eval.perplexity import CHUNK, context_perplexity, position_buckets, token_nll
from jaxprefill.eval.report import write_atomic
from jaxprefill.validate import InputError

RESULTS, REPORT, PLOT, NLL_DIR, LOCK = ("perplexity.json", "perplexity.md", "perplexity.png",
                                        "perplexity_nll", ".perplexity.lock")
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,63}")
BEYOND = "†"  # marks a length beyond the model's max_position_embeddings


def register(sub) -> None:
    p = sub.add_parser(
        "perplexity", help="held-out perplexity of long documents against the context length",
        description="Perplexity of --docs at each of --lengths (every document truncated to "
                    "its first L tokens) and per position bucket, from one dense forward per "
                    "document; adds the --label entry to --out-dir/perplexity.json and redraws "
                    "perplexity.md and perplexity.png over every label there.")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="bundled model name, HF directory or .gguf file")
    p.add_argument("--adapter", default=None, help="adapter weights (jp.load(adapter=...))")
    p.add_argument("--override", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="model config.json fields changed after loading, the value parsed as "
                        "YAML, e.g. max_position_embeddings=32768 "
                        "'rope_scaling={rope_type: yarn, factor: 4.0}'")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--docs", required=True, help="JSONL file, one {\"text\": ...} per line")
    p.add_argument("--docs-limit", type=int, default=None,
                   help="use the first N documents that are long enough (default: all)")
    p.add_argument("--lengths", type=int, nargs="+", required=True,
                   help="context lengths in tokens, e.g. 1024 2048 4096 8192 16384 32768")
    p.add_argument("--label", required=True,
                   help="name of this run in the table (letters, digits, . _ + = -)")
    p.add_argument("--chunk", type=int, default=CHUNK,
                   help=f"positions per output-projection step (memory; default {CHUNK})")
    p.add_argument("--out-dir", required=True, help="output directory shared by the labels")
    p.set_defaults(func=run_perplexity)


def check_lengths(values: list[int]) -> list[int]:
    """--lengths: positive integers, returned sorted without repeats."""
    bad = [v for v in values if v < 1]
    if bad or not values:
        raise InputError(f"--lengths must be positive token counts, got {values}")
    return sorted(set(values))


def read_documents(path: str) -> list[tuple[str, str]]:
    """(id, text) of each non-blank line of a JSONL file; id = the record's "id" or "line N"."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"--docs {path}: a directory; give a JSONL file")
    if not p.is_file():
        raise InputError(f"--docs {path}: no such file")
    docs = []
    with open(p, "rb") as f:  # bytes: a line that is not UTF-8 is named like a bad record
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"--docs {path}:{n}: not UTF-8 text (a JSONL file is)") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"--docs {path}:{n}: not a JSON record ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise InputError(f"--docs {path}:{n}: expected an object with a string "
                                 f"\"text\" field")
            docs.append((str(rec.get("id", f"line {n}")), rec["text"]))
    if not docs:
        raise InputError(f"--docs {path}: no documents (empty file)")
    return docs


def select_documents(docs: list[tuple[str, str]], encode: Callable[[str], np.ndarray],
                     need: int, limit: int | None, source: str,
                     log: Callable[[str], None]) -> tuple[list[tuple[str, np.ndarray]], dict]:
    """The first ``limit`` documents of ``docs`` (read from ``source``) with at least ``need``
    tokens, truncated to ``need``; and the counts (read, kept, too short with their sizes, left
    unread by the limit)."""
    kept, short = [], []
    read = 0
    for doc_id, text in docs:
        if limit is not None and len(kept) >= limit:
            break
        read += 1
        ids = np.asarray(encode(text), np.int32)
        if len(ids) >= need:
            kept.append((doc_id, ids[:need]))
        else:
            short.append({"id": doc_id, "tokens": int(len(ids))})
    counts = {"documents": len(docs), "read": read, "kept": len(kept), "too_short": short,
              "not_read": len(docs) - read, "tokens_per_document": need}
    sizes = ", ".join(f"{s['id']}: {s['tokens']}" for s in short[:8])
    log(f"{source}: {len(kept)} of {len(docs)} documents kept ({need} tokens each: max(--lengths) "
        f"+ 1); {len(short)} skipped as shorter"
        + (f" ({sizes}{', ...' if len(short) > 8 else ''} tokens)" if short else "")
        + (f"; {len(docs) - read} not read (--docs-limit {limit})" if read < len(docs) else ""))
    if not kept:
        longest = max(s["tokens"] for s in short)
        raise InputError(f"--docs {source}: no document has the {need} tokens --lengths "
                         f"{need - 1} needs (max(--lengths) + 1; the longest has {longest}); "
                         f"give shorter --lengths or longer documents")
    return kept, counts


def identity_sha(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Exclusive lock of the output directory's results (runs of other labels may share it)."""
    with open(out / LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_results(out: Path) -> dict:
    """{label: entry} of out/perplexity.json ({} when absent); an unreadable file is an error,
    never overwritten."""
    path = out / RESULTS
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        labels = data["labels"]
        if not isinstance(labels, dict):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InputError(f"{path}: not a perplexity results file ({{\"labels\": {{...}}}}); "
                         f"move it away or use another --out-dir") from None
    return labels


def load_partial(path: Path, ids: list[str], width: int, log) -> list[np.ndarray]:
    """NLL rows of an interrupted run with this identity (its first documents), or []."""
    if not path.exists():
        return []
    try:
        with np.load(path) as data:
            done_ids, nll = [str(i) for i in data["ids"]], np.asarray(data["nll"], np.float32)
    except (OSError, ValueError, KeyError) as e:
        log(f"{path}: unreadable ({e}); computing its documents again")
        return []
    if done_ids != ids[:len(done_ids)] or nll.shape != (len(done_ids), width):
        log(f"{path}: holds other documents; computing them again")
        return []
    log(f"{path}: resuming with {len(done_ids)} document(s) done")
    return list(nll)


def save_partial(path: Path, ids: list[str], rows: list[np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, ids=np.asarray(ids), nll=np.stack(rows).astype(np.float32))
    os.replace(tmp, path)


def run_perplexity(args: argparse.Namespace) -> int:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # Every check that needs no model first.
    lengths = check_lengths(args.lengths)
    if not LABEL.fullmatch(args.label):
        raise InputError(f"--label {args.label!r}: use 1-64 letters, digits and . _ + = - "
                         f"(starting with a letter or digit)")
    for flag, value in (("--docs-limit", args.docs_limit), ("--chunk", args.chunk)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    check_out_dir(args.out_dir)
    docs = read_documents(args.docs)
    overrides = parse_overrides(args.overrides)
    identity = {"model": args.model, "adapter": args.adapter, "overrides": overrides,
                "dtype": args.dtype,
                "docs_sha256": hashlib.sha256(Path(args.docs).read_bytes()).hexdigest(),
                "docs_limit": args.docs_limit, "lengths": lengths}
    sha = identity_sha(identity)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with locked(out):
        old = read_results(out).get(args.label)
    if old is not None and old.get("identity_sha") == sha and old.get("finished"):
        log(f"{args.label}: finished in {out / RESULTS} with this identity; nothing to compute")
        return 0
    if old is not None:
        changed = sorted(k for k in identity if old.get("identity", {}).get(k) != identity[k])
        log(f"{args.label}: {out / RESULTS} holds it with other {', '.join(changed)}; it is "
            f"replaced when this run finishes")

    t_start = time.perf_counter()
    model, tok = load_model(args.model, args.dtype, args.adapter, overrides)
    context = int(model.config.max_position_embeddings)
    log(f"loaded {args.model} in {time.perf_counter() - t_start:.1f}s (max_position_embeddings "
        f"{context})")
    beyond = [n for n in lengths if n > context]
    if beyond:
        log(f"lengths {beyond} exceed max_position_embeddings {context}: evaluated anyway, "
            f"marked {BEYOND} in the table")
    kept, counts = select_documents(docs, HFTokenizer(tok).encode, lengths[-1] + 1,
                                    args.docs_limit, args.docs, log)
    ids = [doc_id for doc_id, _ in kept]
    nll_file = Path(NLL_DIR) / f"{args.label}-{sha}.npz"
    rows = load_partial(out / nll_file, ids, lengths[-1], log)
    first = len(rows)
    for i in range(first, len(kept)):
        t0 = time.perf_counter()
        row = np.asarray(token_nll(model, kept[i][1][None], args.chunk))[0]
        rows.append(row)
        save_partial(out / nll_file, ids[:len(rows)], rows)
        log(f"[perplexity] {args.label}: doc {i + 1}/{len(kept)} ({ids[i]}): "
            f"{len(kept[i][1])} tokens in {time.perf_counter() - t0:.1f}s"
            f"{' (compile included)' if i == first else ''}; "
            f"ppl at {lengths[-1]} {np.exp(row.mean(dtype=np.float64)):.3f}")
    nll = np.stack(rows)
    ctx = context_perplexity(nll, lengths)
    entry = {
        "label": args.label, "identity": identity, "identity_sha": sha, "finished": True,
        "docs": args.docs, "max_position_embeddings": context,
        "device": jax.devices()[0].device_kind, "documents": counts,
        "context": [{"length": n, "ppl": ctx[n], "nll": float(np.log(ctx[n])),
                     "predictions": nll.shape[0] * n, "beyond_context": n > context}
                    for n in lengths],
        "buckets": position_buckets(nll, [0] + lengths),
        "per_document": [{"id": doc_id, "nll": {str(n): float(nll[r, :n].mean())
                                                 for n in lengths}}
                         for r, doc_id in enumerate(ids)],
        "nll_file": nll_file.as_posix(), "seconds": round(time.perf_counter() - t_start, 1),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with locked(out):
        results = read_results(out)  # again: another label may have finished meanwhile
        results[args.label] = entry
        write_atomic(out / RESULTS, json.dumps({"labels": results}, indent=1) + "\n")
        text = markdown(results)
        write_atomic(out / REPORT, text)
        plot(str(out / PLOT), results)
    print(text)
    log(f"wrote {out / RESULTS}, {REPORT}, {PLOT}")
    return 0


# ------------------------------------------------------------------------------ report
def _cols(entries: dict, key: str) -> list:
    cols = {(r["start"], r["end"]) if key == "buckets" else r["length"]
            for e in entries.values() for r in e[key]}
    return sorted(cols)


def markdown(entries: dict) -> str:
    """perplexity.md: the runs, perplexity per label x context length, per position bucket."""
    lengths, buckets = _cols(entries, "context"), _cols(entries, "buckets")
    docs = sorted({(e["docs"], e["identity"]["docs_sha256"][:12]) for e in entries.values()})
    out = ["# Held-out perplexity against context length", "",
           f"Documents {', '.join(f'`{p}` (sha256 {s})' for p, s in docs)}; each truncated to "
           f"its first max(L) + 1 tokens, one dense forward per document. Perplexity at L: "
           f"exp of the mean NLL of each document's first L next-token predictions (the "
           f"document truncated to L tokens). {BEYOND}: L beyond the model's "
           f"max_position_embeddings.", "", "## Runs", "",
           "| label | model | adapter | overrides | dtype | context | documents | device |",
           "|---|---|---|---|---|---|---|---|"]
    for label, e in entries.items():
        ident = e["identity"]
        over = json.dumps(ident["overrides"], sort_keys=True) if ident["overrides"] else "-"
        out.append(f"| {label} | {ident['model']} | {ident['adapter'] or '-'} | {over} | "
                   f"{ident['dtype']} | {e['max_position_embeddings']} | "
                   f"{e['documents']['kept']} | {e['device']} |")
    out += ["", "## Perplexity at context length L", "",
            "| label | " + " | ".join(str(n) for n in lengths) + " |",
            "|---|" + "---|" * len(lengths)]
    for label, e in entries.items():
        by = {r["length"]: r for r in e["context"]}
        out.append(f"| {label} | " + " | ".join(
            f"{by[n]['ppl']:.3f}{' ' + BEYOND if by[n]['beyond_context'] else ''}"
            if n in by else "-" for n in lengths) + " |")
    out += ["", "## Perplexity by position", "",
            "Predictions made at positions [a, b) of the longest window (seeing a+1 to b "
            "tokens): perplexity falls with the position where far context helps.", "",
            "| label | " + " | ".join(f"{a}-{b - 1}" for a, b in buckets) + " |",
            "|---|" + "---|" * len(buckets)]
    for label, e in entries.items():
        by = {(r["start"], r["end"]): r for r in e["buckets"]}
        out.append(f"| {label} | " + " | ".join(f"{by[k]['ppl']:.3f}" if k in by else "-"
                                                for k in buckets) + " |")
    return "\n".join(out) + "\n"


def plot(path: str, entries: dict) -> None:
    """perplexity.png: perplexity vs context length (left) and vs position bucket (right), one
    line per label, log2 x; hollow markers beyond the model's max_position_embeddings."""
    plt = plots._plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, e in entries.items():
        x = np.array([r["length"] for r in e["context"]], float)
        y = np.array([r["ppl"] for r in e["context"]], float)
        far = np.array([r["beyond_context"] for r in e["context"]], bool)
        line, = ax.plot(x, y, marker="o", ms=5, lw=1.4, label=label)
        ax.plot(x[far], y[far], "o", ms=7, mfc="white", color=line.get_color())
        bx.plot([r["end"] for r in e["buckets"]], [r["ppl"] for r in e["buckets"]],
                marker="o", ms=4, lw=1.4, color=line.get_color(), label=label)
    for a, title, xlabel in ((ax, "perplexity at context length L (hollow: beyond the "
                                  "model's context)", "context length L (tokens)"),
                             (bx, "perplexity by position", "position bucket (upper edge)")):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        for axis in (a.yaxis.set_major_formatter, a.yaxis.set_minor_formatter):
            axis(plt.FuncFormatter(lambda v, _: f"{v:g}"))  # 98, not 9.8 x 10^1
        a.set_title(title, fontsize=9)
        a.set_xlabel(xlabel)
        a.grid(alpha=0.3, which="both")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
