"""Pieces (files with headers, token counts known) -> long documents, and the validation pick.

:func:`assemble` keeps each group (stdlib package, man-page family, info manual, package doc
folder) whole and in file order where it fits, so a document has long-range structure:

* a group of ``target`` to ``max_tokens`` tokens is one document;
* a larger group is cut at file boundaries into ``ceil(T / max_tokens)`` parts of about equal
  size (files larger than ``max_tokens`` were cut at line ends beforehand);
* smaller groups of the same source are bundled in walk order until a bundle reaches
  ``target`` (without passing ``max_tokens``);
* what stays below ``min_tokens`` (the last bundle of a source, a short last part) is dropped.

A document's token count is the sum of its pieces' counts (see :mod:`jaxprefill.data.longdocs`
for why that is exact).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence

from jaxprefill.data.longdocs import Piece


@dataclasses.dataclass
class Doc:
    """One output document: ``pieces`` (indices, in order), exact ``tokens``, ``chars``."""

    id: str
    source: str
    groups: list[str]
    pieces: list[int]
    tokens: int
    chars: int

    def text(self, pieces: Sequence[Piece]) -> str:
        return "".join(pieces[i].text for i in self.pieces)


def assemble(pieces: Sequence[Piece], counts: Sequence[int], *, min_tokens: int, target: int,
             max_tokens: int) -> tuple[list[Doc], list[Doc]]:
    """(documents, dropped documents below ``min_tokens``); see the module docstring.
    ``pieces`` come grouped: all pieces of a (source, group) are consecutive."""
    if any(c > max_tokens for c in counts):
        raise ValueError("assemble: a piece exceeds max_tokens; split it first")
    groups: list[tuple[str, str, list[int]]] = []
    for i, p in enumerate(pieces):
        if groups and groups[-1][:2] == (p.source, p.group):
            groups[-1][2].append(i)
        else:
            groups.append((p.source, p.group, [i]))
    docs: list[Doc] = []
    bundle: list[tuple[str, list[int]]] = []

    def make(source: str, names: list[str], idx: list[int], suffix: str = "") -> Doc:
        name = names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"
        return Doc(f"{source}/{name}{suffix}", source, names, idx,
                   sum(counts[i] for i in idx), sum(len(pieces[i].text) for i in idx))

    def flush(source: str) -> None:
        if bundle:
            docs.append(make(source, [g for g, _ in bundle], [i for _, ix in bundle for i in ix]))
            bundle.clear()

    for n, (source, group, idx) in enumerate(groups):
        total = sum(counts[i] for i in idx)
        if total > max_tokens:
            k = math.ceil(total / max_tokens)
            goal = total / k
            parts: list[list[int]] = [[]]
            size = 0
            for i in idx:
                if parts[-1] and (size + counts[i] > max_tokens or size >= goal):
                    parts.append([])
                    size = 0
                parts[-1].append(i)
                size += counts[i]
            for j, part in enumerate(parts):
                docs.append(make(source, [group], part, f"#part{j + 1}of{len(parts)}"))
        elif total >= target:
            docs.append(make(source, [group], idx))
        else:
            if bundle and sum(counts[i] for _, ix in bundle for i in ix) + total > max_tokens:
                flush(source)
            bundle.append((group, idx))
            if sum(counts[i] for _, ix in bundle for i in ix) >= target:
                flush(source)
        if n + 1 == len(groups) or groups[n + 1][0] != source:
            flush(source)
    keep = [d for d in docs if d.tokens >= min_tokens]
    return keep, [d for d in docs if d.tokens < min_tokens]


def split_key(source: str, group: str) -> tuple[str, str]:
    """Documents with the same key share text: a package's code and its docstrings."""
    return ("stdlib" if source == "docstrings" else source, group.split("#")[0])


def pick_validation(docs: Sequence[Doc], n: int, min_tokens: int,
                    seed: int) -> tuple[list[int], list[int], list[int]]:
    """(train, validation, dropped) indices into ``docs``.

    Validation: about ``n`` documents of at least ``min_tokens`` tokens (the longest if fewer
    reach it), whole groups (a group's parts stay together) that fit the remaining count,
    picked with a seeded shuffle, one source at a time in turn, so code and prose both
    appear; docstring outlines (copies of code text) are never picked. A train document
    sharing text with a validation one (:func:`split_key`: the docstrings of a validation
    package) is dropped."""
    keys = [{split_key(d.source, g) for g in d.groups} for d in docs]
    units: dict[tuple[str, frozenset], list[int]] = {}
    for i, d in enumerate(docs):
        units.setdefault((d.source, frozenset(keys[i])), []).append(i)
    candidates = [u for u in units.values() if docs[u[0]].source != "docstrings"]
    long_enough = [u for u in candidates if all(docs[i].tokens >= min_tokens for i in u)]
    if sum(map(len, long_enough)) < n:
        long_enough = sorted(candidates, key=lambda u: -min(docs[i].tokens for i in u))
    rng = random.Random(f"longctx-validation/{seed}")
    by_source: dict[str, list[list[int]]] = {}
    for u in long_enough:
        by_source.setdefault(docs[u[0]].source, []).append(u)
    for pool in by_source.values():
        rng.shuffle(pool)
    val: list[int] = []
    progress = True
    while len(val) < n and progress:
        progress = False
        for s in sorted(by_source):
            fits = [u for u in by_source[s] if len(u) <= n - len(val)]
            if fits:
                by_source[s].remove(fits[0])
                val += fits[0]
                progress = True
    val_keys = set().union(*(keys[i] for i in val))
    chosen = set(val)
    dropped = [i for i in range(len(docs)) if i not in chosen and keys[i] & val_keys]
    train = [i for i in range(len(docs)) if i not in chosen and i not in dropped]
    return train, sorted(val), dropped
