"""Pictures: query result grids (like seed 003's top-10 strip) and precision-recall curves."""

from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def result_grid(
    query: np.ndarray,
    query_title: str,
    results: Sequence[Optional[np.ndarray]],
    titles: Sequence[str],
    out_png: os.PathLike,
    correct: Optional[Sequence[Optional[bool]]] = None,
    thumb: int = 220,
) -> None:
    """One row per query: the query, then its ranked results with their titles (label, score).

    ``correct[i]`` colours result ``i``'s frame green (relevant) or red (not); ``None`` leaves it plain.
    A result image that cannot be read any more is drawn as an empty panel.
    """
    plt = pyplot()
    n = 1 + len(results)
    fig, axes = plt.subplots(1, n, figsize=(2.3 * n, 2.6), squeeze=False)
    panels = [query] + list(results)
    heads = [query_title] + list(titles)
    for j, (ax, img, t) in enumerate(zip(axes[0], panels, heads)):
        if img is not None:
            ax.imshow(img)
        ax.set_title(t, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        color = None
        if j == 0:
            color = "#1f77b4"
        elif correct is not None and correct[j - 1] is not None:
            color = "#2ca02c" if correct[j - 1] else "#d62728"
        for s in ax.spines.values():
            s.set_visible(color is not None)
            if color:
                s.set_color(color)
                s.set_linewidth(3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def pr_plot(curves: Dict[str, np.ndarray], out_png: os.PathLike, title: str = "") -> None:
    """Mean interpolated precision at 11 recall levels, one line per name."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    levels = np.linspace(0, 1, 11)
    for name, prec in curves.items():
        ax.plot(levels, prec, marker="o", ms=3, label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("interpolated precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
