"""Synthetic long-context tasks (RULER-style) over the committed haystack documents.

Each sample is a deterministic function of (task, target length, depth, seed, split, haystack
kind); the haystack text comes from :mod:`jaxprefill.eval.haystack` (never from the running
interpreter), so every machine builds the same prompts for the same tokenizer.

* ``passkey``: "The pass key is N. Remember it. N is the pass key." (InfiniteBench passkey).
* ``niah_single``: one "special magic number for <key>" needle (RULER niah_single).
* ``niah_multikey``: 4 needles with different keys, ask one (RULER niah_multikey); naming
  another key's number is wrong.
* ``niah_multivalue``: 4 numbers for one key, ask all (RULER niah_multivalue).
* ``vt``: variable tracking, a 4-hop chain VAR A = N, VAR B = VAR A, ... (RULER vt; all names).
* ``cwe``: common-word extraction: a numbered list where 10 words appear 30 times and the
  others 3 times (below 4096 tokens: 2 times and once, as RULER does); name the 10 most
  frequent (RULER cwe; the words come from the split's prose). No needle: depth is None.
* ``qa``: a fact sentence about an invented person placed in prose, asked as a question, with
  two facts of the same form about other people as distractors.

Needles go in at ``depth`` (0 = start, 1 = end) at a line boundary (prose: after a sentence or
a paragraph); extra needles of a task spread around it. The haystack is trimmed so the whole
chat prompt has at most ``length`` tokens.

Scoring (:meth:`Sample.score`): 1.0 iff every expected answer occurs in the normalized answer
text as whole words (lower case, punctuation and articles dropped: SQuAD's normalization) and
no distractor does; :meth:`Sample.partial` is the fraction of expected answers found (RULER's
string_match_all).
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Callable, Generator

from jaxprefill.eval import haystack as hay
from jaxprefill.validate import InputError

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe", "qa")
# Tokens to generate per task: the answer plus a preamble ("The special magic numbers for x
# are: ..."); tokenizers that split numbers into digits need 6 tokens per 6-digit value.
MAX_NEW_TOKENS = {"passkey": 32, "niah_single": 32, "niah_multikey": 32, "niah_multivalue": 96,
                  "vt": 64, "cwe": 128, "qa": 32}
# Haystack kinds a task can use; the first is its default.
HAYSTACKS = {"cwe": ("words",), "qa": ("prose",)}
_WORDS = ("amber", "falcon", "harbor", "lantern", "meadow", "quartz", "saffron", "tundra",
          "velvet", "willow", "cobalt", "ember", "glacier", "juniper", "orchid", "pebble")
_FIRST = ("Alice", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ingrid",
          "Jonas", "Keiko", "Liam", "Marta", "Nikolai", "Olga", "Pedro", "Quinn", "Rosa",
          "Stefan", "Tamsin", "Umar", "Vera", "Wendell", "Yusuf")
_SYLLABLES = ("ka", "lo", "mi", "ra", "ven", "dor", "sil", "ta", "bri", "nor", "pel", "zan",
              "qu", "ith", "mar", "vel", "os", "tren", "ul", "gar")
# (fact, question); {p} a person, {a} the answer (an invented name).
_FACTS = (
    ("{p} was born in a small town called {a}.", "In which town was {p} born?"),
    ("The ship that {p} sailed on was named {a}.", "What was the name of the ship that {p} "
                                                   "sailed on?"),
    ("{p} named the family cat {a}.", "What did {p} name the family cat?"),
    ("{p} spent the winter in a mountain village called {a}.", "In which village did {p} "
                                                               "spend the winter?"),
)
_CWE_COMMON = 10


def _cwe_freqs(length: int) -> tuple[int, int]:
    """(repeats of each common word, of each rare word): RULER's settings."""
    return (30, 3) if length >= 4096 else (2, 1)


