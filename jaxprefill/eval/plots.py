"""PNG pictures (matplotlib, Agg): dense attention beside policy masks; density vs recall."""

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
