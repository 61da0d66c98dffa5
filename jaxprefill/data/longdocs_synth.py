"""Synthetic retrieval rows: real text with a few facts inserted and questions at the end,
each answered right after it, so the language-model loss on the answer teaches retrieval over
long distances.

The wordings are this module's own and differ from every evaluation task of
:mod:`jaxprefill.eval.tasks` (other nouns, verbs and formats: no pass keys, magic numbers,
variables, word lists or invented people; the builder fails if a task phrase appears). Six
families (``FAMILIES``, the default draw); a row uses one, with 3-6 facts of the same form
(the others act as distractors) and 1-2 questions:

* ``locker``: ``Locker 317 at the depot contains a teal compass.`` /
  ``What is inside locker 317 at the depot?`` -> ``a teal compass``
* ``ledger``: ``Ledger entry W5P-592 records 57 crates shipped to Orvane.`` /
  ``How many crates does ledger entry W5P-592 record?`` -> ``57``
* ``ferry``: ``The ochre ferry leaves pier 6 at 14:35.`` /
  ``When does the ochre ferry leave?`` -> ``14:35``
* ``registry`` (code-like): ``ARCHIVE_CODES["lintel"] = "T7K-902"`` /
  ``ARCHIVE_CODES["lintel"]?`` -> ``"T7K-902"``
* ``drawer`` (several answers): ``Drawer lintel holds index card 4471.`` three times with
  different cards, plus other drawers / ``Which index cards are in drawer lintel?`` ->
  ``4471, 1809, 5532`` (text order)
* ``forward`` (multi-hop): ``Mail for box 12 is forwarded to box 85.``, ``... box 85 ... box
  40.`` ... / ``Where does mail for box 12 end up after all forwarding?`` -> ``box 40``

and one drawn only when named (``ALL_FAMILIES``; ``build_longctx_data --synthetic-families``):

* ``single``: one fact and nothing like it in the row, asked for by a generic name, not a
  distinct key: ``East annex door code: 58213.`` / ``Give the east annex door code.`` ->
  ``58213``. Retrieval by a common phrase (the other families key every question with a rare
  word or code) over long distances.

Question formats (one per row): ``Q: ... / A: ...``, ``Question: ... / Response: ...``,
``>>> query: ... / ... -> answer``.
"""

from __future__ import annotations

import dataclasses
import random

FAMILIES = ("locker", "ledger", "ferry", "registry", "drawer", "forward")
ALL_FAMILIES = FAMILIES + ("single",)
_COLORS = ("teal", "crimson", "ochre", "indigo", "ivory", "slate", "mauve", "olive", "scarlet",
           "beige", "navy", "lilac", "maroon", "silver")
_ITEMS = ("compass", "telescope", "kettle", "violin", "music box", "chessboard", "typewriter",
          "barometer", "teapot", "sextant", "hourglass", "metronome", "abacus", "gramophone")
_NOUNS = ("lintel", "gable", "trellis", "plinth", "corbel", "dormer", "finial", "mullion",
          "soffit", "transom", "cornice", "newel", "parapet", "quoin", "spandrel", "truss")
_PORTS = ("Orvane", "Kestrel Bay", "Dunmore", "Halvik", "Port Ashby", "Selwyn", "Brackwater",
          "Tollund", "Marrow Point", "Vesk")
# single: (what the number is, where it belongs); the question names both, nothing else
_SINGLE_THINGS = ("door code", "access number", "safe combination", "shipping reference",
                  "order number", "gate code", "account number", "ticket number")
_SINGLE_PLACES = ("east annex", "north warehouse", "old boathouse", "main archive",
                  "upper workshop", "river depot", "west gallery", "back office")
_FORMATS = ("Q: {q}\nA: {a}", "Question: {q}\nResponse: {a}", ">>> query: {q}\n... -> {a}")


@dataclasses.dataclass
class Fact:
    """One inserted sentence; ``key`` identifies what a question can ask about."""

    key: str
    sentence: str


@dataclasses.dataclass
class Question:
    """A question, its answer text, and the facts that answer it (indices into the facts)."""

    text: str
    answer: str
    facts: list[int]


