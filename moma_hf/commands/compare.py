"""`moma-compare`: which distillation strategy for which task: every method on the same labeled subsets, seeds
and budget.

    moma-compare --config examples/configs/scenario_same_task.yaml
    moma-compare --config ... --methods ce moma --seeds 0 1 2 --output_dir out/cmp

A scenario YAML names the data folder (imagefolder with train/ and test/), the teacher (a model path, or the
recipe to train one on the teacher's part of the training set, with an optional `grouping` of its classes),
the student architecture, the label budget, an optional `student_grouping` (the student learns coarser classes,
such as {S: ADENOMA, T: ADENOMA, V: ADENOMA}), the methods, the seeds and the `moma-distill` flags shared by every
run. Relative paths in it are read from the current folder.

A method may carry its own flags, such as "moma --attention_residual false". A variant that starts from another
student, "kd --student_model_name_or_path same-as-teacher" (the paper's setting: the student starts as the
teacher), is a starting point of its own.

The comparison is paired: for one seed every method sees the same labeled subset, the same data order and
the same student initialisation (all drawn from the seed), so the per-seed difference to `ce` isolates the
method. Beside mean +- std per method it reports the mean paired difference to the `ce` of the same starting
point ("ce --student_model_name_or_path same-as-teacher": fine-tuning the teacher) with its 95% t-interval.
Each seed also gets the teacher's linear probe (`moma-probe`: fitted on that seed's labeled images, scored on
the same test part, at the students' image size), a row paired with `ce` like a method; when it scores below
the CE student the table ends with a warning. A teacher with the student's classes also gets its own
classifier's score on the test part (`moma-evaluate`). `--no_probe` skips both.
Writes `results.csv`, `results.md` and `results.png` into the output folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shlex
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml
from transformers import AutoConfig

from moma_hf.commands import distill, evaluate, probe, train_teacher
from moma_hf.evaluation.metrics import classification_metrics
from moma_hf.evaluation.plots import plot_method_comparison
from moma_hf.training.run_folder import unfinished_run_flags

METRICS = ("accuracy", "macro_f1", "balanced_accuracy")
TEACHER_PROBE = "teacher (linear probe)"  # the results row of the teacher's probe, paired with ce like a method
TEACHER_OWN = "teacher (own head)"  # the teacher's own classifier, when its classes map onto the student's
UNLABELED = " + unlabeled"  # the suffix of a row that also learned from the unlabeled pool
STUDENT_FLAG = "--student_model_name_or_path"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def list_images(folder: Path) -> dict[str, list[Path]]:
    """`{class name: sorted image paths}` of an imagefolder split."""
    return {d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            for d in sorted(folder.iterdir()) if d.is_dir()}


def link_subset(files: dict[str, list[Path]], out: Path, grouping: dict[str, str] | None = None) -> Path:
    """An imagefolder of symlinks to `files` (optionally relabeled by `grouping`: class -> new class)."""
    for label, paths in files.items():
        target = out / (grouping or {}).get(label, label)
        target.mkdir(parents=True, exist_ok=True)
        for path in paths:
            link = target / f"{label}_{path.name}"
            if not link.exists():
                os.symlink(path.resolve(), link)
    return out


def stratified_split(files: dict[str, list[Path]], fraction: float, seed: int):
    """`(chosen, rest)`: `fraction` of each class drawn with `seed` (at least one image a class), and the rest."""
    chosen, rest = {}, {}
    for label, paths in files.items():
        shuffled = list(paths)
        random.Random(f"{seed}/{label}").shuffle(shuffled)
        count = max(1, round(fraction * len(shuffled)))
        chosen[label], rest[label] = sorted(shuffled[:count]), sorted(shuffled[count:])
    return chosen, rest


def prepare_teacher(spec: dict, teacher_part: Path, work: Path, test_files: dict[str, list[Path]]) -> str:
    """The teacher's path: `spec["path"]` as is, or a teacher trained once on `teacher_part` per `spec`.

    A trained teacher is scored on `test_files` (relabeled by `spec["grouping"]` like its training data) after
    training, and during it with `eval_strategy` in its `train_args`: its learning curve is in its
    `trainer_state.json`.
    """
    if "path" in spec:
        return str(Path(spec["path"]).resolve())
    out = work / "teacher"
    if not (out / "config.json").exists():
        grouping = spec.get("grouping")
        data = link_subset(list_images(teacher_part), work / "teacher_data", grouping)
        test = link_subset(test_files, work / "data" / "teacher_test_part", grouping)
        flags = [f"--{k}={v}" for k, v in spec.get("train_args", {}).items()]
        train_teacher.main(flags + [f"--train_dir={data}", f"--validation_dir={test}", f"--output_dir={out}",
                                    "--report_to=none"] + unfinished_run_flags(out))
    return str(out)


def variant_dir(variant: str) -> str:
    """The folder of a method variant: "moma --w_kd 0" runs in "moma_w_kd_0"."""
    return "_".join(token.lstrip("-") for token in shlex.split(variant))


def run_method(variant: str, seed: int, train_dir: Path, test_dir: Path, teacher: str, config: dict,
               out: Path, extra_flags: tuple[str, ...] = ()) -> dict[str, float]:
    """Distil (or train, for `ce`) one student with `moma-distill`; its test metrics.

    `variant` is a method name, optionally followed by `distill.py` flags that override the scenario's, such as
    "moma --attention_residual false"; `extra_flags` are added to every run (the unlabeled pool).
    """
    method, *extra = shlex.split(variant)
    results = out / "eval_results.json"
    if not results.exists():
        flags = {**config.get("distill_args", {}), "method": method, "seed": seed, "data_seed": seed,
                 "train_dir": train_dir, "validation_dir": test_dir, "teacher_model_name_or_path": teacher,
                 "student_model_name_or_path": config["student"], "output_dir": out, "report_to": "none",
                 "save_strategy": "no", "disable_tqdm": True}
        # A run stopped mid-way (SIGTERM, a crash) resumes from its last checkpoint, else starts again.
        code = distill.main([f"--{k}={v}" for k, v in flags.items()] + list(extra_flags) + extra
                                             + unfinished_run_flags(out))
        if code:
            raise RuntimeError(f"{variant} seed {seed} stopped with exit code {code}")
    metrics = json.loads(results.read_text())
    return {name: float(metrics[f"eval_{name}"]) for name in METRICS}


def probe_teacher(teacher: str, train_dir: Path, test_dir: Path, config: dict, out: Path) -> dict[str, float]:
    """The teacher's linear probe (`moma-probe`) fitted on one seed's labeled images and scored on the test part,
    at the students' image size; kept in `out` and reused."""
    results = out / probe.RESULTS_FILE
    if not results.exists():
        size = config.get("distill_args", {}).get("image_size")
        probe.run([f"--model_name_or_path={teacher}", f"--train_dir={train_dir}", f"--validation_dir={test_dir}",
                   f"--output_dir={out}"] + ([f"--image_size={size}"] if size else []))
    metrics = json.loads(results.read_text())
    return {name: float(metrics[name]) for name in METRICS}


