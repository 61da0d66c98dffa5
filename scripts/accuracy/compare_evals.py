"""Several `jaxprefill eval` runs in one table: accuracy per (task, length) of each run, and each
run minus the first on the prompts both answered.

    python -m scripts.accuracy.compare_evals --run base=eval/base yarn-x4=eval/yarn \
        lora-32k=eval/32k [--config dense] --out eval/compare.md

Each DIR is a `jaxprefill eval --out-dir` (one model: base, a training-free RoPE scaling via
--override, an adapter). From DIR/answers.jsonl the answers of --config (default dense) are
taken (the last record of a (config, prompt) wins, as on resume; a torn last line is skipped);
DIR/run.json gives the run's model, adapter, overrides, dtype and split. Writes:
  FILE.md    the runs; accuracy per task x run x length (correct/n, accuracy, 95% Wilson
             interval; `all` pools lengths, the task `all` pools tasks; `-`: the run has no
             answers at that length); each later run minus the first on the same prompt ids
             (Newcombe's paired interval and the exact McNemar p, jaxprefill.eval.stats).
  FILE.png   accuracy against length, one line per run, one panel per task and `all`.
  FILE.json  the same rows.
Prompt ids name split / task / length / sample, so runs of one split pair up; a pair whose
prompt tokens differ (recorded prompt_sha; e.g. a length capped by a shorter context) is
counted in the report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxprefill.cli import run_command
from jaxprefill.eval import plots, report
from jaxprefill.eval.tasks import TASKS
from jaxprefill.validate import InputError

ANSWERS, RUN = "answers.jsonl", "run.json"
FIELDS = ("prompt_id", "task", "length", "config", "correct")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.accuracy.compare_evals",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--run", dest="runs", nargs="+", required=True, metavar="LABEL=DIR",
                   help="a jaxprefill eval --out-dir and its name in the table; the first is "
                        "the baseline of the paired table")
    p.add_argument("--config", default="dense",
                   help="the eval config whose answers are compared (default dense)")
    p.add_argument("--out", required=True, help="FILE.md (FILE.png and FILE.json beside it)")
    return p.parse_args(argv)


def parse_run(spec: str) -> tuple[str, Path]:
    """'LABEL=DIR' -> (label, dir)."""
    label, sep, path = spec.partition("=")
    label = label.strip()
    if not sep or not label or not path or "|" in label:
        raise InputError(f"--run {spec!r}: expected LABEL=DIR (a label without '|', then the "
                         f"directory of a jaxprefill eval run)")
    return label, Path(path)


def read_answers(path: Path, log=print) -> list[dict]:
    """The records of an answers.jsonl, the last one per (config, prompt_id). Read-only: a torn
    last line (an interrupted write) is skipped with a note; another bad line is an error."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        log(f"{path}: skipping an incomplete last line (interrupted write)")
        data = data[:data.rfind(b"\n") + 1]
    out: dict[tuple, dict] = {}
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not a JSON record ({e.msg})") from None
        missing = [f for f in FIELDS if not isinstance(rec, dict) or f not in rec]
        if missing:
            raise InputError(f"{path}:{n}: an answer record needs {', '.join(missing)}")
        out[(rec["config"], rec["prompt_id"])] = rec
    return list(out.values())


