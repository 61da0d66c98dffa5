"""The `jaxprefill eval` run: a sample plan, fixed-shape batches, resumable answers, stats.

A run answers every (config, sample) of an :class:`EvalPlan`: ``samples`` prompts per (task,
length), spread over the depths (and, for ``mixed``, over code and prose haystacks), with the
split's seeds. Dense is always a config, so each sparse config is compared with dense on the
same samples.

Shapes: every prompt of a length is padded to one length P (a multiple of 128) and every batch
has ``batch_size`` rows (the last one padded with copies of a real row, whose answers are
dropped), and the KV cache has one size per length: each config's prefill compiles once per
length and the dense decode step once per length.

Resumable: each finished batch is appended to ``answers.jsonl`` (flushed and fsynced) before
the next starts; rerunning the same command skips the (config, prompt) pairs already answered
with the same prompt tokens (``prompt_sha``). An interrupted run raises :class:`Interrupted`
with the answers it holds, so the command can still report them. ``run.json`` records what
the answers depend on (model, adapter, dtype, split, generation length, each config's
fingerprint): a rerun that differs is refused rather than mixing answers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from jaxprefill.eval import haystack as hay
from jaxprefill.eval.report import write_atomic
from jaxprefill.eval.runner import greedy_answers, prompt_attention_stats
from jaxprefill.eval.tasks import HAYSTACKS, MAX_NEW_TOKENS, TASKS, Sample, build_prompts
from jaxprefill.sparse import SparseConfig
from jaxprefill.validate import InputError

PAD = 128  # prompt rows are padded to a multiple of this (every policy's block size divides it)
HAYSTACK_CHOICES = ("code", "prose", "mixed")
ANSWERS, STATS, RUN = "answers.jsonl", "stats.jsonl", "run.json"


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM between batches. ``answers``: the plan's answers
    recorded so far (every finished batch is on disk); ``planned``: how many the plan has."""

    def __init__(self, answers: list[dict], planned: int):
        super().__init__(f"{len(answers)} of {planned} answers")
        self.answers, self.planned = answers, planned


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """What to evaluate. ``depths`` in [0, 1]; ``haystack``: code, prose or mixed (samples
    alternate between the two per round of depths; qa always uses prose, cwe its word list)."""

    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    samples: int
    split: str = "dev"
    haystack: str = "mixed"

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise InputError(f"unknown task(s) {bad or '(none)'}; choose from {TASKS}")
        if not self.lengths or min(self.lengths) < 64:
            raise InputError(f"lengths must be >= 64 tokens, got {list(self.lengths)}")
        if not self.depths or not all(0.0 <= d <= 1.0 for d in self.depths):
            raise InputError(f"depths must lie in [0, 1], got {list(self.depths)}")
        if not 1 <= self.samples < hay.MAX_SAMPLES:
            raise InputError(f"samples must be in [1, {hay.MAX_SAMPLES}), got {self.samples}")
        if self.split not in hay.SPLITS:
            raise InputError(f"unknown split {self.split!r}; choose one of {hay.SPLITS}")
        if self.haystack not in HAYSTACK_CHOICES:
            raise InputError(f"unknown haystack {self.haystack!r}; choose one of "
                             f"{HAYSTACK_CHOICES}")


@dataclasses.dataclass(frozen=True)
class PlannedSample:
    """One prompt of the plan, before tokenization. ``prompt_id``: split/task/length/index."""

    prompt_id: str
    task: str
    length: int
    index: int
    seed: int
    depth: float | None
    haystack: str