def teacher_own_score(teacher: str, config: dict, out: Path) -> dict[str, float] | None:
    """The teacher's own classifier scored on the test part at the students' image size (`moma-evaluate`, kept in
    `out` and reused), or None when its classes do not map onto the student's.

    A teacher with the student's classes is scored as is. One that knows the finer classes of the test split, which
    `student_grouping` merges for the student, is scored on the test part in its own classes and its confusion
    matrix merged the same way: its predictions count as right when they fall in the true class's group.
    """
    teacher_classes = list(AutoConfig.from_pretrained(teacher).id2label.values())  # timm wrappers: label_names
    files, student_grouping = scenario_test_files(config), config.get("student_grouping") or {}
    student_classes = sorted({student_grouping.get(label, label) for label in files})
    if sorted(teacher_classes) == student_classes:  # scored on the student's test part as it is
        data_grouping, merge = student_grouping, {}
    elif sorted(teacher_classes) == sorted(files):  # scored in its finer classes, then merged
        data_grouping, merge = {}, student_grouping
    else:
        return None
    if not (out / "confusion_matrix.json").exists():
        size = config.get("distill_args", {}).get("image_size")
        data = link_subset(files, out / "test_part", data_grouping)
        evaluate.run([f"--model_name_or_path={teacher}", f"--data_dir={data}", "--split=train",
                      f"--output_dir={out}"] + ([f"--image_size={size}"] if size else []))
    saved = json.loads((out / "confusion_matrix.json").read_text())
    group = np.array([student_classes.index(merge.get(label, label)) for label in saved["labels"]])
    merged = np.zeros((len(student_classes), len(student_classes)), dtype=np.int64)
    np.add.at(merged, (group[:, None], group[None, :]), np.asarray(saved["matrix"], dtype=np.int64))
    metrics = classification_metrics(merged)
    return {name: float(metrics[name]) for name in METRICS}


def weak_teacher_warning(rows: list[dict]) -> str | None:
    """A warning when the teacher's linear probe scores below the CE student (mean macro-F1), else None."""
    def mean_f1(method):
        values = [row["macro_f1"] for row in rows if row["method"] == method]
        return float(np.mean(values)) if values else None

    teacher, ce = mean_f1(TEACHER_PROBE), mean_f1("ce")
    if teacher is None or ce is None or teacher >= ce:
        return None
    return (f"Warning: the teacher's linear probe ({100 * teacher:.1f} macro-F1) scores below the CE student "
            f"({100 * ce:.1f}) on these labels: distilling may transfer the teacher's mistakes.")


