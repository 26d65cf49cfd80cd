"""Where the methods of a `moma-compare` run go wrong: each method's test confusion matrix, summed over the seeds.

    python benchmarks/compare_confusions.py outputs/issue18/relevant_task

A mean macro-F1 says that a method lost, not where. Summing the confusion matrices that every run saved
(`seed<S>/<variant>/confusion_matrix.json`, rows true, columns predicted) shows which classes it confuses, and
comparing them with the teacher's (`teacher_eval/confusion_matrix.json`, when `moma-compare` scored its own head)
shows whether a distilled student has taken on the teacher's mistakes. Prints, for each method (folder) present
for every seed, and for the teacher when its classes are the student's, the share of each true class predicted as
each other class, as a markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

TEACHER_ROW = "teacher (own head)"


def summed_confusions(run: Path) -> tuple[list[str], dict[str, np.ndarray], int]:
    """`(labels, {variant folder: matrix summed over seeds}, seeds)` of the variants that every seed has."""
    seeds = sorted(run.glob("seed[0-9]*"))
    if not seeds:
        raise SystemExit(f"No seed<S> folders in {run}: give the --output_dir of a moma-compare run.")
    common = set.intersection(*({p.parent.name for p in seed.glob("*/confusion_matrix.json")} for seed in seeds))
    labels, totals = None, {}
    for variant in sorted(common):
        for seed in seeds:
            saved = json.loads((seed / variant / "confusion_matrix.json").read_text())
            if labels not in (None, saved["labels"]):
                raise SystemExit(f"{seed / variant} has the labels {saved['labels']}, the others {labels}.")
            labels = saved["labels"]
            totals[variant] = totals.get(variant, 0) + np.asarray(saved["matrix"], dtype=np.int64)
    teacher = run / "teacher_eval" / "confusion_matrix.json"  # the teacher's own head, scored once
    saved = json.loads(teacher.read_text()) if teacher.exists() else {}
    if saved.get("labels") == labels:
        totals[TEACHER_ROW] = np.asarray(saved["matrix"], dtype=np.int64)
    return labels or [], totals, len(seeds)


def confusion_table(labels: list[str], totals: dict[str, np.ndarray]) -> str:
    """A markdown table: one row per variant, one column per (true, predicted) pair of different classes, each
    cell the percentage of that true class's patches predicted as that class."""
    pairs = [(i, j) for i in range(len(labels)) for j in range(len(labels)) if i != j]
    lines = ["| variant | " + " | ".join(f"{labels[i]}→{labels[j]}" for i, j in pairs) + " |",
             "| --- |" + " --- |" * len(pairs)]
    for variant, matrix in totals.items():
        shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        lines.append(f"| {variant} | " + " | ".join(f"{100 * shares[i, j]:.1f}" for i, j in pairs) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Print the table of a `moma-compare` output folder; returns it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="The --output_dir of a moma-compare run.")
    args = parser.parse_args(argv)
    labels, totals, seeds = summed_confusions(args.run)
    table = f"Summed over {seeds} seeds (% of each true class):\n\n" + confusion_table(labels, totals)
    print(table)
    return table


if __name__ == "__main__":
    main()