_INSTRUCTIONS = {
    "passkey": "There is an important piece of information hidden inside a lot of irrelevant "
               "text. Find it and memorize it. I will quiz you about it.",
    "niah": "Some special magic numbers are hidden within the following text. Make sure to "
            "memorize them. I will quiz you about the numbers afterwards.",
    "vt": "Memorize and track the chain of variable assignments hidden in the following text.",
    "cwe": "Below is a numbered list of words. In these words, some appear more often than "
           "others. Memorize the ones that appear most often.",
    "qa": "Read the following text carefully. I will ask you a question about it afterwards.",
}


@dataclasses.dataclass
class Sample:
    """One prompt: chat messages, the strings a correct answer contains, metadata.

    ``depth`` is None for tasks without a needle (cwe); ``distractors`` are strings a correct
    answer must not contain (another key's number, another person's fact)."""

    task: str
    messages: list[dict]
    answers: list[str]
    length: int
    depth: float | None
    seed: int
    split: str = "dev"
    haystack: str = "code"
    distractors: list[str] = dataclasses.field(default_factory=list)

    def score(self, text: str) -> float:
        """1.0 if every answer and no distractor occurs in ``text`` (see module doc), else 0.0."""
        return float(all(contains(text, a) for a in self.answers)
                     and not any(contains(text, d) for d in self.distractors))

    def partial(self, text: str) -> float:
        """Fraction of the expected answers that occur in ``text``."""
        return sum(contains(text, a) for a in self.answers) / len(self.answers)