def plan_samples(plan: EvalPlan) -> list[PlannedSample]:
    """Every prompt of ``plan`` (cheap: no tokenizer). Sample i of a (task, length) takes depth
    ``depths[i % len(depths)]`` and seed ``split_seed(split, i)``."""
    out = []
    nd = len(plan.depths)
    for task in plan.tasks:
        for length in plan.lengths:
            for i in range(plan.samples):
                if task in HAYSTACKS:
                    kind = HAYSTACKS[task][0]
                elif plan.haystack == "mixed":
                    kind = hay.KINDS[(i // nd) % len(hay.KINDS)]
                else:
                    kind = plan.haystack
                depth = None if task == "cwe" else plan.depths[i % nd]
                out.append(PlannedSample(f"{plan.split}/{task}/{length}/{i:04d}", task, length, i,
                                         hay.split_seed(plan.split, i), depth, kind))
    return out


def config_fingerprint(cfg: SparseConfig | None) -> str:
    """A short hash of a config's full definition (policies, parameters, min_length)."""
    return "dense" if cfg is None else hashlib.sha256(repr(cfg).encode()).hexdigest()[:16]


def prompt_sha(ids) -> str:
    return hashlib.sha256(np.asarray(ids, np.int32).tobytes()).hexdigest()[:16]


class Store:
    """``answers.jsonl`` and ``stats.jsonl`` of an output directory, append-only.

    A torn last line (a write interrupted by a kill) is cut off on open: it never held a
    finished result. Any other unreadable line is an error naming the file and line.
    """

    def __init__(self, out_dir: str | os.PathLike, run_info: dict,
                 log: Callable[[str], None] = print):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._check_run(run_info)
        self.answers = {(r["config"], r["prompt_id"]): r for r in self._read(ANSWERS, log)}
        self.stats = {(r["config"], r["prompt_id"]): r for r in self._read(STATS, log)}

    def _check_run(self, info: dict) -> None:
        path = self.dir / RUN
        old = json.loads(path.read_text()) if path.exists() else None
        if old is not None:
            for key in ("model", "adapter", "overrides", "dtype", "split", "max_new_tokens", "haystack_asset"):
                # runs written before --override existed carry no "overrides": the same as {}
                if key == "overrides" and not old.get(key) and not info.get(key):
                    continue
                if old.get(key) != info.get(key):
                    raise InputError(
                        f"{path}: this directory holds answers for {key}={old.get(key)!r}, this "
                        f"command has {key}={info.get(key)!r}; use another --out-dir")
            for label, fp in info["configs"].items():
                if old["configs"].get(label, fp) != fp:
                    raise InputError(
                        f"{path}: config {label!r} was evaluated with another definition "
                        f"(fingerprint {old['configs'][label]} != {fp}); give it another name "
                        f"or use another --out-dir")
            info = {**info, "configs": {**old["configs"], **info["configs"]}}
        write_atomic(path, json.dumps(info, indent=1, sort_keys=True) + "\n")

    def _read(self, name: str, log: Callable[[str], None]) -> list[dict]:
        path = self.dir / name
        if not path.exists():
            return []
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            log(f"{path}: dropping an incomplete last line (interrupted write)")
            with open(path, "r+b") as f:
                f.truncate(cut)
            data = data[:cut]
        out = []
        for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n}: not a JSON record ({e.msg})") from None
        return out

    def append(self, name: str, records: list[dict]) -> None:
        """Append records durably (flush + fsync) and index them."""
        with open(self.dir / name, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        index = self.answers if name == ANSWERS else self.stats
        for r in records:
            index[(r["config"], r["prompt_id"])] = r


class Progress:
    """One status line per finished batch (rewritten in place on a terminal): answers done,
    rate and the estimated time left."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.stream = total, 0, stream or sys.stderr
        self.t0 = time.perf_counter()
        self.tty = getattr(stream, "isatty", lambda: False)()

    def update(self, n: int, what: str) -> None:
        self.done += n
        dt = time.perf_counter() - self.t0
        eta = dt / self.done * max(0, self.total - self.done) if self.done else 0.0
        pct = 100 * self.done / max(self.total, 1)
        line = (f"[eval] {self.done}/{self.total} answers ({pct:.0f}%) {what} | {_dur(dt)} "
                f"elapsed, ~{_dur(eta)} left")
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        if self.tty and self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def _dur(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def default_batch_size(padded: int) -> int:
    """Rows per prefill call: about 64K tokens per batch, 1 to 16 rows."""
    return max(1, min(16, 65536 // padded))


def run(model, tokenizer, configs: dict[str, SparseConfig | None], plan: EvalPlan,
        out_dir: str | os.PathLike, run_info: dict, *, batch_size: int | None = None,
        max_new_tokens: int | None = None, stats_prompts: int = 4, stats_rows: int = 32,
        log: Callable[[str], None] = print, progress_stream=None) -> tuple[list, list]:
    """Answer every (config, sample) of ``plan`` not yet in ``out_dir``; then density / recall
    of each sparse config on ``stats_prompts`` prompts per length.

    ``configs`` must contain "dense" (None). ``run_info``: model / adapter / dtype identity
    (see :class:`Store`). Returns (answer records, stats records) of this plan.
    """
    if configs.get("dense", 0) is not None:
        raise InputError("configs must include the dense baseline as 'dense': None")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    # The generation length of every task (not only this plan's): adding a task to a run is
    # fine, changing how long answers may be is not.
    info = {**run_info, "split": plan.split,
            "max_new_tokens": {t: max_new_tokens or MAX_NEW_TOKENS[t] for t in TASKS},
            "haystack_asset": hay.asset_sha256(),
            "configs": {k: config_fingerprint(v) for k, v in configs.items()}}
    store = Store(out_dir, info, log)
    samples = plan_samples(plan)
    new_tokens = {t: max_new_tokens or MAX_NEW_TOKENS[t] for t in plan.tasks}
    extra = max(new_tokens.values())
    ctx = model.config.max_position_embeddings
    targets = {}
    for length in plan.lengths:
        if length > ctx:
            raise InputError(f"--lengths {length} exceeds the model's context of {ctx} tokens")
        targets[length] = min(length, ctx - extra)
        if targets[length] < length:
            log(f"length {length}: prompts of at most {targets[length]} tokens (context {ctx} "
                f"- {extra} generated tokens)")
    built: dict[str, tuple[Sample, list[int]]] = {}

    def build_all(group: list[PlannedSample]) -> None:
        """Builds and tokenizes the group's prompts not built yet (tasks.build_prompts: the
        haystack fits run in lockstep, one batch encode per round)."""
        todo = [ps for ps in group if ps.prompt_id not in built]
        made = build_prompts(tokenizer, [(ps.task, targets[ps.length], ps.depth, ps.seed,
                                          plan.split, ps.haystack) for ps in todo])
        built.update({ps.prompt_id: pair for ps, pair in zip(todo, made)})

    def build(ps: PlannedSample) -> tuple[Sample, list[int]]:
        build_all([ps])
        return built[ps.prompt_id]

    def done(name: str, ps: PlannedSample) -> bool:
        r = store.answers.get((name, ps.prompt_id))
        return r is not None and (ps.prompt_id not in built
                                  or r["prompt_sha"] == prompt_sha(built[ps.prompt_id][1]))

    todo = sum(not done(n, ps) for n in configs for ps in samples)
    log(f"{len(samples)} prompts x {len(configs)} configs: {todo} answers to compute, "
        f"{len(samples) * len(configs) - todo} already in {store.dir / ANSWERS}")
    progress = Progress(todo, progress_stream)

    def recorded() -> list[dict]:
        return [store.answers[(n, ps.prompt_id)] for n in configs for ps in samples
                if (n, ps.prompt_id) in store.answers and done(n, ps)]

    try:
        for length in plan.lengths:
            group = [ps for ps in samples if ps.length == length]
            if not any(not done(n, ps) for n in configs for ps in group):
                continue
            t0 = time.perf_counter()
            before = sum(not done(n, ps) for n in configs for ps in group)
            build_all(group)  # tokenize once; a changed prompt (other tokenizer / assets) is redone
            progress.total += sum(not done(n, ps) for n in configs for ps in group) - before
            padded = -(-targets[length] // PAD) * PAD
            rows = batch_size or min(default_batch_size(padded), len(group))  # one shape a length
            log(f"length {length}: {len(group)} prompts built in {time.perf_counter() - t0:.1f}s, "
                f"padded to {padded} tokens, {rows} rows per batch")
            for name, cfg in configs.items():
                pending = [ps for ps in group if not done(name, ps)]
                for b0 in range(0, len(pending), rows):
                    part = pending[b0:b0 + rows]
                    recs = _answer_batch(model, tokenizer, cfg, name, part, built, rows, padded,
                                         padded + extra, new_tokens)
                    store.append(ANSWERS, recs)
                    progress.update(len(part), f"{name} L={length} batch {b0 // rows + 1}/"
                                               f"{-(-len(pending) // rows)}")
    except KeyboardInterrupt:
        raise Interrupted(recorded(), len(samples) * len(configs)) from None
    answers = recorded()
    stats = _attention_stats(model, tokenizer, configs, plan, samples, store, build, targets,
                             stats_prompts, stats_rows, log)
    return answers, stats


def _answer_batch(model, tokenizer, cfg, name: str, part: list[PlannedSample], built: dict,
                  rows: int, padded: int, cache_len: int, new_tokens: dict) -> list[dict]:
    """Greedy answers of one fixed-shape batch -> answer records (dummy rows dropped)."""
    tokens = np.zeros((rows, padded), np.int32)
    lengths = np.zeros(rows, np.int32)
    for r in range(rows):
        ids = built[part[min(r, len(part) - 1)].prompt_id][1]  # dummy rows repeat the last one
        tokens[r, :len(ids)] = ids
        lengths[r] = len(ids)
    steps = max(new_tokens[ps.task] for ps in part)
    texts, prefill_s = greedy_answers(model, tokenizer, tokens, lengths, cfg, steps, cache_len)
    recs = []
    for ps, text in zip(part, texts):
        s, ids = built[ps.prompt_id]
        recs.append({"prompt_id": ps.prompt_id, "task": ps.task, "length": ps.length,
                     "tokens": len(ids), "depth": ps.depth, "seed": ps.seed,
                     "haystack": ps.haystack, "config": name, "answer": text.strip(),
                     "expected": s.answers, "distractors": s.distractors,
                     "correct": bool(s.score(text)), "score": s.partial(text),
                     "prefill_s": round(prefill_s, 4), "prompt_sha": prompt_sha(ids)})
    return recs


def stats_sample_ids(samples: list[PlannedSample], length: int, count: int) -> list[str]:
    """The ``count`` prompts of a length whose attention statistics are measured: index 0, 1,
    ... of each task in turn (different tasks and depths)."""
    group = sorted((ps for ps in samples if ps.length == length),
                   key=lambda ps: (ps.index, ps.task))
    return [ps.prompt_id for ps in group[:count]]


def _attention_stats(model, tokenizer, configs, plan, samples, store: Store, build, targets,
                     count: int, rows: int, log) -> list[dict]:
    sparse = {n: c for n, c in configs.items() if c is not None}
    if count <= 0 or not sparse:
        return []
    by_id = {ps.prompt_id: ps for ps in samples}
    out = []
    for length in plan.lengths:
        ids = stats_sample_ids(samples, length, count)
        shas = {i: prompt_sha(build(by_id[i])[1]) for i in ids}  # a few prompts: cheap

        def stale(n: str, i: str) -> bool:  # no record, a changed prompt, or an older format
            rec = store.stats.get((n, i), {})
            return rec.get("prompt_sha") != shas[i] or "last_recall" not in rec

        missing = {n: c for n, c in sparse.items() if any(stale(n, i) for i in ids)}
        if missing:
            log(f"length {length}: density / recall of {len(missing)} config(s) on "
                f"{len(ids)} prompts")
            toks = [build(by_id[i])[1] for i in ids]
            padded = -(-targets[length] // PAD) * PAD
            tokens = np.zeros((len(toks), padded), np.int32)
            for r, t in enumerate(toks):
                tokens[r, :len(t)] = t
            lens = np.array([len(t) for t in toks], np.int32)
            st = prompt_attention_stats(model, tokens, lens, missing, rows=rows, log=log)
            recs = [{"config": n, "prompt_id": i, "length": length, "tokens": int(lens[r]),
                     "prompt_sha": shas[i], **{m: float(v[r]) for m, v in st[n].items()}}
                    for n in missing for r, i in enumerate(ids)]
            store.append(STATS, recs)
        out += [store.stats[(n, i)] for n in sparse for i in ids]
    return out
