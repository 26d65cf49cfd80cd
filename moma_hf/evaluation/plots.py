"""Figures saved next to the results: training curves, the confusion matrix, a comparison of methods and learning
curves (a score against the step).

Every figure is a `matplotlib.figure.Figure` saved with `Figure.savefig` (the Agg canvas), never through pyplot: pyplot
keeps global state (the current figure, the backend), and importing or using this module must leave a notebook
user's backend and open figures as they were.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

CURVE_KEYS = ("loss", "loss_ce", "loss_kd", "loss_moma")  # first in the legend; other `loss_*` terms follow


def plot_training_curves(log_history: list[dict], path: str | Path) -> Path | None:
    """Plot the total loss and each logged `loss_*` term against the step; returns the PNG path, or None when nothing
    was logged."""
    logged = dict.fromkeys(k for h in log_history for k in h if k == "loss" or k.startswith("loss_"))
    keys = [k for k in CURVE_KEYS if k in logged] + [k for k in logged if k not in CURVE_KEYS]
    series = {key: [(h["step"], h[key]) for h in log_history if key in h and "step" in h] for key in keys}
    series = {key: points for key, points in series.items() if points}
    if not series:
        return None
    fig = Figure(figsize=(6, 3.6), dpi=110)
    ax = fig.subplots()
    for key, points in series.items():
        steps, values = zip(*points)
        ax.plot(steps, values, label=key, marker="." if len(points) < 30 else None)
    ax.set(xlabel="optimiser step", ylabel="loss", title="Training losses")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_confusion_matrix(matrix: np.ndarray, labels: list[str], path: str | Path, title: str = "") -> Path:
    """Plot a `(C, C)` confusion matrix (rows: true class, columns: predicted), counts and row-normalised colour."""
    matrix = np.asarray(matrix)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.45 * len(labels)
    fig = Figure(figsize=(size, size), dpi=110)
    ax = fig.subplots()
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, rotation=45, ha="right")
    ax.set_yticks(ticks, labels)
    for i, j in np.ndindex(matrix.shape):
        ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8,
                color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title or "Confusion matrix")
    return _save(fig, path)


def plot_method_comparison(scores: dict[str, dict[str, list[float]]], path: str | Path, title: str = "") -> Path:
    """Bars of the mean score (%) of each method, one bar per metric, with the standard deviation over seeds.

    Args:
        scores: `{method: {metric: [score of each seed, in 0..1]}}`, methods in the order shown; every method has
            the same metrics.
    """
    methods = list(scores)
    metrics = list(scores[methods[0]]) if methods else []
    width = 0.8 / max(len(metrics), 1)
    fig = Figure(figsize=(1.2 * len(methods) + 2, 3.5), dpi=120)
    ax = fig.subplots()
    for index, metric in enumerate(metrics):
        values = [100 * np.asarray(scores[m][metric], dtype=float) for m in methods]
        offset = (index - (len(metrics) - 1) / 2) * width
        ax.bar(np.arange(len(methods)) + offset, [v.mean() for v in values], width=width, label=metric,
               yerr=[v.std(ddof=1) if len(v) > 1 else 0 for v in values], capsize=3)
    ax.set_xticks(np.arange(len(methods)), methods)
    ax.set_ylabel("% on the test split")
    ax.set_title(title)
    ax.legend(loc="lower right")
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    """Lay out and write `fig` as a PNG at `path`; the figure is not registered anywhere, so nothing stays open."""
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_learning_curves(curves: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "",
                         ylabel: str = "macro-F1 (%)",
                         complete_runs: dict[str, list[tuple[int, float]]] | None = None) -> Path:
    """One line per run of a score against the optimiser step, and optionally, in the same colour, squares joined
    by a dashed line for the final scores of complete runs of several budgets.

    Args:
        curves: `{label: [(step, score in 0..1), ...]}`, steps increasing; plotted in %.
        complete_runs: `{label: [(budget, final score in 0..1), ...]}` for labels of `curves`.
    """
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.subplots()
    for label, points in curves.items():
        steps, values = zip(*points)
        line = ax.plot(steps, 100 * np.asarray(values), label=label, marker=".", alpha=0.6)[0]
        if (complete_runs or {}).get(label):
            budgets, finals = zip(*sorted(complete_runs[label]))
            ax.plot(budgets, 100 * np.asarray(finals), color=line.get_color(), marker="s", linestyle="--")
    ax.set(xlabel="optimiser step", ylabel=ylabel)
    ax.set_title("\n".join(textwrap.fill(line, 90) for line in title.split("\n")), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