def normalize(text: str) -> str:
    """Lower case; digit-group commas dropped (1,234 -> 1234); punctuation -> space; articles
    (a, an, the) dropped; whitespace collapsed."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower())
    text = re.sub(r"[^\w\s]|_", " ", text)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def contains(text: str, answer: str) -> bool:
    """Whether normalized ``answer`` occurs in normalized ``text`` as whole words."""
    return f" {normalize(answer)} " in f" {normalize(text)} "


def _invented(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(3)).capitalize()


def _needles(task: str, rng: random.Random) -> tuple[list[str], str, list[str], list[str]]:
    """(needle sentences, question, answers, distractors); needles[0] carries the answer."""
    num = lambda: str(rng.randint(100000, 999999))  # noqa: E731
    if task == "passkey":
        n = str(rng.randint(10000, 99999))
        return ([f"The pass key is {n}. Remember it. {n} is the pass key."],
                "What is the pass key? Answer with the number only.", [n], [])
    if task in ("niah_single", "niah_multikey"):
        keys = rng.sample(_WORDS, 4 if task == "niah_multikey" else 1)
        vals = [num() for _ in keys]
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, vals)]
        return (needles, f"What is the special magic number for {keys[0]}? Answer with the "
                         f"number only.", [vals[0]], vals[1:])
    if task == "niah_multivalue":
        key, vals = rng.choice(_WORDS), [num() for _ in range(4)]
        needles = [f"One of the special magic numbers for {key} is: {v}." for v in vals]
        return (needles, f"What are all the special magic numbers for {key}? List them.", vals,
                [])
    if task == "vt":
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
                 for _ in range(4)]
        val = str(rng.randint(10000, 99999))
        needles = [f"VAR {names[0]} = {val}."] + [f"VAR {b} = VAR {a}." for a, b in
                                                 zip(names, names[1:])]
        return (needles, f"Find all variables that are assigned the value {val}, directly or "
                         f"through other variables. List their names.", names, [])
    if task == "qa":
        fact, question = rng.choice(_FACTS)
        people = rng.sample(_FIRST, 3)
        people = [f"{p} {_invented(rng)}" for p in people]
        answers = []
        while len(answers) < 3:
            a = _invented(rng)
            if a not in answers and all(a not in p for p in people):
                answers.append(a)
        needles = [fact.format(p=p, a=a) for p, a in zip(people, answers)]
        return (needles, question.format(p=people[0]) + " Answer with the name only.",
                answers[:1], answers[1:])
    raise InputError(f"unknown task {task!r}; choose one of {TASKS}")


def _instruction(task: str) -> str:
    return _INSTRUCTIONS["niah" if task.startswith("niah") else task]


def make_sample(tokenizer, task: str, length: int, depth: float | None, seed: int,
                split: str = "dev", haystack: str | None = None) -> Sample:
    """A prompt of at most ``length`` tokens (chat template included) with needles at ``depth``.

    ``tokenizer`` needs ``encode_prompt(messages, chat=True) -> list[int]`` (and uses
    ``encode_prompts``, a batch form, when it has one). ``haystack``: ``code`` or ``prose``
    (default: ``qa`` prose, ``cwe`` its word list, others code).
    Raises ValueError for an unknown task / split / kind, a depth outside [0, 1], or a length
    the instructions alone exceed or the split's text cannot fill.
    """
    return build_prompts(tokenizer, [(task, length, depth, seed, split, haystack)])[0][0]


def make_samples(tokenizer, requests: list[tuple]) -> list[Sample]:
    """``[make_sample(tokenizer, *r) for r in requests]``, built together (:func:`build_prompts`)."""
    return [sample for sample, _ in build_prompts(tokenizer, requests)]


def build_prompts(tokenizer, requests: list[tuple]) -> list[tuple[Sample, list[int]]]:
    """``(make_sample(tokenizer, *r), its prompt's token ids)`` for every request.

    The haystack fits of all requests run in lockstep, so each round's prompts are tokenized
    in one batch (``tokenizer.encode_prompts``, the tokenizer's parallel batch encoder, when it
    has one); a fit's answer is a size it has tokenized, so its ids are kept, not recomputed.
    """
    batch = getattr(tokenizer, "encode_prompts", None)
    encode = (lambda prompts: batch(prompts, chat=True)) if batch else (
        lambda prompts: [tokenizer.encode_prompt(p, chat=True) for p in prompts])
    plans = [_plan(*r) for r in requests]
    fits = [_fit(p.limit, p.length, p.what) for p in plans]
    pending = {i: next(f) for i, f in enumerate(fits)}
    fitting: dict[int, dict[int, list[int]]] = {i: {} for i in pending}  # size -> ids
    out: dict[int, tuple[Sample, list[int]]] = {}
    while pending:
        ids = list(pending)
        for i, tokens in zip(ids, encode([plans[i].render(pending[i]) for i in ids])):
            m = pending[i]
            if len(tokens) <= plans[i].length:
                fitting[i] = {m: tokens}  # the fit only grows its fitting size
            try:
                pending[i] = fits[i].send(len(tokens))
            except StopIteration as stop:
                out[i] = (plans[i].sample(stop.value), fitting[i][stop.value])
                del pending[i]
    return [out[i] for i in range(len(plans))]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A sample but for its haystack size: render(m) -> messages with m haystack units (lines,
    or rare words for cwe); sample(m) -> the Sample; limit units exist."""

    render: Callable[[int], list[dict]]
    sample: Callable[[int], "Sample"]
    limit: int
    length: int
    what: str


def _plan(task: str, length: int, depth: float | None, seed: int, split: str = "dev",
          haystack: str | None = None) -> _Plan:
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose one of {TASKS}")
    kinds = HAYSTACKS.get(task, hay.KINDS)
    kind = kinds[0] if haystack is None or task in HAYSTACKS else haystack
    if kind not in kinds:
        raise InputError(f"task {task} takes a haystack of kind {kinds}, got {haystack!r}")
    if task == "cwe":
        return _cwe_plan(length, seed, split)
    if depth is None or not 0.0 <= depth <= 1.0:
        raise InputError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"{task}/{length}/{depth}/{seed}/{split}")
    needles, question, answers, distractors = _needles(task, rng)
    pool = hay.haystack_lines(split, kind, seed)
    place_rng = random.Random(f"place/{seed}")
    if task == "qa":  # distractor facts anywhere in the text
        depths = [depth] + [place_rng.random() for _ in needles[1:]]
    else:  # extra needles within +-5% of the first
        depths = [depth] + [min(1.0, max(0.0, depth + place_rng.uniform(-0.05, 0.05)))
                            for _ in needles[1:]]

    def render(m: int) -> list[dict]:
        body = "\n".join(_insert(pool[:m], needles, depths, prose=kind == "prose"))
        return [{"role": "user", "content": f"{_instruction(task)}\n\n{body}\n\n{question}"}]

    def sample(m: int) -> Sample:
        return Sample(task, render(m), answers, length, depth, seed, split, kind, distractors)

    return _Plan(render, sample, len(pool), length, f"the {split} split's {kind} text")


