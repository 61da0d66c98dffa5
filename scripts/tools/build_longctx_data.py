"""Build the long-document training data for extending SmolLM2-135M to 32K tokens, offline.

    python -m scripts.tools.build_longctx_data --out data/longctx
    python -m scripts.tools.build_longctx_data --out /tmp/l --list-only     # sources only
    python -m scripts.tools.build_longctx_data --out /tmp/l --sources stdlib man --synthetic-frac 0

Writes ``train.jsonl`` and ``validation.jsonl`` (one ``{"id", "source", "text"}`` document a
line; synthetic rows also ``"loss_spans"``, their answers' characters) and ``manifest.json`` (sources, per-document token counts, totals, exclusions, Python
version, sha256 of each output) into ``--out``; every file goes through a temporary file and
a rename, so an interrupted build leaves the previous files or none.

Text (all local, see jaxprefill/data/longdocs.py): the running Python's stdlib sources (one
document per package, files in sorted order, each after a ``# file: Lib/...`` line; ``test``
split per sub-package / module), their docstrings as outlines, English man pages as text,
info manuals, and READMEs / changelogs / NEWS / plain-text docs under /usr/share/doc.
Missing folders are skipped and reported. Documents below ``--min-tokens`` are dropped; small
groups are bundled up to ``--target-tokens``; large ones cut into parts of at most
``--max-tokens`` (jaxprefill/data/longdocs_pack.py). Token counts use the bundled SmolLM2
tokenizer, without BOS/EOS.

Evaluation text stays out (jaxprefill/data/longdocs_guard.py): every dev and test haystack
document of ``jaxprefill.eval.haystack`` by its source path inside ``Lib/`` (any Python
version), by text hash, and by shared lines (copies and moved modules); the build fails if
the written text contains a fixed wording of the evaluation tasks (jaxprefill/eval/tasks*.py).
``--synthetic-frac`` adds retrieval rows (jaxprefill/data/longdocs_synth.py) to train.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import math
import os
import platform
import random
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path

from jaxprefill.data import longdocs as ld
from jaxprefill.data.longdocs_guard import HaystackGuard, find_phrases, sha256, template_phrases
from jaxprefill.data.longdocs_pack import Doc, assemble, pick_validation
from jaxprefill.data.longdocs_synth import ALL_FAMILIES, FAMILIES, retrieval_row
from jaxprefill.eval import haystack
from jaxprefill.loading.gguf_reader import bundled_gguf_path
from jaxprefill.loading.tokenizer import Tokenizer
from scripts.tools.build_eval_haystacks import clean as haystack_clean

SOURCES = ("stdlib", "docstrings", "man", "info", "doc")
TOKENIZER = "smollm2-135m-instruct"
THRESHOLDS = (8192, 16384, 32768)
# Default text budgets (characters) of the large sources, so a build takes well under a
# minute on 2 cores; stdlib code is closest to the evaluation's haystacks and gets the most.
BUDGETS = {"stdlib": 24_000_000, "man": 12_000_000, "doc": 12_000_000}
MIN_FILE_CHARS = 300  # /usr/share files below this are stubs (".so" redirects, one-line READMEs)
# Sources other than /usr/share/doc keep whole files (cut into pieces by tokens if need be),
# and stdlib packages stay whole; a package over STDLIB_SPLIT_BYTES (``test``) is grouped by
# its sub-packages and modules instead.
WHOLE_FILE_CHARS = 50_000_000
STDLIB_SPLIT_BYTES = 4_000_000


class Log:
    """Progress lines with the seconds since the build started."""

    def __init__(self, quiet: bool = False) -> None:
        self.t0, self.quiet = time.perf_counter(), quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)


def haystack_guard() -> tuple[HaystackGuard, dict]:
    """The guard over every dev and test haystack document, and its manifest entry."""
    docs = [{"name": d.name, "source_path": d.source_path, "sha256": d.sha256, "text": d.text}
            for split in haystack.SPLITS for d in haystack.documents(split)]
    info = {"asset_sha256": haystack.asset_sha256(), "documents": len(docs),
            "source_paths": sorted({d["source_path"] for d in docs})}
    return HaystackGuard(docs, clean=haystack_clean), info


def task_phrases() -> tuple[list[str], dict]:
    """Fixed wordings of jaxprefill/eval/tasks.py and any sibling tasks*.py module."""
    modules = sorted(Path(haystack.__file__).parent.glob("tasks*.py"))
    phrases: set[str] = set()
    info = {}
    for m in modules:
        src = m.read_text(encoding="utf-8")
        try:
            found = template_phrases(src)
        except SyntaxError as e:
            raise SystemExit(f"error: cannot read the task wordings of {m}: {e}") from None
        if not found:
            raise SystemExit(f"error: no task wordings found in {m}; the template check "
                             f"would be empty (see jaxprefill/data/longdocs_guard.py)")
        phrases.update(found)
        info[f"jaxprefill/eval/{m.name}"] = {"sha256": sha256(src), "phrases": len(found)}
    return sorted(phrases), info


# ---------------------------------------------------------------------------- collect

def walk(args) -> list[ld.SourceFile]:
    """Every candidate file of the chosen sources, in walk order (docstrings come from the
    stdlib files later)."""
    files: list[ld.SourceFile] = []
    if {"stdlib", "docstrings"} & set(args.sources):
        files += ld.stdlib_files(Path(args.stdlib), STDLIB_SPLIT_BYTES)
    if "man" in args.sources:
        files += ld.man_files(Path(args.man))
    if "info" in args.sources:
        files += ld.info_files(Path(args.info))
    if "doc" in args.sources:
        files += ld.doc_files(Path(args.doc))
    return files


def group_cap(f: ld.SourceFile, args) -> int:
    return WHOLE_FILE_CHARS if f.source == "stdlib" else args.max_group_chars


def estimated_chars(f: ld.SourceFile) -> int:
    """Size of a file's text before reading it: its size, or a gzip file's stored length."""
    try:
        if f.path.name.endswith(".gz"):
            with open(f.path, "rb") as fh:
                fh.seek(-4, os.SEEK_END)
                return int.from_bytes(fh.read(4), "little")
        return f.path.stat().st_size
    except OSError:  # unreadable: file_text says so when it is read
        return 0


def select_groups(files: list[ld.SourceFile], args) -> tuple[list[ld.SourceFile], dict]:
    """Files of the groups that fit each source's --source-chars budget (sizes estimated
    before reading): groups in a seeded random order, stdlib test suites after the library,
    taken while they fit; the walk order of what is kept is unchanged. Returns (files,
    {source: number of groups left out})."""
    size: dict[tuple[str, str], int] = {}
    for f in files:
        cap = args.max_file_chars if f.source == "doc" else WHOLE_FILE_CHARS
        key = (f.source, f.group)
        size[key] = min(size.get(key, 0) + min(estimated_chars(f), cap), group_cap(f, args))
    keep: set[tuple[str, str]] = set()
    left: dict[str, int] = {}
    for source in dict.fromkeys(k[0] for k in size):
        budget = args.budgets.get(source)
        keys = [k for k in size if k[0] == source]
        if budget is None:
            keep.update(keys)
            continue
        rng = random.Random(f"longctx-budget/{args.seed}/{source}")
        order = sorted(keys, key=lambda k: (k[0] == "stdlib" and k[1].startswith("test"),
                                            rng.random()))
        total = 0
        for k in order:
            if total + size[k] <= budget:
                keep.add(k)
                total += size[k]
        left[source] = len(keys) - sum(k[0] == source for k in keep)
    return [f for f in files if (f.source, f.group) in keep], left


def collect(args, guard: HaystackGuard, log: Log) -> tuple[list[ld.Piece], dict]:
    """Read, filter and wrap the files into pieces; returns (pieces, report). Pieces come
    ordered by source (SOURCES order), then group."""
    files, left_out = select_groups(walk(args), args)
    for source, n in left_out.items():
        if n:
            log(f"{source}: {n} groups left out by --source-chars {source}="
                f"{args.budgets[source]}")
    by_source: dict[str, list[ld.Piece]] = {s: [] for s in SOURCES}
    skipped: dict[str, Counter] = {s: Counter() for s in SOURCES}
    excluded: list[dict] = []
    near: list[dict] = []
    seen: set[str] = set()
    group_chars: Counter = Counter()
    truncated = Counter()
    for f in files:
        if any(fnmatch.fnmatch(f.rel, pat) for pat in args.exclude):
            skipped[f.source]["--exclude"] += 1
            continue
        if f.source == "stdlib":
            why = guard.check_path(f.rel.removeprefix("Lib/"))
            if why:
                excluded.append({"file": f.rel, "reason": why})
                continue
        if group_chars[(f.source, f.group)] >= group_cap(f, args):
            skipped[f.source]["group over --max-group-chars"] += 1
            continue
        got = ld.file_text(f, args.max_file_chars if f.source == "doc" else WHOLE_FILE_CHARS)
        if got is None:
            skipped[f.source]["binary or unreadable"] += 1
            continue
        text, cut = got
        if not text.strip() or (f.source != "stdlib" and len(text) < MIN_FILE_CHARS):
            skipped[f.source]["empty or tiny"] += 1
            continue
        digest = sha256(text)
        if digest in seen:
            skipped[f.source]["duplicate text"] += 1
            continue
        seen.add(digest)
        verdict = guard.check_text(text, prose=not f.rel.endswith(".py"))
        if verdict.excluded:
            excluded.append({"file": f.rel, "reason": verdict.excluded})
            continue
        if verdict.shared:
            near.append({"file": f.rel, "shared_long_lines": verdict.shared,
                         "paragraphs_removed": verdict.scrubbed})
        text = verdict.text
        if not text.strip():
            continue
        group_chars[(f.source, f.group)] += len(text)
        truncated[f.source] += cut
        if "stdlib" in args.sources or f.source != "stdlib":
            by_source[f.source].append(ld.piece(f.source, f.group, f.rel, text, cut))
        if (f.source == "stdlib" and f.rel.endswith(".py") and "docstrings" in args.sources
                and not f.rel.startswith("Lib/test/")):  # test docstrings say little
            outline = ld.docstring_outline(text, ld.module_name(f.rel))
            if outline.strip():
                name = f"{ld.module_name(f.rel)} (docstrings)"
                by_source["docstrings"].append(ld.piece("docstrings", f.group, name, outline))
    missing = [f"{name} {path}" for name, path in (("stdlib", args.stdlib), ("man", args.man),
                                                   ("info", args.info), ("doc", args.doc))
               if name in args.sources and not Path(path).is_dir()]
    for m in missing:
        log(f"skipping {m}: no such folder")
    report = {"missing_folders": missing, "groups_over_budget": left_out,
              "haystack_excluded": excluded,
              "haystack_shared_lines_below_threshold": near,
              "skipped": {s: dict(c) for s, c in skipped.items() if c},
              "truncated_files": {s: n for s, n in truncated.items() if n},
              "user_excludes": list(args.exclude)}
    for s in SOURCES:
        ps = by_source[s]
        if s in args.sources:
            log(f"{s:>10s}: {len(ps):5d} files, {sum(len(p.text) for p in ps) / 1e6:6.1f}M chars"
                f"{'; skipped ' + str(dict(skipped[s])) if skipped[s] else ''}")
    log(f"haystack: excluded {len(excluded)} files "
        f"({', '.join(e['file'] for e in excluded[:8])}{' ...' if len(excluded) > 8 else ''})")
    return [p for s in SOURCES for p in by_source[s]], report


# ---------------------------------------------------------------------------- tokens

class TokenCounter:
    """Token counts (no special tokens) with the bundled SmolLM2 tokenizer, batched."""

    def __init__(self) -> None:
        self.tok = Tokenizer.from_gguf(bundled_gguf_path(TOKENIZER))
        backend = self.tok.backend
        self._encode = getattr(backend, "encode_batch_fast", backend.encode_batch)

    def __call__(self, texts: list[str], batch_chars: int = 4_000_000) -> list[int]:
        out: list[int] = []
        start = 0
        while start < len(texts):
            end, size = start, 0
            while end < len(texts) and (end == start or size < batch_chars):
                size += len(texts[end])
                end += 1
            out += [len(e.ids) for e in self._encode(texts[start:end], add_special_tokens=False)]
            start = end
        return out


def fit_pieces(pieces: list[ld.Piece], count: TokenCounter, max_tokens: int
               ) -> tuple[list[ld.Piece], list[int]]:
    """Token counts of the pieces; a piece over half of ``max_tokens`` is cut at line ends
    (and counted again) until every part fits, so parts of a large group can be balanced."""
    limit = max_tokens // 2
    counts = count([p.text for p in pieces])
    while any(c > limit for c in counts):
        out_p, out_c, redo = [], [], []
        for p, c in zip(pieces, counts):
            if c > limit:
                parts = ld.split_piece(p, math.ceil(c / (0.9 * limit)))
                redo += range(len(out_p), len(out_p) + len(parts))
                out_p += parts
                out_c += [0] * len(parts)
            else:
                out_p.append(p)
                out_c.append(c)
        for i, c in zip(redo, count([out_p[i].text for i in redo])):
            out_c[i] = c
        pieces, counts = out_p, out_c
    return pieces, counts


def check_additive(docs: list[Doc], pieces: list[ld.Piece], count: TokenCounter) -> int:
    """Re-tokenize a few whole documents (the shortest of each source) and compare with the
    sum of their pieces' counts; raise if they differ. Returns how many were checked."""
    sample = {}
    for d in sorted(docs, key=lambda d: d.tokens):
        sample.setdefault(d.source, d)
    sample_docs = list(sample.values())
    got = count([d.text(pieces) for d in sample_docs])
    for d, n in zip(sample_docs, got):
        if n != d.tokens:
            raise SystemExit(f"error: {d.id}: {n} tokens as a whole, {d.tokens} as pieces; "
                             f"piece token counts must add up (jaxprefill/data/longdocs.py)")
    return len(sample_docs)