def starting_point(label: str) -> str | None:
    """The student a results row starts from: its variant's `--student_model_name_or_path` (such as
    "same-as-teacher"), or None for the scenario's own student (and for the teacher's rows)."""
    if label in (TEACHER_PROBE, TEACHER_OWN):
        return None
    tokens = shlex.split(label.removesuffix(UNLABELED))
    for i, token in enumerate(tokens):
        if token.startswith(STUDENT_FLAG + "="):
            return token.split("=", 1)[1]
        if token == STUDENT_FLAG and i + 1 < len(tokens):
            return tokens[i + 1]
    return None


def paired_reference(label: str, labels: list[str]) -> str | None:
    """The `ce` row that `label` is paired with: plain fine-tuning of the same starting point, trained on the
    labels alone (the one with fewest extra flags), or None when there is none or `label` is that row."""
    start = starting_point(label)
    candidates = [other for other in labels if not other.endswith(UNLABELED) and shlex.split(other)[0] == "ce"
                  and starting_point(other) == start]
    reference = min(candidates, key=lambda other: len(shlex.split(other)), default=None)
    return None if reference == label else reference


def t_quantile(dof: int) -> float:
    """The 97.5% quantile of Student's t with `dof` degrees of freedom (for a two-sided 95% interval)."""
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def paired_interval(diff: np.ndarray) -> str:
    """`diff` (one paired difference per seed, in points) as "mean [low, high]", its two-sided 95% t interval."""
    half = t_quantile(len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    return f"{diff.mean():+.1f} [{diff.mean() - half:+.1f}, {diff.mean() + half:+.1f}]"


def summarise(rows: list[dict], methods: list[str], out: Path, title: str, suffix: str = "",
              note: str | None = None) -> str:
    """Write `results{suffix}.md` (mean +- std per method, the paired difference to the `ce` of the same starting
    point with its 95% CI, and `note` below the table) and its `.png`."""
    by = defaultdict(dict)
    for row in rows:
        by[row["method"]][row["seed"]] = row
    seeds = sorted({row["seed"] for row in rows})
    lines = [f"# {title}", "", f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); test-split metrics in %.", "",
             "| method | " + " | ".join(METRICS) + " | macro_f1 - ce of its start (paired, 95% CI) |",
             "| --- |" + " --- |" * (len(METRICS) + 1)]
    for method in methods:
        cells = []
        for metric in METRICS:
            values = np.array([by[method][s][metric] for s in seeds]) * 100
            cells.append(f"{values.mean():.1f} ± {values.std(ddof=1) if len(values) > 1 else 0:.1f}")
        reference = paired_reference(method, methods)
        if reference is None:
            paired = "—"
        else:
            paired = paired_interval(np.array([by[method][s]["macro_f1"] - by[reference][s]["macro_f1"]
                                               for s in seeds]) * 100)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {paired} |")
    table = "\n".join(lines + ([f"\n{note}"] if note else [])) + "\n"
    (out / f"results{suffix}.md").write_text(table)
    scores = {m: {metric: [by[m][s][metric] for s in seeds] for metric in ("accuracy", "macro_f1")} for m in methods}
    plot_method_comparison(scores, out / f"results{suffix}.png", title)
    return table


def prepare_scenario(config: dict, out: Path) -> tuple[str, Path, dict[str, list[Path]]]:
    """`(teacher, test_dir, student_pool)` of a scenario: the teacher (trained once on its reserved part of the
    training split), the fixed test part (relabeled by `student_grouping`, if any), and the training images left
    for students (under their own class names: `labeled_subset` relabels them)."""
    data = Path(config["data_dir"]).resolve()
    teacher_files, student_pool = stratified_split(list_images(data / "train"), config["teacher_fraction"], 0)
    test_files, test_dir, grouping = scenario_test_files(config), data / "test", config.get("student_grouping")
    if config.get("test_fraction", 1.0) < 1.0 or grouping:
        test_dir = link_subset(test_files, out / "data" / "test_part", grouping)
    teacher_part = link_subset(teacher_files, out / "data" / "teacher_part")
    return prepare_teacher(config["teacher"], teacher_part, out, test_files), test_dir, student_pool


def scenario_test_files(config: dict) -> dict[str, list[Path]]:
    """`{class: images}` of the scenario's fixed test part, in the test split's own classes: `test_fraction` of each
    class (drawn with seed 0, the same for every run), or the whole split."""
    files, fraction = list_images(Path(config["data_dir"]).resolve() / "test"), config.get("test_fraction", 1.0)
    return stratified_split(files, fraction, 0)[0] if fraction < 1.0 else files


