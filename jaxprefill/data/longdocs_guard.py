"""Keeping evaluation text out of training data: haystack documents and task wordings.

* :class:`HaystackGuard` rejects a training file that is, or was copied from, an evaluation
  haystack document: by its path inside CPython's ``Lib/`` (the same module of another Python
  version has other bytes), by the sha256 of its text, and by shared lines (a file whose long
  lines are largely haystack lines: a moved module such as 3.12's ``_pydatetime.py``, a
  packaged copy of IDLE's NEWS).
* :func:`template_phrases` reads the fixed wordings out of a task module's source (string
  literals and f-strings; placeholders split them into fragments) and :func:`find_phrases`
  searches built text for them, case and punctuation insensitive.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterable, Sequence

# A line shorter than this is too common ("return None", "else:") to say where text came from.
LINE_MIN_CHARS = 40


def long_lines(text: str) -> set[str]:
    """Distinct stripped lines of at least LINE_MIN_CHARS characters."""
    return {ln for ln in map(str.strip, text.split("\n")) if len(ln) >= LINE_MIN_CHARS}


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclasses.dataclass
class Verdict:
    """What the guard says about one file: ``excluded`` (the reason) or the ``text`` to use
    (prose: paragraphs holding a haystack line removed, ``scrubbed`` of them); ``shared``:
    how many of its long lines are haystack lines."""

    excluded: str | None
    text: str
    shared: int = 0
    scrubbed: int = 0


class HaystackGuard:
    """Decides whether a training file may be used, given the evaluation's haystack documents.

    ``docs``: dicts with ``name``, ``source_path`` (inside ``Lib/``), ``sha256`` and ``text``
    (``text`` may be absent: then only paths and hashes are checked). ``clean``: the haystack
    builder's text normalization, applied to code before hashing so identical files match.
    A file is excluded when at least ``min_lines`` of its long lines are haystack lines and
    they make up at least ``min_fraction`` of its long lines (a copy or a moved module). Below
    that, prose loses the paragraphs that hold a haystack line (a changelog that repeats
    IDLE's NEWS entries); code keeps them (shared lines there are idioms such as
    ``def __exit__(self, type, value, traceback):``), and the count is reported.
    """

    def __init__(self, docs: Sequence[dict], clean: Callable[[str], str] = lambda t: t,
                 min_lines: int = 10, min_fraction: float = 0.2) -> None:
        self.paths = {d["source_path"]: d["name"] for d in docs}
        self.hashes = {d["sha256"]: d["name"] for d in docs}
        self.lines: dict[str, str] = {}
        for d in docs:
            for ln in long_lines(d.get("text", "")):
                self.lines.setdefault(ln, d["name"])
        self.clean = clean
        self.min_lines = min_lines
        self.min_fraction = min_fraction

    def check_path(self, lib_rel: str) -> str | None:
        """Why the stdlib file at ``lib_rel`` (relative to ``Lib/``) is excluded, or None."""
        name = self.paths.get(lib_rel)
        return f"haystack source path ({name})" if name else None

    def check_text(self, text: str, prose: bool) -> Verdict:
        """The verdict on a file with this normalized ``text`` (see the class docstring)."""
        for t in (text, text + "\n") if prose else (text, text + "\n", self.clean(text)):
            name = self.hashes.get(sha256(t))
            if name:
                return Verdict(f"haystack text hash ({name})", "")
        mine = long_lines(text)
        shared = {ln for ln in mine if ln in self.lines}
        if len(shared) >= self.min_lines and len(shared) >= self.min_fraction * len(mine):
            names = sorted({self.lines[ln] for ln in shared})
            return Verdict(f"haystack lines: {len(shared)} of {len(mine)} long lines are in "
                           f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''}", "",
                           len(shared))
        if not shared or not prose:
            return Verdict(None, text, len(shared))
        blocks = re.split(r"\n\s*\n", text)
        keep = [b for b in blocks if not any(ln.strip() in shared for ln in b.split("\n"))]
        return Verdict(None, "\n\n".join(keep), len(shared), len(blocks) - len(keep))


# ---------------------------------------------------------------------------- task wordings

_BLANKED = b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~\t\n\r\x0b\x0c"
_TO_BLANK = bytes.maketrans(_BLANKED, b" " * len(_BLANKED))


def search_form(text: str) -> bytes:
    """UTF-8 bytes in lower case, ASCII punctuation as blanks, whitespace collapsed, padded
    with one blank: the form both phrases and built text are compared in (bytes: the
    translation runs at memory speed on ~100 MB of text)."""
    return b" " + b" ".join(text.lower().encode("utf-8").translate(_TO_BLANK).split()) + b" "


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def template_phrases(source: str, min_words: int = 4) -> list[str]:
    """Fixed wordings of a task module: every string literal and f-string outside docstrings
    and ``raise`` statements, cut at placeholders (``{x}`` of ``str.format`` templates,
    ``{...}`` of f-strings); each fragment and each of its sentences of at least ``min_words``
    words, in search form
    (:func:`search_form`, stripped), sorted and unique."""
    tree = ast.parse(source)
    skip = _docstring_nodes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise):
            skip.update(id(n) for n in ast.walk(node))
    fragments: list[str] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
            parts = [v.value for v in node.values
                     if isinstance(v, ast.Constant) and isinstance(v.value, str)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            parts = [node.value]
        else:
            continue
        for part in parts:
            for frag in re.split(r"\{[^{}]*\}", part):
                fragments += [frag, *re.split(r"(?<=[.?!:;])\s+", frag)]  # and its sentences
    phrases = {search_form(f).decode("utf-8").strip() for f in fragments}
    return sorted(p for p in phrases if len(p.split()) >= min_words)


def find_phrases(texts: Iterable[tuple[str, str]], phrases: Sequence[str]) -> list[tuple[str, str]]:
    """(name, phrase) for every text that contains a phrase (whole words, in search form)."""
    hits = []
    padded = [search_form(p) for p in phrases]
    for name, text in texts:
        form = search_form(text)
        hits += [(name, p.decode("utf-8").strip()) for p in padded if p in form]
    return hits