# ---------------------------------------------------------------------------- synthetic

def synthetic_rows(args, docs: list[Doc], pieces: list[ld.Piece], count: TokenCounter,
                   n: int) -> list[dict]:
    """``n`` retrieval rows, each from a window of a train document (seeded per row), of a
    uniform length in [--synthetic-min-tokens, --synthetic-max-tokens] (at most the
    document's). The rows draw from --synthetic-seed (default --seed), so a continued run
    can train on fresh retrieval rows over the same documents and validation split."""
    seed = args.seed if args.synthetic_seed is None else args.synthetic_seed
    prefix = "synthetic" if seed == args.seed else f"synthetic-{seed}"
    pool = [d for d in docs if d.tokens >= args.synthetic_min_tokens]
    if n and not pool:
        raise SystemExit(f"error: --synthetic-frac: no train document has "
                         f"--synthetic-min-tokens={args.synthetic_min_tokens} tokens")
    plans = []
    for i in range(n):
        rng = random.Random(f"longctx-synthetic/{seed}/{i}")
        d = rng.choice(pool)
        goal = rng.uniform(args.synthetic_min_tokens, args.synthetic_max_tokens)
        plans.append([d, goal, rng.random(), 0.97])
    rows: list[dict | None] = [None] * n
    todo = list(range(n))
    while todo:
        texts = {}
        for i in todo:
            d, goal, where, shrink = plans[i]
            text = d.text(pieces)
            width = int(min(goal, d.tokens) * shrink * len(text) / d.tokens)
            start = int(where * max(0, len(text) - width))
            start = text.rfind("\n", 0, start) + 1
            lines = text[start:start + width].split("\n")[:-1] or [text[start:start + width]]
            row, meta = retrieval_row(lines, random.Random(f"longctx-facts/{seed}/{i}"),
                                      depth=tuple(args.synthetic_depth),
                                      families=tuple(args.synthetic_families))
            texts[i] = (row, meta, d.id)
        got = count([texts[i][0] for i in todo])
        nxt = []
        for i, tokens in zip(todo, got):
            row, meta, base = texts[i]
            if tokens > args.synthetic_max_tokens:
                plans[i][3] *= 0.95 * args.synthetic_max_tokens / tokens
                nxt.append(i)
                continue
            rows[i] = {"id": f"{prefix}/{i:05d}", "source": "synthetic", "text": row,
                       "tokens": tokens, "base": base, **meta}
        todo = nxt
    return [r for r in rows if r is not None]


