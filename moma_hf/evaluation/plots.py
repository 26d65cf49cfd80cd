"""Figures saved next to the results: training curves and the confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CURVE_KEYS = ("loss", "loss_ce", "loss_kd", "loss_moma")


def plot_training_curves(log_history: list[dict], path: str | Path) -> Path | None:
    """Plot each logged loss term against the step; returns the PNG path, or None when nothing was logged."""
    series = {key: [(h["step"], h[key]) for h in log_history if key in h] for key in CURVE_KEYS}
    series = {key: points for key, points in series.items() if points}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for key, points in series.items():
        steps, values = zip(*points)
        ax.plot(steps, values, label=key, marker="." if len(points) < 30 else None)
    ax.set(xlabel="optimiser step", ylabel="loss", title="Training losses")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_confusion_matrix(matrix: np.ndarray, labels: list[str], path: str | Path, title: str = "") -> Path:
    """Plot a `(C, C)` confusion matrix (rows: true class, columns: predicted), counts and row-normalised colour."""
    matrix = np.asarray(matrix)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.45 * len(labels)
    fig, ax = plt.subplots(figsize=(size, size), dpi=110)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, rotation=45, ha="right")
    ax.set_yticks(ticks, labels)
    for i, j in np.ndindex(matrix.shape):
        ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8,
                color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title or "Confusion matrix")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