def labeled_subset(student_pool: dict[str, list[Path]], config: dict, seed: int, out: Path, tag: str = "") -> Path:
    """The folder of the labeled images that every method gets for `seed` (`tag` names another budget)."""
    labeled, _ = stratified_split(student_pool, config["label_budget"], seed)  # stratified by the finest classes
    return link_subset(labeled, out / "data" / f"labeled_seed{seed}{tag}", config.get("student_grouping"))


def unlabeled_pool(student_pool: dict[str, list[Path]], config: dict, seed: int, out: Path, tag: str) -> Path:
    """A flat folder (no class folders, numbered names) of the images left unlabeled for `seed`."""
    _, rest = stratified_split(student_pool, config["label_budget"], seed)
    folder = out / "data" / f"unlabeled_seed{seed}{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    for number, path in enumerate(p for label in sorted(rest) for p in rest[label]):
        link = folder / f"{number:06d}{path.suffix}"
        if not link.exists():
            os.symlink(os.path.abspath(path), link)
    return folder


def uses_unlabeled(variant: str) -> bool:
    """Whether a method can learn from unlabeled images (`ce` has no term without labels)."""
    return shlex.split(variant)[0] != "ce"


def main(argv: list[str] | None = None) -> int:
    """The `moma-compare` command: run the comparison and print its table; returns the exit code."""
    run(argv)
    return 0


def run(argv: list[str] | None = None) -> str:
    """Run the comparison a scenario YAML describes; returns the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--methods", nargs="+", help="Override the scenario's methods.")
    parser.add_argument("--seeds", nargs="+", type=int, help="Override the scenario's seeds (at least 3).")
    parser.add_argument("--output_dir", type=Path, help="Default: outputs/compare/<config name>.")
    parser.add_argument("--label_budget", type=float, help="Override the scenario's share of labeled images.")
    parser.add_argument("--unlabeled", action="store_true",
                        help="Give every method that can use them the rest of the student's images, unlabeled.")
    parser.add_argument("--labeled_fraction", type=float,
                        help="With --unlabeled: labeled share of each batch (default: the scenario's, else natural).")
    parser.add_argument("--no_probe", action="store_true",
                        help="Skip the teacher's linear probe and the score of its own classifier.")
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    methods, seeds = args.methods or config["methods"], args.seeds or config["seeds"]
    out = (args.output_dir or Path("outputs") / "compare" / args.config.stem).resolve()
    teacher, test_dir, student_pool = prepare_scenario(config, out)
    # Runs of another budget or with the unlabeled pool get their own folders and result files.
    tag = "" if args.label_budget in (None, config["label_budget"]) else f"_labels{args.label_budget:g}"
    config["label_budget"] = args.label_budget or config["label_budget"]
    fraction = args.labeled_fraction or config.get("labeled_fraction")
    title = config.get("title", args.config.stem) + (f", {config['label_budget']:.0%} labels" if tag else "")
    rows, own = [], None if args.no_probe else teacher_own_score(teacher, config, out / "teacher_eval")
    for seed in seeds:
        train_dir = labeled_subset(student_pool, config, seed, out, tag)
        if own is not None:  # one score, repeated for each seed so that it pairs with ce like a method
            rows.append({"method": TEACHER_OWN, "seed": seed, **own})
        if not args.no_probe:
            metrics = probe_teacher(teacher, train_dir, test_dir, config, out / f"seed{seed}{tag}" / "teacher_probe")
            rows.append({"method": TEACHER_PROBE, "seed": seed, **metrics})
            print(f"{TEACHER_PROBE} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
        pool_flags, pool_tag = (), "_unlabeled" + (f"{fraction:g}" if fraction else "")  # natural or a fraction
        if args.unlabeled:
            pool_flags = (f"--unlabeled_dir={unlabeled_pool(student_pool, config, seed, out, tag)}",)
            pool_flags += (f"--labeled_fraction={fraction}",) if fraction else ()
        for method in methods:
            extra = pool_flags if uses_unlabeled(method) else ()
            folder = variant_dir(method) + (pool_tag if extra else "")
            metrics = run_method(method, seed, train_dir, test_dir, teacher, config,
                                 out / f"seed{seed}{tag}" / folder, extra)
            label = method + (UNLABELED if extra else "")
            rows.append({"method": label, "seed": seed, **metrics})
            print(f"{label} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
    suffix = tag + ("_unlabeled" + (f"{fraction:g}" if fraction else "") if args.unlabeled else "")
    with open(out / f"results{suffix}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "seed", *METRICS])
        writer.writeheader()
        writer.writerows(rows)
    teacher_rows = (TEACHER_PROBE, TEACHER_OWN)  # last in the table
    labels = sorted(dict.fromkeys(row["method"] for row in rows), key=lambda label: label in teacher_rows)
    table = summarise(rows, labels, out, title, suffix, weak_teacher_warning(rows))
    print(table)
    return table


if __name__ == "__main__":
    sys.exit(main())
