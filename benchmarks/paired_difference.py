"""The paired difference between any two rows of `moma-compare` results, with its 95% interval.

    python benchmarks/paired_difference.py --row outputs/issue18/label_budget/results.csv "moma --max_steps 725" \
        --row outputs/issue18/label_budget/results.csv "rkd --max_steps 725"

`moma-compare` pairs every row with the `ce` of its own starting point only. This pairs row A with row B, seed by
seed, from the `results*.csv` files that `moma-compare` wrote (the two may come from different runs or budgets:
each seed draws the same labels in every run of a scenario), and prints A - B over their common seeds in points,
computed as in the tables.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from moma_hf.commands.compare import METRICS, paired_interval


def seed_scores(results: Path, label: str, metric: str) -> dict[int, float]:
    """`{seed: metric}` of the row `label` in a `moma-compare` results CSV."""
    with open(results, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["method"] == label]
    if not rows:
        raise SystemExit(f"No row {label!r} in {results}.")
    return {int(row["seed"]): float(row[metric]) for row in rows}


def paired_difference(a: dict[int, float], b: dict[int, float]) -> tuple[str, list[int]]:
    """`("mean [low, high]" of a - b in points, the seeds they share)`."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise SystemExit("The two rows share no seed.")
    return paired_interval(np.array([a[s] - b[s] for s in seeds]) * 100), seeds


def main(argv: list[str] | None = None) -> None:
    """Print the paired difference of the two `--row`s."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--row", nargs=2, action="append", metavar=("CSV", "METHOD"), required=True,
                        help="A results CSV and a method label in it; give two: A, then B.")
    parser.add_argument("--metric", default="macro_f1", choices=METRICS)
    args = parser.parse_args(argv)
    if len(args.row) != 2:
        parser.error("give exactly two --row CSV METHOD")
    (file_a, label_a), (file_b, label_b) = args.row
    interval, seeds = paired_difference(seed_scores(Path(file_a), label_a, args.metric),
                                        seed_scores(Path(file_b), label_b, args.metric))
    print(f"{label_a} - {label_b} ({args.metric}, seeds {', '.join(map(str, seeds))}): {interval}")


if __name__ == "__main__":
    main()
