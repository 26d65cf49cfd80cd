"""Learning curves of a scenario: test macro-F1 against the optimiser step, to choose the comparison's step budget.

    python benchmarks/learning_curves.py --config examples/configs/scenario_same_task.yaml --seed 0 \
        --max_steps 600 --eval_steps 50 --output_dir outputs/compare/scenario_same_task

Each variant (default: `ce` and `moma` from the scenario's student and from the teacher, the paper's setting) trains
once for `--max_steps` with the scenario's flags, its learning-rate schedule stretched over that budget, and is
scored on the scenario's test part every `--eval_steps` steps (`--eval_strategy steps`). The runs share the
scenario's teacher, labeled subset and seed with `moma-compare`, so the same `--output_dir` reuses its teacher.

A point of such a curve is not the score of a run with that budget: a shorter run would have decayed its learning
rate sooner. So `--budgets 200 400` also trains each variant to completion at those budgets, and the figure marks
their final scores (squares) on the curve of the longest run (line). Together they say where scores stop rising;
the comparison then runs at the chosen budget.

Writes `curves/seed<S>/learning_curves.csv` (variant, step, whether the point ends a complete run, metrics) and
`learning_curves.png`, and prints, for
each variant, its final score, its best score and the first step from which every later evaluation stays within
`--tolerance` points of the final one.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import yaml

from moma_hf.commands.compare import METRICS, labeled_subset, prepare_scenario, run_method, variant_dir
from moma_hf.evaluation.plots import plot_learning_curves

SAME = "--student_model_name_or_path same-as-teacher"
DEFAULT_VARIANTS = ("ce", "moma", f"ce {SAME}", f"moma {SAME}")  # a same-as-teacher moma runs in momentum mode


def eval_history(run_dir: Path) -> list[dict]:
    """`[{"step": s, metric: value, ...}]` of every evaluation logged during the run (`trainer_state.json`)."""
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return [{"step": h["step"], **{m: h[f"eval_{m}"] for m in METRICS}} for h in history if "eval_macro_f1" in h]


def settled_step(points: list[tuple[int, float]], tolerance: float) -> int:
    """The first step from which every later score is within `tolerance` (0..1) of the last one."""
    final = points[-1][1]
    settled = points[-1][0]
    for step, value in reversed(points):
        if abs(value - final) > tolerance:
            break
        settled = step
    return settled


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    """Run (or reuse) each variant's long run and write the curves; returns `{variant: eval history}`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--max_steps", type=int, default=600)
    parser.add_argument("--eval_steps", type=int, default=50)
    parser.add_argument("--budgets", nargs="*", type=int, default=[],
                        help="Shorter complete runs of each variant, scored at their end only.")
    parser.add_argument("--tolerance", type=float, default=1.0, help="Points of macro-F1 (see settled_step).")
    parser.add_argument("--output_dir", type=Path, help="Default: outputs/compare/<config name>.")
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    out = (args.output_dir or Path("outputs") / "compare" / args.config.stem).resolve()
    teacher, test_dir, student_pool = prepare_scenario(config, out)
    train_dir = labeled_subset(student_pool, config, args.seed, out)
    folder = out / "curves" / f"seed{args.seed}"
    flags = (f"--max_steps={args.max_steps}", "--eval_strategy=steps", f"--eval_steps={args.eval_steps}")
    histories, finals = {}, {}
    for variant in args.variants:
        run_dir = folder / f"{variant_dir(variant)}_steps{args.max_steps}"
        run_method(variant, args.seed, train_dir, test_dir, teacher, config, run_dir, flags)
        histories[variant] = eval_history(run_dir)
        finals[variant] = [{"step": budget, **run_method(variant, args.seed, train_dir, test_dir, teacher, config,
                                                          folder / f"{variant_dir(variant)}_steps{budget}",
                                                          (f"--max_steps={budget}",))}
                           for budget in sorted(args.budgets)]
    with open(folder / "learning_curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["variant", "step", "complete_run", *METRICS])
        writer.writeheader()
        writer.writerows({"variant": v, "complete_run": False, **point} for v, history in histories.items()
                         for point in history)
        writer.writerows({"variant": v, "complete_run": True, **point} for v, points in finals.items()
                         for point in points)
    curves = {v: [(h["step"], h["macro_f1"]) for h in history] for v, history in histories.items()}
    ends = {v: [(p["step"], p["macro_f1"]) for p in points] + curves[v][-1:] for v, points in finals.items()}
    title = f"{config.get('title', args.config.stem)}\nseed {args.seed}, cosine schedule over {args.max_steps} steps"
    short = {v: v.replace(SAME, "(from the teacher)") for v in curves}  # legend labels that fit the figure
    plot_learning_curves({short[v]: points for v, points in curves.items()}, folder / "learning_curves.png", title,
                         complete_runs={short[v]: points for v, points in ends.items()})
    print(f"| variant | final macro-F1 | best (step) | within {args.tolerance:g} points of the final from step | "
          "complete runs (steps: macro-F1) |")
    print("| --- | --- | --- | --- | --- |")
    for variant, points in curves.items():
        best = max(points, key=lambda point: point[1])
        shorter = ", ".join(f"{step}: {100 * value:.1f}" for step, value in ends[variant])
        print(f"| {variant} | {100 * points[-1][1]:.1f} | {100 * best[1]:.1f} ({best[0]}) | "
              f"{settled_step(points, args.tolerance / 100)} | {shorter} |")
    print(f"Wrote {folder / 'learning_curves.csv'} and {folder / 'learning_curves.png'}")
    return histories


if __name__ == "__main__":
    main()