def _cwe_plan(length: int, seed: int, split: str) -> _Plan:
    """RULER cwe: 10 common words x 30 and m rare words x 3 (or x 2 and x 1), shuffled,
    numbered."""
    rng = random.Random(f"cwe/{length}/{seed}/{split}")
    vocab = list(hay.vocabulary(split))
    rng.shuffle(vocab)
    common, rare = vocab[:_CWE_COMMON], vocab[_CWE_COMMON:]
    question = (f"What are the {_CWE_COMMON} most common words in the above list? Answer with "
                f"the words only, separated by commas.")

    freq, rare_freq = _cwe_freqs(length)

    def render(m: int) -> list[dict]:
        words = common * freq + rare[:m] * rare_freq
        random.Random(f"cwe-order/{seed}/{m}").shuffle(words)
        body = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        return [{"role": "user", "content": f"{_instruction('cwe')}\n\n{body}\n\n{question}"}]

    def sample(m: int) -> Sample:
        return Sample("cwe", render(m), list(common), length, None, seed, split, "words", [])

    return _Plan(render, sample, len(rare), length, f"the {split} split's vocabulary")


def _fit(limit: int, length: int, what: str) -> Generator[int, int, int]:
    """Largest m in [0, limit] with count(m) <= length, count non-decreasing in m. A generator:
    it yields the m to count, is sent count(m), and returns the answer, always a size it was
    sent the count of (so many searches run in lockstep, their counts batched:
    :func:`build_prompts`).

    Every probe aims at the predicted answer itself (the last unit predicted to fit), from the
    tokens-per-unit rate of the longest prefix that fits or, once bracketed, by interpolation:
    a good prediction is then confirmed by the next probe (one more unit does not fit). From the
    fourth probe inside the bracket every other one bisects, which bounds the worst case. About
    7 tokenizer calls on a 32K-token prompt (5 of them long), against ~17 for plain bisection.
    """
    c0 = yield 0
    if c0 > length:
        raise InputError(f"length {length} is too short: the task's prompt without haystack "
                         f"takes {c0} tokens")
    lo, c_lo = 0, c0
    hi, c_hi = None, None
    guess, bracketed = min(limit, 256), 0
    while True:
        c = yield guess
        if c <= length:
            lo, c_lo = guess, c
        else:
            hi, c_hi = guess, c
        if hi is None:
            if lo == limit:
                raise InputError(f"length {length} needs more than {what} holds ({c} tokens "
                                 f"at most)")
            rate = max((c_lo - c0) / lo, 1e-3)
            guess = min(limit, lo + max(1, int((length - c_lo) / rate)))
            continue
        if hi - lo <= 1:
            return lo
        bracketed += 1
        if bracketed > 3 and bracketed % 2 == 0:  # interpolation is not closing in: bisect
            guess = (lo + hi) // 2
        else:
            guess = lo + int((length - c_lo) * (hi - lo) / max(c_hi - c_lo, 1))
            guess = min(max(guess, lo + 1), hi - 1)


def _boundary(hay: list[str], i: int, window: int = 40) -> int:
    """The insertion index nearest ``i`` that follows a sentence or paragraph end in prose."""
    def ok(j: int) -> bool:
        return j == 0 or j == len(hay) or not hay[j - 1].strip() or \
            hay[j - 1].rstrip().endswith((".", "!", "?", ":"))
    for step in range(window + 1):
        for j in (i - step, i + step):
            if 0 <= j <= len(hay) and ok(j):
                return j
    return i


def _insert(hay: list[str], needles: list[str], depths: list[float], prose: bool) -> list[str]:
    """Needles at fractions ``depths`` of the lines (prose: snapped to sentence ends)."""
    out = list(hay)
    for needle, d in zip(needles, depths):
        i = int(round(d * len(out)))
        out.insert(_boundary(out, i) if prose else i, needle)
    return out
