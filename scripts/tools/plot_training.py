"""Loss curve of a training run: ``<output_dir>/metrics.jsonl`` drawn as a PNG.

    python -m scripts.tools.plot_training runs/smollm2-32k-lora/metrics.jsonl --out loss.png

Draws the training loss of every step (faint) with a moving average over ``--window`` steps,
validation losses as points, the learning rate on a second axis, and a dashed line where the run
resumed (a new command continuing from a checkpoint). A step logged twice (a resumed command
that repeated it) counts once: its last record wins.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_metrics(path: Path) -> dict:
    """{"train": {step: record}, "val": {step: val_loss}, "resumes": [step, ...]} of a
    metrics.jsonl; a torn last line is skipped, any other bad line is an error naming it."""
    train, val, resumes = {}, {}, []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                print(f"{path}:{i}: torn last line skipped", file=sys.stderr)
                continue
            raise SystemExit(f"error: {path}:{i}: not a JSON line") from None
        if rec.get("event") == "resume":
            resumes.append(rec["step"])
        elif "val_loss" in rec:
            val[rec["step"]] = rec["val_loss"]
        elif "loss" in rec and "step" in rec:
            train[rec["step"]] = rec
    if not train:
        raise SystemExit(f"error: {path}: no training steps (records with 'step' and 'loss')")
    return {"train": train, "val": val, "resumes": resumes}


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` values (shorter at the start)."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def plot(metrics: dict, out: Path, title: str, window: int) -> None:
    steps = np.array(sorted(metrics["train"]))
    loss = np.array([metrics["train"][s]["loss"] for s in steps])
    lr = np.array([metrics["train"][s].get("lr", np.nan) for s in steps])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, loss, color="tab:blue", alpha=0.25, lw=1, label="train loss (per step)")
    ax.plot(steps, moving_average(loss, window), color="tab:blue", lw=2,
            label=f"train loss ({window}-step mean)")
    if metrics["val"]:
        vs = sorted(metrics["val"])
        ax.plot(vs, [metrics["val"][s] for s in vs], "o", color="tab:red", ms=7,
                label="validation loss")
    for s in metrics["resumes"]:
        ax.axvline(s, color="gray", ls="--", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax2 = ax.twinx()
    ax2.plot(steps, lr, color="tab:green", lw=1, alpha=0.6)
    ax2.set_ylabel("learning rate", color="tab:green")
    handles, labels = ax.get_legend_handles_labels()
    if metrics["resumes"]:
        handles.append(plt.Line2D([], [], color="gray", ls="--"))
        labels.append("resumed (next command)")
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics", type=Path, help="a run's metrics.jsonl")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--title", default=None)
    p.add_argument("--window", type=int, default=10, help="steps of the moving average (>= 1)")
    args = p.parse_args(argv)
    if args.window < 1:
        p.error(f"--window must be >= 1, got {args.window}")
    if not args.metrics.is_file():
        raise SystemExit(f"error: {args.metrics}: no such metrics file")
    metrics = read_metrics(args.metrics)
    plot(metrics, args.out, args.title or str(args.metrics.parent), args.window)
    n = len(metrics["train"])
    print(f"wrote {args.out} ({n} steps, {len(metrics['val'])} validations, "
          f"{len(metrics['resumes'])} resumes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