# ---------------------------------------------------------------------------- output

def write_atomic(files: dict[Path, bytes]) -> None:
    """Write every file to a temporary sibling, fsync, then rename them all into place."""
    temps = {}
    umask = os.umask(0)
    os.umask(umask)
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps[path] = tmp
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


def jsonl(rows: list[dict]) -> bytes:
    """One {"id", "source", "text"} line per row, plus "loss_spans" (the answers' characters)
    for synthetic rows (the trainer weighs them with data.span_weight)."""
    def line(r: dict) -> dict:
        out = {"id": r["id"], "source": r["source"], "text": r["text"]}
        if "answer_spans" in r:
            out["loss_spans"] = r["answer_spans"]
        return out
    return "".join(json.dumps(line(r), ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def reach(tokens: list[int]) -> dict[str, int]:
    return {f">={t}": sum(n >= t for n in tokens) for t in THRESHOLDS}


def doc_entry(d: Doc, pieces: list[ld.Piece], split: str) -> dict:
    files = [pieces[i].rel for i in d.pieces]
    return {"id": d.id, "split": split, "source": d.source, "groups": d.groups,
            "tokens": d.tokens, "chars": d.chars, "files": list(dict.fromkeys(files)),
            "truncated_files": sum(pieces[i].truncated for i in d.pieces)}


def build(args, log: Log | None = None, guards: tuple | None = None) -> dict:
    """The whole build (see the module docstring); returns the manifest. ``guards``: (guard,
    its manifest entry, phrases, their manifest entry) instead of the evaluation's own
    (:func:`haystack_guard`, :func:`task_phrases`), for tests."""
    log = log or Log(quiet=True)
    guard, hay_info, phrases, phrase_info = guards or (*haystack_guard(), *task_phrases())
    log(f"guards: {hay_info['documents']} haystack documents, {len(phrases)} task wordings")
    pieces, report = collect(args, guard, log)
    out = Path(args.out)
    base = {"builder": "scripts/tools/build_longctx_data.py",
            "python": platform.python_version(), "platform": platform.platform(),
            "stdlib": str(args.stdlib), "options": {k: v for k, v in vars(args).items()},
            "haystack": hay_info, "task_templates": phrase_info, "exclusions": report}
    if args.list_only:
        base["files"] = [{"source": p.source, "group": p.group, "file": p.rel,
                          "chars": len(p.text)} for p in pieces]
        write_atomic({out / "sources.json": json.dumps(base, indent=1).encode()})
        log(f"wrote {out / 'sources.json'} ({len(pieces)} files, no tokenization)")
        return base
    count = TokenCounter()
    log(f"tokenizing {sum(len(p.text) for p in pieces) / 1e6:.1f}M chars in {len(pieces)} pieces")
    pieces, counts = fit_pieces(pieces, count, args.max_tokens)
    docs, dropped = assemble(pieces, counts, min_tokens=args.min_tokens,
                             target=args.target_tokens, max_tokens=args.max_tokens)
    if not docs:
        raise SystemExit(f"error: no document reaches --min-tokens={args.min_tokens} "
                         f"(sources {args.sources})")
    checked = check_additive(docs, pieces, count)
    log(f"{len(docs)} documents, {sum(counts) / 1e6:.1f}M tokens "
        f"({len(dropped)} below --min-tokens dropped); token sums checked on {checked}")
    train_i, val_i, overlap_i = pick_validation(docs, args.val_docs, args.target_tokens,
                                                args.seed)
    train = [docs[i] for i in train_i]
    rows = {"train": [{"id": d.id, "source": d.source, "text": d.text(pieces)} for d in train],
            "validation": [{"id": docs[i].id, "source": docs[i].source,
                            "text": docs[i].text(pieces)} for i in val_i]}
    frac = args.synthetic_frac
    n_syn = round(frac / (1 - frac) * len(train))
    synth = synthetic_rows(args, train, pieces, count, n_syn)
    if synth:
        log(f"{len(synth)} synthetic retrieval rows, "
            f"{sum(r['tokens'] for r in synth) / 1e6:.2f}M tokens")
    rows["train"] += synth
    random.Random(f"longctx-order/{args.seed}").shuffle(rows["train"])
    texts = [(r["id"], r["text"]) for split in rows.values() for r in split]
    hits = find_phrases(texts, phrases)
    if hits:
        shown = "; ".join(f"{name}: {phrase!r}" for name, phrase in hits[:5])
        raise SystemExit(f"error: {len(hits)} evaluation task wording(s) in the built text "
                         f"({shown}); leave those files out with --exclude PATTERN")
    leaked = [n for n, t in texts if sha256(t) in guard.hashes]
    if leaked:
        raise SystemExit(f"error: documents equal to haystack documents: {leaked[:5]}")
    log(f"checked {len(texts)} rows: no task wording, no haystack text")
    data = {out / f"{split}.jsonl": jsonl(r) for split, r in rows.items()}
    split_of = {**{i: "train" for i in train_i}, **{i: "validation" for i in val_i}}
    tokens = {"train": [d.tokens for d in train] + [r["tokens"] for r in synth],
              "validation": [docs[i].tokens for i in val_i]}
    manifest = {
        **base,
        "tokenizer": {"name": TOKENIZER, "gguf": bundled_gguf_path(TOKENIZER).name,
                      "special_tokens": "none counted (the trainer adds EOS / BOS)"},
        "totals": {split: {"rows": len(tokens[split]), "tokens": sum(tokens[split]),
                           "chars": sum(len(r["text"]) for r in rows[split]),
                           "reach": reach(tokens[split])} for split in rows},
        "real_documents": {"count": len(docs), "tokens": sum(d.tokens for d in docs),
                           "reach": reach([d.tokens for d in docs]),
                           "by_source": {s: {"documents": sum(d.source == s for d in docs),
                                             "tokens": sum(d.tokens for d in docs
                                                           if d.source == s),
                                             "reach": reach([d.tokens for d in docs
                                                             if d.source == s])}
                                         for s in SOURCES if any(d.source == s for d in docs)}},
        "documents": [doc_entry(docs[i], pieces, split_of[i]) for i in sorted(split_of)],
        "dropped_below_min_tokens": [{"id": d.id, "tokens": d.tokens} for d in dropped],
        "dropped_sharing_text_with_validation": [docs[i].id for i in overlap_i],
        "synthetic": {"fraction": frac, "depth": list(args.synthetic_depth),
                      "families": list(args.synthetic_families),
                      "rows": [{k: v for k, v in r.items() if k != "text"} for r in synth]},
        "outputs": {p.name: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)}
                    for p, b in data.items()},
    }
    data[out / "manifest.json"] = json.dumps(manifest, indent=1, ensure_ascii=False).encode()
    write_atomic(data)
    for split in rows:
        t = manifest["totals"][split]
        log(f"wrote {out / (split + '.jsonl')}: {t['rows']} rows, {t['tokens'] / 1e6:.2f}M "
            f"tokens, {manifest['outputs'][split + '.jsonl']['bytes'] / 1e6:.1f} MB; "
            f"reach {t['reach']}")
    log(f"real documents reach {manifest['real_documents']['reach']} "
        f"(of {len(docs)}); manifest {out / 'manifest.json'}")
    return manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Details: docs/training.md (long-context data).")
    p.add_argument("--out", default="data/longctx", help="output folder")
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    p.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"])
    p.add_argument("--man", default="/usr/share/man")
    p.add_argument("--info", default="/usr/share/info")
    p.add_argument("--doc", default="/usr/share/doc")
    p.add_argument("--min-tokens", type=int, default=8192, help="drop shorter documents")
    p.add_argument("--target-tokens", type=int, default=32768,
                   help="bundle small groups up to this; validation documents reach it")
    p.add_argument("--max-tokens", type=int, default=131072,
                   help="cut larger groups into parts (32767 for one document per 32K row)")
    p.add_argument("--max-file-chars", type=int, default=150_000,
                   help="keep the head of longer /usr/share/doc files (changelogs: newest "
                        "first)")
    p.add_argument("--max-group-chars", type=int, default=1_000_000,
                   help="stop taking files of a /usr/share group (a man-page family, a "
                        "package's docs) past this")
    p.add_argument("--source-chars", action="append", default=[], metavar="SOURCE=CHARS",
                   help="budget of a source's text (default "
                        + " ".join(f"{k}={v}" for k, v in BUDGETS.items())
                        + "; 'none' for no limit); whole groups are sampled to fit")
    p.add_argument("--val-docs", type=int, default=6)
    # Retrieval over the whole extended window: rows of 16K-30K tokens with facts at uniform
    # depth put a fact anywhere from 0 to ~30K tokens before its question (rows of 2K-30K
    # left few facts more than 20K tokens back, and a 32K model trained on them could not
    # retrieve from there).
    p.add_argument("--synthetic-frac", type=float, default=0.3,
                   help="share of the train rows that are synthetic retrieval rows, in [0, 1)")
    p.add_argument("--synthetic-min-tokens", type=int, default=16384)
    p.add_argument("--synthetic-max-tokens", type=int, default=30720,
                   help="at most this many tokens a row, so a 32K training row holds one")
    p.add_argument("--synthetic-depth", type=float, nargs=2, default=[0.0, 1.0],
                   metavar=("LO", "HI"), help="facts lie between these fractions of a "
                   "synthetic row (0 = its start, far from the question; default 0 1)")
    p.add_argument("--synthetic-families", nargs="+", default=list(FAMILIES),
                   choices=ALL_FAMILIES, metavar="FAMILY",
                   help="the families a synthetic row is drawn from, uniformly over the list "
                        "(a name given twice is drawn twice as often); default the six keyed "
                        f"ones; all: {' '.join(ALL_FAMILIES)} (jaxprefill/data/longdocs_synth.py)")
    p.add_argument("--synthetic-seed", type=int, default=None,
                   help="seed of the synthetic rows alone (default --seed): other rows, "
                        "same documents and validation split")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="leave out files whose shown path (Lib/..., man/..., doc/..., "
                        "info/...) matches this glob; repeatable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list-only", action="store_true",
                   help="walk, read and filter only: write sources.json, no tokenization")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if not 0 <= args.synthetic_frac < 1:
        p.error(f"--synthetic-frac must be in [0, 1), got {args.synthetic_frac}")
    if not 0 < args.min_tokens <= args.target_tokens <= args.max_tokens:
        p.error(f"need 0 < --min-tokens ({args.min_tokens}) <= --target-tokens "
                f"({args.target_tokens}) <= --max-tokens ({args.max_tokens})")
    lo, hi = args.synthetic_depth
    if not 0 <= lo <= hi <= 1:
        p.error(f"--synthetic-depth needs 0 <= LO <= HI <= 1, got {lo} {hi}")
    if not 0 < args.synthetic_min_tokens <= args.synthetic_max_tokens:
        p.error(f"need 0 < --synthetic-min-tokens ({args.synthetic_min_tokens}) <= "
                f"--synthetic-max-tokens ({args.synthetic_max_tokens})")
    if args.val_docs < 0 or args.max_file_chars < 1 or args.max_group_chars < 1:
        p.error("--val-docs must be >= 0 and --max-file-chars, --max-group-chars >= 1")
    args.budgets = dict(BUDGETS)
    for item in args.source_chars:
        name, _, value = item.partition("=")
        if name not in SOURCES or not (value == "none" or value.isdigit()):
            p.error(f"--source-chars {item!r}: expected SOURCE=CHARS or SOURCE=none with "
                    f"SOURCE in {SOURCES}")
        args.budgets[name] = None if value == "none" else int(value)
    args.budgets = {k: v for k, v in args.budgets.items() if v is not None}
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file, not a folder")
    # the folder is made at the end of a long build: one that cannot be made fails now
    out = Path(args.out).absolute()
    above = next(a for a in (out, *out.parents) if a.exists())
    if not above.is_dir() or not os.access(above, os.W_OK | os.X_OK):
        p.error(f"--out {args.out}: cannot make a folder in {above}")
    # a missing folder is skipped (a machine may lack /usr/share/info); all of them missing is
    # a mistake that would otherwise end the build with "no document reaches --min-tokens"
    flags = {"stdlib" if s == "docstrings" else s for s in args.sources}
    if not any(Path(getattr(args, flag)).is_dir() for flag in flags):
        p.error("no source folder exists: " + ", ".join(
            f"--{flag} {getattr(args, flag)}" for flag in sorted(flags)))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    build(args, Log(args.quiet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
