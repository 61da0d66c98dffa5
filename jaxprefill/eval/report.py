"""Summaries of an eval run: accuracy with Wilson intervals, paired differences against dense,
attention statistics; written as ``report.md``, ``summary.json`` and ``accuracy.png``.

Input rows are the answer records of :mod:`jaxprefill.eval.suite` (``config``, ``task``,
``length``, ``prompt_id``, ``correct``, ``score``) and its stats records (``config``,
``length``, ``density``, ``recall``, ``min_head_recall``, ``output_error``, ``last_recall``,
``min_last_recall``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from jaxprefill.eval import plots
from jaxprefill.eval.stats import paired_difference, wilson

ALL = "all"  # the pooled row over tasks (or lengths)
PAIRED_METHOD = ("Newcombe's paired interval (1998, method 10: square-and-add of the two Wilson "
                 "intervals with the pairs' continuity-corrected correlation); p: exact McNemar "
                 "test on the discordant pairs")


def _cells(records: list[dict]) -> dict[tuple, list[dict]]:
    """(config, task, length) -> records, plus pooled (config, ALL, length) and
    (config, ALL, ALL) cells."""
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        for key in ((r["config"], r["task"], r["length"]), (r["config"], r["task"], ALL),
                    (r["config"], ALL, r["length"]), (r["config"], ALL, ALL)):
            cells.setdefault(key, []).append(r)
    return cells


def accuracy_rows(records: list[dict]) -> list[dict]:
    """One row per (config, task, length) cell and pooled cells: n, correct, accuracy, 95%
    Wilson interval [low, high], mean partial score."""
    out = []
    for (config, task, length), rs in _cells(records).items():
        k, n = sum(bool(r["correct"]) for r in rs), len(rs)
        low, high = wilson(k, n)
        out.append({"config": config, "task": task, "length": length, "n": n, "correct": k,
                    "accuracy": k / n, "low": low, "high": high,
                    "score": float(np.mean([r["score"] for r in rs]))})
    return out


def paired_rows(records: list[dict], baseline: str = "dense") -> list[dict]:
    """Each config against ``baseline`` on the prompts both answered, per cell and pooled:
    the :class:`jaxprefill.eval.stats.PairedDiff` fields."""
    base = {r["prompt_id"]: bool(r["correct"]) for r in records if r["config"] == baseline}
    out = []
    for (config, task, length), rs in _cells(records).items():
        if config == baseline:
            continue
        pairs = [(bool(r["correct"]), base[r["prompt_id"]]) for r in rs if r["prompt_id"] in base]
        if not pairs:
            continue
        d = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
        out.append({"config": config, "task": task, "length": length,
                    **dataclasses.asdict(d)})
    return out


def stats_rows(records: list[dict]) -> list[dict]:
    """Mean density / recall / output error / last-query recall and the lowest head and
    last-query recalls per (config, length)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["config"], r["length"]), []).append(r)
    return [{"config": c, "length": n, "prompts": len(rs),
             "density": float(np.mean([r["density"] for r in rs])),
             "recall": float(np.mean([r["recall"] for r in rs])),
             "min_head_recall": float(np.min([r["min_head_recall"] for r in rs])),
             "output_error": float(np.mean([r["output_error"] for r in rs])),
             "last_recall": float(np.mean([r["last_recall"] for r in rs])),
             "min_last_recall": float(np.min([r["min_last_recall"] for r in rs]))}
            for (c, n), rs in groups.items()]


def _order(rows: list[dict], configs: list[str], tasks: list[str], lengths: list) -> list[dict]:
    ck = {c: i for i, c in enumerate(configs)}
    tk = {t: i for i, t in enumerate(tasks + [ALL])}
    lk = {n: i for i, n in enumerate(list(lengths) + [ALL])}
    return sorted(rows, key=lambda r: (ck.get(r["config"], 99), tk.get(r.get("task"), 99),
                                       lk.get(r["length"], 99)))


def _pivot(rows: list[dict], lengths: list, cell, row_key=("config", "task")) -> list[str]:
    """Markdown table: one line per row_key, one column per length (+ all)."""
    cols = list(lengths) + [ALL]
    by = {(*(r[k] for k in row_key), r["length"]): r for r in rows}
    keys = list(dict.fromkeys(tuple(r[k] for k in row_key) for r in rows))
    lines = ["| " + " | ".join(row_key) + " | " + " | ".join(str(c) for c in cols) + " |",
             "|" + "---|" * (len(row_key) + len(cols))]
    for key in keys:
        vals = [cell(by[(*key, c)]) if (*key, c) in by else "" for c in cols]
        lines.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(vals) + " |")
    return lines