def _code(rng: random.Random) -> str:
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    return f"{rng.choice(letters)}{rng.randint(1, 9)}{rng.choice(letters)}-{rng.randint(100, 999)}"


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _family(name: str, rng: random.Random) -> tuple[list[Fact], list[Question]]:
    """Facts (3-6, in insertion order) and the questions one may ask about them."""
    n = rng.randint(3, 6)
    if name == "locker":
        keys = rng.sample(range(100, 1000), n)
        things = [_a(f"{rng.choice(_COLORS)} {rng.choice(_ITEMS)}") for _ in keys]
        facts = [Fact(str(k), f"Locker {k} at the depot contains {t}.")
                 for k, t in zip(keys, things)]
        qs = [Question(f"What is inside locker {k} at the depot?", t, [i])
              for i, (k, t) in enumerate(zip(keys, things))]
    elif name == "ledger":
        keys = list(dict.fromkeys(_code(rng) for _ in range(n)))
        qty = [str(rng.randint(2, 999)) for _ in keys]
        facts = [Fact(k, f"Ledger entry {k} records {q} crates shipped to {rng.choice(_PORTS)}.")
                 for k, q in zip(keys, qty)]
        qs = [Question(f"How many crates does ledger entry {k} record?", q, [i])
              for i, (k, q) in enumerate(zip(keys, qty))]
    elif name == "ferry":
        keys = rng.sample(_COLORS, n)
        times = [f"{rng.randint(5, 23):02d}:{rng.randrange(0, 60, 5):02d}" for _ in keys]
        facts = [Fact(k, f"The {k} ferry leaves pier {rng.randint(1, 12)} at {t}.")
                 for k, t in zip(keys, times)]
        qs = [Question(f"When does the {k} ferry leave?", t, [i])
              for i, (k, t) in enumerate(zip(keys, times))]
    elif name == "registry":
        keys = rng.sample(_NOUNS, n)
        vals = [_code(rng) for _ in keys]
        facts = [Fact(k, f'ARCHIVE_CODES["{k}"] = "{v}"') for k, v in zip(keys, vals)]
        qs = [Question(f'ARCHIVE_CODES["{k}"]?', f'"{v}"', [i])
              for i, (k, v) in enumerate(zip(keys, vals))]
    elif name == "drawer":
        drawers = rng.sample(_NOUNS, 2)
        placed = [(d, c) for d, c in zip([drawers[0]] * 3 + [drawers[1]] * 2,
                                         rng.sample(range(1000, 10000), 5))]
        rng.shuffle(placed)
        facts = [Fact(d, f"Drawer {d} holds index card {c}.") for d, c in placed]
        idx = [i for i, (d, _) in enumerate(placed) if d == drawers[0]]
        qs = [Question(f"Which index cards are in drawer {drawers[0]}?",
                       ", ".join(str(placed[i][1]) for i in idx), idx)]
    elif name == "forward":
        boxes = rng.sample(range(10, 100), 7)
        chain, other = boxes[:4], boxes[4:]
        facts = [Fact(str(a), f"Mail for box {a} is forwarded to box {b}.")
                 for a, b in zip(chain, chain[1:])]
        facts += [Fact(str(a), f"Mail for box {a} is forwarded to box {b}.")
                  for a, b in zip(other, other[1:])]
        rng.shuffle(facts)
        qs = [Question(f"Where does mail for box {chain[0]} end up after all forwarding?",
                       f"box {chain[-1]}",
                       [i for i, f in enumerate(facts) if int(f.key) in chain[:-1]])]
    elif name == "single":
        thing, place = rng.choice(_SINGLE_THINGS), rng.choice(_SINGLE_PLACES)
        digits = rng.randint(4, 6)
        value = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
        facts = [Fact(thing, f"{place.capitalize()} {thing}: {value}.")]
        qs = [Question(f"Give the {place} {thing}.", value, [0])]
    else:
        raise ValueError(f"unknown synthetic family {name!r}; choose one of {ALL_FAMILIES}")
    return facts, qs


def retrieval_row(lines: list[str], rng: random.Random, family: str | None = None,
                  depth: tuple[float, float] = (0.0, 1.0),
                  families: tuple[str, ...] = FAMILIES) -> tuple[str, dict]:
    """``lines`` of real text with facts inserted at random line boundaries (uniform depth in
    ``depth`` = (lo, hi), fractions of the lines, 0 = the start) and 1-2 questions with answers
    appended; returns (text, meta). ``family``: default drawn from ``families`` (a name given
    twice is drawn twice as often). ``meta``: family, format, facts, questions with answers
    and the depth (0..1) of the facts each relies on, and ``answer_spans``: the [start, end)
    characters of each answer in the text, its leading space included (the word boundary a
    tokenizer splits at; see ``data.span_weight``)."""
    lo, hi = depth
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"depth must satisfy 0 <= lo <= hi <= 1, got {depth}")
    family = family or rng.choice(families)
    facts, questions = _family(family, rng)
    first, last = int(lo * len(lines)), int(hi * len(lines))
    slots = sorted(rng.randint(first, last) for _ in facts)
    out: list[str] = []
    where: list[int] = []
    j = 0
    for i in range(len(lines) + 1):
        while j < len(slots) and slots[j] == i:
            where.append(len(out))
            out.append(facts[j].sentence)
            j += 1
        if i < len(lines):
            out.append(lines[i])
    asked = rng.sample(questions, min(len(questions), rng.randint(1, 2)))
    fmt = rng.choice(_FORMATS)
    text = "\n".join(out).rstrip()
    spans = []
    for q in asked:
        text += "\n\n" + fmt.format(q=q.text, a=q.answer)  # every format ends in " {a}"
        spans.append([len(text) - len(q.answer) - 1, len(text)])
    total = max(len(out) - 1, 1)
    meta = {"family": family, "format": fmt.split("{")[0].strip(),
            "facts": [f.sentence for f in facts],
            "questions": [{"question": q.text, "answer": q.answer,
                           "depths": [round(where[i] / total, 4) for i in q.facts]}
                          for q in asked],
            "answer_spans": spans}
    return text, meta
