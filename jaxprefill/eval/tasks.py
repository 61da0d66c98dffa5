"""Synthetic long-context tasks over a haystack of Python standard-library text (no downloads).

RULER-style tasks, generated deterministically from (task, target length, depth, seed):

* ``passkey``: "The pass key is N. Remember it. N is the pass key." (InfiniteBench passkey).
* ``niah_single``: one "special magic number for <key>" needle (RULER niah_single).
* ``niah_multikey``: 4 needles with different keys, ask one (RULER niah_multikey).
* ``niah_multivalue``: 4 numbers for one key, ask all (RULER niah_multivalue; all must appear).
* ``vt``: variable tracking, a 4-hop chain VAR A = N, VAR B = VAR A, ... (RULER vt; all names).

The haystack is the text of stdlib modules (sorted file list, shuffled by seed), trimmed so the
whole chat prompt has about ``length`` tokens. Needles go in at ``depth`` (0 = start, 1 = end),
at a line boundary; extra needles of a task spread around it.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import sysconfig
from pathlib import Path

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "vt")
_WORDS = ("amber", "falcon", "harbor", "lantern", "meadow", "quartz", "saffron", "tundra",
          "velvet", "willow", "cobalt", "ember", "glacier", "juniper", "orchid", "pebble")


@dataclasses.dataclass
class Sample:
    """One prompt: chat messages, the strings a correct answer contains, metadata."""

    task: str
    messages: list[dict]
    answers: list[str]
    length: int
    depth: float
    seed: int

    def score(self, text: str) -> float:
        """1.0 if every answer string occurs in the model's text, else 0.0."""
        return float(all(a in text for a in self.answers))


@functools.lru_cache(maxsize=1)
def stdlib_lines() -> tuple[str, ...]:
    """Non-empty lines of stdlib .py files (deterministic order; ~tens of MB available)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for path in sorted(root.glob("*.py"))[:400]:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        lines.extend(line.rstrip() for line in text.splitlines() if line.strip())
    if len(lines) < 10000:
        raise RuntimeError(f"too little stdlib text under {root} ({len(lines)} lines)")
    return tuple(lines)


def _needles(task: str, rng: random.Random) -> tuple[list[str], str, list[str]]:
    """(needle sentences, question, answer strings)."""
    num = lambda: str(rng.randint(100000, 999999))  # noqa: E731
    if task == "passkey":
        n = str(rng.randint(10000, 99999))
        return ([f"The pass key is {n}. Remember it. {n} is the pass key."],
                "What is the pass key? Answer with the number only.", [n])
    if task in ("niah_single", "niah_multikey"):
        keys = rng.sample(_WORDS, 4 if task == "niah_multikey" else 1)
        vals = [num() for _ in keys]
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, vals)]
        return (needles, f"What is the special magic number for {keys[0]}? Answer with the "
                         f"number only.", [vals[0]])
    if task == "niah_multivalue":
        key, vals = rng.choice(_WORDS), [num() for _ in range(4)]
        needles = [f"One of the special magic numbers for {key} is: {v}." for v in vals]
        return (needles, f"What are all the special magic numbers for {key}? List them.", vals)
    if task == "vt":
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
                 for _ in range(4)]
        val = str(rng.randint(10000, 99999))
        needles = [f"VAR {names[0]} = {val}."] + [f"VAR {b} = VAR {a}." for a, b in
                                                 zip(names, names[1:])]
        return (needles, f"Find all variables that are assigned the value {val}, directly or "
                         f"through other variables. List their names.", names)
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


def make_sample(tokenizer, task: str, length: int, depth: float, seed: int) -> Sample:
    """A prompt of about ``length`` tokens (chat template included) with needles at ``depth``."""
    rng = random.Random(f"{task}/{length}/{depth}/{seed}")
    needles, question, answers = _needles(task, rng)
    lines = list(stdlib_lines())
    start = rng.randrange(0, len(lines) - 20000)
    pool = lines[start:start + 20000]

    def render(hay: list[str]) -> list[dict]:
        body = "\n".join(hay)
        return [{"role": "user", "content": "Below is some Python source text with a hidden "
                 f"fact. Remember it.\n\n{body}\n\n{question}"}]

    def count(hay: list[str]) -> int:
        return len(tokenizer.encode_prompt(render(hay), chat=True))

    # Grow the haystack by bisection on the number of lines (token counts are monotone).
    lo, hi = 0, len(pool)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(_insert(pool[:mid], needles, depth, rng_seed=seed)) <= length:
            lo = mid
        else:
            hi = mid - 1
    hay = _insert(pool[:lo], needles, depth, rng_seed=seed)
    return Sample(task, render(hay), answers, length, depth, seed)


def _insert(hay: list[str], needles: list[str], depth: float, rng_seed: int) -> list[str]:
    """Needles at fraction ``depth`` of the lines (several needles: spread +-5% around it)."""
    out = list(hay)
    rng = random.Random(rng_seed)
    n = len(out)
    for i, needle in enumerate(needles):
        d = depth if i == 0 else min(1.0, max(0.0, depth + rng.uniform(-0.05, 0.05)))
        out.insert(int(round(d * (n + i))), needle)
    return out