def longest_prompts(answers: list[dict]) -> dict:
    """length -> the most prompt tokens of its answers (lengths near the model's context are
    capped to leave room for the answer)."""
    out: dict = {}
    for r in answers:
        if "tokens" in r:
            out[r["length"]] = max(out.get(r["length"], 0), r["tokens"])
    return out


def markdown(acc: list[dict], paired: list[dict], stats: list[dict], meta: dict,
             longest: dict | None = None) -> str:
    """The report: accuracy (Wilson 95%), paired differences against dense, attention stats."""
    lengths = list(meta["lengths"])
    sizes = ", ".join(f"{n}: {longest[n]}" for n in lengths if n in (longest or {}))
    out = [f"# jaxprefill eval: {meta['model']} ({meta['split']} split)", "",
           f"Tasks {', '.join(meta['tasks'])}; {meta['samples']} samples per (task, length) over "
           f"depths {meta['depths']}; haystack {meta['haystack']}; dtype {meta['dtype']}; "
           f"device {meta.get('device', '?')}." + (f" Longest prompt per length (tokens, chat "
                                                   f"template included): {sizes}." if sizes else "")
           + (f" Adapter {meta['adapter']}." if meta.get("adapter") else "")
           + (f" Config overrides {json.dumps(meta['overrides'], sort_keys=True)}."
              if meta.get("overrides") else "")
           + " Cells: correct/n accuracy [95% Wilson interval]; `all` pools tasks or lengths.",
           ""]
    if meta.get("partial"):
        part = meta["partial"]
        out += [f"**Partial:** the run was interrupted with {part['answers']} of "
                f"{part['planned']} answers recorded; configs may cover fewer prompts than dense, "
                f"and each is paired with dense on the prompts both answered. Rerun the same "
                f"command to continue.", ""]
    out += ["## Accuracy", ""]
    out += _pivot(acc, lengths, lambda r: f"{r['correct']}/{r['n']} {r['accuracy']:.2f} "
                                          f"[{r['low']:.2f}, {r['high']:.2f}]")
    if paired:
        out += ["", "## Sparse minus dense on the same samples", "",
                f"Cells: accuracy difference [95% interval] (+k/-m: samples only the config / "
                f"only dense answered correctly), {PAIRED_METHOD}.", ""]
        out += _pivot(paired, lengths, lambda r: f"{r['diff']:+.2f} [{r['low']:+.2f}, "
                                                 f"{r['high']:+.2f}] (+{r['only_a']}/-"
                                                 f"{r['only_b']}, p={r['p_mcnemar']:.2g})")
    if stats:
        out += ["", "## Density and attention recall", "",
                "Over all layers and heads of the sampled prompts, from the dense forward's "
                "q/k/v; recall = dense attention mass kept, exact on sampled query rows; min "
                "head = the lowest (layer, head, prompt) recall; last query = the recall of "
                "each prompt's last token, whose output makes the first generated token.", "",
                "| config | length | prompts | density | recall | min head recall | "
                "output error | last-query recall | min last-query recall |",
                "|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['config']} | {r['length']} | {r['prompts']} | {r['density']:.3f} | "
                f"{r['recall']:.4f} | {r['min_head_recall']:.4f} | {r['output_error']:.4f} | "
                f"{r['last_recall']:.4f} | {r['min_last_recall']:.4f} |" for r in stats]
    return "\n".join(out) + "\n"


def write(out_dir: str | os.PathLike, answers: list[dict], stats: list[dict], meta: dict,
          plot: bool = True) -> dict:
    """Write report.md, summary.json (and accuracy.png) into ``out_dir``; returns the summary."""
    configs, tasks = list(meta["configs"]), list(meta["tasks"])
    acc = _order(accuracy_rows(answers), configs, tasks, meta["lengths"])
    paired = _order(paired_rows(answers), configs, tasks, meta["lengths"])
    st = _order(stats_rows(stats), configs, tasks, meta["lengths"])
    summary = {"meta": meta, "paired_method": PAIRED_METHOD, "accuracy": acc, "paired": paired,
               "attention": st}
    out = Path(out_dir)
    write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    write_atomic(out / "report.md", markdown(acc, paired, st, meta, longest_prompts(answers)))
    if plot and answers:
        plots.accuracy_vs_length(str(out / "accuracy.png"), acc, configs, tasks,
                                 f"{meta['model']} ({meta['split']})")
    return summary


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename: a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
