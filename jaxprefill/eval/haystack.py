"""Haystack text of the evaluation: committed documents, disjoint `dev` / `test` splits.

The documents live in ``jaxprefill/assets/eval_haystacks.json.gz``, built once by
``scripts/tools/build_eval_haystacks.py`` from CPython's own text (PSF License; each document
records its source and the sha256 of its text). Two kinds:

* ``code``: whole standard-library modules;
* ``prose``: the Python Language Reference topics (plain text) and IDLE's release notes.

Splits: defaults are tuned on ``dev`` and reported on ``test``. The splits share no document
(tested) and no sample seed: sample ``i`` of a split uses seed ``SEED_BASE[split] + i``.
:func:`test_documents` lists the test documents (name, source, sha256) so a training-data
builder can leave them out.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import random
import re
from importlib import resources

from jaxprefill.validate import InputError

SPLITS = ("dev", "test")
KINDS = ("code", "prose")
ASSET = "assets/eval_haystacks.json.gz"
# Seeds of sample i: SEED_BASE[split] + i, i < MAX_SAMPLES, so no seed is in both splits.
SEED_BASE = {"dev": 0, "test": 1_000_000}
MAX_SAMPLES = 1_000_000


@dataclasses.dataclass(frozen=True)
class Document:
    """One haystack document: ``name`` (unique), kind, split, ``source`` (where the text came
    from), ``source_path`` (path inside CPython's Lib/), ``sha256`` of ``text``."""

    name: str
    kind: str
    split: str
    source: str
    source_path: str
    sha256: str
    text: str


@functools.lru_cache(maxsize=1)
def _asset_bytes() -> bytes:
    try:
        return resources.files("jaxprefill").joinpath(ASSET).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"haystack asset jaxprefill/{ASSET} is missing; rebuild it "
                                f"with scripts/tools/build_eval_haystacks.py") from None


@functools.lru_cache(maxsize=1)
def _asset() -> dict:
    return json.loads(gzip.decompress(_asset_bytes()).decode("utf-8"))


def asset_sha256() -> str:
    """sha256 of the compressed asset file (answers depend on it: recorded per run)."""
    return hashlib.sha256(_asset_bytes()).hexdigest()


def _check(split: str, kind: str | None = None) -> None:
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {SPLITS}")
    if kind is not None and kind not in KINDS:
        raise InputError(f"unknown haystack kind {kind!r}; choose one of {KINDS}")


@functools.lru_cache(maxsize=None)
def documents(split: str, kind: str | None = None) -> tuple[Document, ...]:
    """The documents of ``split`` (and ``kind``, if given), in the asset's order."""
    _check(split, kind)
    fields = [f.name for f in dataclasses.fields(Document)]
    return tuple(Document(**{k: d[k] for k in fields}) for d in _asset()["documents"]
                 if d["split"] == split and (kind is None or d["kind"] == kind))


def test_documents() -> list[dict]:
    """The test split's documents without their text: [{"name", "kind", "source",
    "source_path", "sha256"}]. A training-data builder excludes these (by ``source_path`` for
    files of another CPython version, by ``sha256`` of identical text)."""
    return [{"name": d.name, "kind": d.kind, "source": d.source, "source_path": d.source_path,
             "sha256": d.sha256} for d in documents("test")]


def license_text() -> str:
    """The PSF license the haystack text is distributed under."""
    return _asset()["license_text"]


def split_seed(split: str, index: int) -> int:
    """Seed of sample ``index`` (0-based) of ``split``; disjoint ranges per split."""
    _check(split)
    if not 0 <= index < MAX_SAMPLES:
        raise InputError(f"sample index must be in [0, {MAX_SAMPLES}), got {index}")
    return SEED_BASE[split] + index


def haystack_lines(split: str, kind: str, seed: int) -> list[str]:
    """Lines of the split's ``kind`` documents, in a seed-shuffled document order, rotated to
    a seed-chosen start line (a cyclic stream: every sample starts somewhere else). Code keeps
    non-empty lines only; prose keeps blank lines (paragraph breaks)."""
    docs = list(documents(split, kind))
    if not docs:
        raise InputError(f"no {kind} documents in the {split} split of jaxprefill/{ASSET}")
    rng = random.Random(f"haystack/{split}/{kind}/{seed}")
    rng.shuffle(docs)
    lines: list[str] = []
    for d in docs:
        part = d.text.split("\n")
        lines += [ln for ln in part if ln.strip()] if kind == "code" else part + [""]
    start = rng.randrange(len(lines))
    return lines[start:] + lines[:start]


@functools.lru_cache(maxsize=None)
def vocabulary(split: str) -> tuple[str, ...]:
    """Distinct lower-case words (4-10 letters) of the split's prose, sorted: the word pool of
    the common-words task."""
    words = set()
    for d in documents(split, "prose"):
        words.update(w.lower() for w in re.findall(r"\b[A-Za-z]{4,10}\b", d.text))
    return tuple(sorted(words))
