"""PNG pictures (matplotlib, Agg): dense attention beside policy masks; density vs recall;
accuracy vs prompt length per config."""

from __future__ import annotations

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mask_heatmaps(path: str, dense_mass: np.ndarray, masks: dict[str, np.ndarray],
                  title: str) -> None:
    """dense_mass [n, n] block-pooled dense attention (log scale) beside bool [n, n] masks."""
    plt = _plt()
    cols = 1 + len(masks)
    fig, axes = plt.subplots(1, cols, figsize=(3.2 * cols, 3.4))
    axes = np.atleast_1d(axes)
    causal_dense = np.tril(np.ones(dense_mass.shape, bool))
    axes[0].imshow(np.where(causal_dense, np.log10(np.maximum(dense_mass, 1e-6)), np.nan),
                   cmap="magma", vmin=-6, vmax=np.log10(max(dense_mass.max(), 1e-6)))
    axes[0].set_title("dense (log10 mass)")
    for ax, (name, m) in zip(axes[1:], masks.items()):
        causal = np.tril(np.ones_like(m, bool))
        ax.imshow(np.where(causal, m.astype(float), np.nan), cmap="Blues", vmin=0, vmax=1.2)
        ax.set_title(f"{name} ({m[causal].mean():.0%})")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def density_recall(path: str, rows: list[dict]) -> None:
    """Scatter of per-head (density, recall) per policy, with the policy means marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        pts = ax.scatter(r["per_head_density"], r["per_head_recall"], s=6, alpha=0.35)
        ax.scatter([r["density"]], [r["recall"]], s=80, marker="*", color=pts.get_facecolor()[0],
                   edgecolor="k", label=f"{r['policy']} @ {r['length']}")
    ax.set_xlabel("density (computed / causal blocks)")
    ax.set_ylabel("attention recall (dense mass kept)")
    ax.set_xlim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_vs_length(path: str, rows: list[dict], configs: list[str], tasks: list[str],
                       title: str) -> None:
    """Accuracy against prompt length, one line per config with 95% Wilson error bars; one
    panel per task plus the pooled ``all`` panel. ``rows``: ``report.accuracy_rows`` output
    (keys config, task, length, accuracy, low, high; pooled lengths are skipped)."""
    plt = _plt()
    panels = ["all"] + list(tasks)
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.9 * nrows), squeeze=False)
    for ax, task in zip(axes.ravel(), panels):
        for i, config in enumerate(configs):
            pts = sorted((r["length"], r["accuracy"], r["low"], r["high"]) for r in rows
                         if r["config"] == config and r["task"] == task
                         and isinstance(r["length"], int))
            if not pts:
                continue
            x, y, lo, hi = (np.asarray(v, float) for v in zip(*pts))
            x = x * (1 + 0.03 * (i - (len(configs) - 1) / 2))  # spread overlapping error bars
            err = np.maximum(0.0, [y - lo, hi - y])  # rounding can leave -1e-17
            ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, lw=1.2,
                        label=config)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(task, fontsize=9)
        ax.grid(alpha=0.3)
        ax.set_xlabel("prompt tokens", fontsize=8)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("accuracy")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