def load_run(label: str, directory: Path, config: str, log=print) -> dict:
    """{label, dir, run (run.json), records} of one eval directory, the records of ``config``
    relabelled as config=label (what the report helpers group by)."""
    where = f"--run {label}={directory}"
    if not directory.is_dir():
        raise InputError(f"{where}: no such directory")
    for name in (ANSWERS, RUN):
        if not (directory / name).is_file():
            raise InputError(f"{where}: no {name} (not a jaxprefill eval --out-dir?)")
    try:
        info = json.loads((directory / RUN).read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{directory / RUN}: not JSON ({e.msg})") from None
    answers = read_answers(directory / ANSWERS, log)
    records = [{"config": label, "task": r["task"], "length": r["length"],
                "prompt_id": r["prompt_id"], "correct": bool(r["correct"]),
                "score": r.get("score", float(bool(r["correct"]))),
                "prompt_sha": r.get("prompt_sha")}
               for r in answers if r["config"] == config]
    if not records:
        have = sorted({r["config"] for r in answers})
        raise InputError(f"{directory / ANSWERS}: no answers of config {config!r} (it has "
                         f"{', '.join(have) or 'none'}); choose one with --config")
    return {"label": label, "dir": str(directory), "run": info, "records": records}


def prompt_mismatches(runs: list[dict]) -> dict[str, int]:
    """Per later run: shared prompt ids with the first run whose prompt tokens differ."""
    base = {r["prompt_id"]: r["prompt_sha"] for r in runs[0]["records"]}
    return {run["label"]: sum(1 for r in run["records"] if r["prompt_id"] in base
                              and None not in (r["prompt_sha"], base[r["prompt_id"]])
                              and r["prompt_sha"] != base[r["prompt_id"]])
            for run in runs[1:]}


def compare(runs: list[dict], config: str) -> dict:
    """The rows: accuracy per (run, task, length) with pooled cells; each later run minus the
    first on shared prompt ids (jaxprefill.eval.report's helpers, a run label as the config)."""
    labels = [r["label"] for r in runs]
    records = [rec for run in runs for rec in run["records"]]
    found = {rec["task"] for rec in records}
    tasks = [t for t in TASKS if t in found] + sorted(found - set(TASKS))
    lengths = sorted({rec["length"] for rec in records})
    acc = report._order(report.accuracy_rows(records), labels, tasks, lengths)
    paired = report._order(report.paired_rows(records, baseline=labels[0]), labels, tasks,
                           lengths)
    for rows in (acc, paired):
        for r in rows:
            r["run"] = r.pop("config")
    return {"config": config, "labels": labels, "tasks": tasks, "lengths": lengths,
            "runs": [{"label": r["label"], "dir": r["dir"], "run": r["run"]} for r in runs],
            "paired_method": report.PAIRED_METHOD, "prompt_mismatch": prompt_mismatches(runs),
            "accuracy": acc, "paired": paired}


def _table(rows: list[dict], result: dict, cell) -> list[str]:
    """task x run rows, one column per length (+ all); `-` where a run lacks the cell."""
    tasks, labels = result["tasks"] + [report.ALL], result["labels"]
    have = {(r["task"], r["run"], r["length"]) for r in rows}
    keys = [(t, lab) for t in tasks for lab in labels
            if any((t, lab, n) in have for n in result["lengths"] + [report.ALL])]
    rows = rows + [{"task": t, "run": lab, "length": n, "missing": True} for t, lab in keys
                   for n in result["lengths"] + [report.ALL] if (t, lab, n) not in have]
    order = {k: i for i, k in enumerate(keys)}
    rows = sorted((r for r in rows if (r["task"], r["run"]) in order),
                  key=lambda r: order[(r["task"], r["run"])])
    return report._pivot(rows, result["lengths"], lambda r: "-" if r.get("missing") else cell(r),
                         row_key=("task", "run"))


def markdown(result: dict) -> str:
    labels, base = result["labels"], result["labels"][0]
    out = [f"# jaxprefill eval: {', '.join(labels)} ({result['config']} prefill)", "",
           "| run | directory | model | adapter | overrides | dtype | split |",
           "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        info = r["run"]
        over = json.dumps(info.get("overrides"), sort_keys=True) if info.get("overrides") else "-"
        out.append(f"| {r['label']} | `{r['dir']}` | {info.get('model', '?')} | "
                   f"{info.get('adapter') or '-'} | {over} | {info.get('dtype', '?')} | "
                   f"{info.get('split', '?')} |")
    splits = sorted({str(r["run"].get("split")) for r in result["runs"]})
    if len(splits) > 1:
        out += ["", f"**The runs use different splits ({', '.join(splits)}): their prompt ids "
                    f"differ, so they do not pair.**"]
    out += ["", "## Accuracy", "",
            "Cells: correct/n accuracy [95% Wilson interval]; `-`: the run has no answers "
            "there. `all` pools the lengths a run has, so compare it only between runs with "
            "the same lengths (the paired table pools the shared prompts only).", ""]
    out += _table(result["accuracy"], result,
                  lambda r: f"{r['correct']}/{r['n']} {r['accuracy']:.2f} "
                            f"[{r['low']:.2f}, {r['high']:.2f}]")
    if len(labels) > 1:
        out += ["", f"## Each run minus {base} on the same prompts", "",
                f"Cells: accuracy difference [95% interval] (+k/-m: prompts only the run / "
                f"only {base} answered correctly), {result['paired_method']}.", ""]
        mism = {k: v for k, v in result["prompt_mismatch"].items() if v}
        if mism:
            out += [f"Pairs whose prompt tokens differ (same prompt id, other prompt_sha: "
                    f"another tokenizer, or a length capped by a shorter context): "
                    f"{', '.join(f'{k} {v}' for k, v in mism.items())}.", ""]
        if result["paired"]:
            out += _table(result["paired"], result,
                          lambda r: f"{r['diff']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}] "
                                    f"(+{r['only_a']}/-{r['only_b']}, p={r['p_mcnemar']:.2g})")
        else:
            out.append(f"No prompt id is shared with {base}.")
    return "\n".join(out) + "\n"


def run(args: argparse.Namespace) -> int:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    out = Path(args.out)
    if out.suffix != ".md":
        raise InputError(f"--out {args.out}: name a .md file (the .png and .json go beside it)")
    specs = [parse_run(s) for s in args.runs]
    dupes = sorted({lab for lab, _ in specs if [x for x, _ in specs].count(lab) > 1})
    if dupes:
        raise InputError(f"--run: labels used twice: {', '.join(dupes)}")
    runs = [load_run(label, d, args.config, log) for label, d in specs]
    result = compare(runs, args.config)
    for label, n in result["prompt_mismatch"].items():
        if n:
            log(f"{label}: {n} prompt ids shared with {result['labels'][0]} have other prompt "
                f"tokens")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    report.write_atomic(out, text)
    report.write_atomic(out.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    plot_rows = [{**r, "config": r["run"]} for r in result["accuracy"]]
    plots.accuracy_vs_length(str(out.with_suffix(".png")), plot_rows, result["labels"],
                             result["tasks"], f"{args.config} prefill: "
                                              f"{' vs '.join(result['labels'])}")
    print(text)
    log(f"wrote {out}, {out.with_suffix('.png').name}, {out.with_suffix('.json').name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
