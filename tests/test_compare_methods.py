"""The comparison harness: paired subsets, and the paired statistics against a hand computation."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import timm_classifier
from sklearn.metrics import f1_score

from moma_hf.commands import compare


def test_subsets_are_stratified_seeded_and_shared_by_every_method(crc_polyp_dir, tmp_path):
    files = compare.list_images(crc_polyp_dir / "test")
    first, rest = compare.stratified_split(files, 0.01, seed=3)
    again, _ = compare.stratified_split(files, 0.01, seed=3)
    other, _ = compare.stratified_split(files, 0.01, seed=4)
    assert first == again and first != other  # one draw per seed, the same whichever method asks
    assert {k: len(v) for k, v in first.items()} == {"AC": 10, "H": 10, "S": 5, "T": 6, "V": 6}
    assert all(not set(first[k]) & set(rest[k]) and len(first[k]) + len(rest[k]) == len(files[k]) for k in files)
    folder = compare.link_subset(first, tmp_path / "coarse", {"S": "ADENOMA", "T": "ADENOMA", "V": "ADENOMA"})
    assert sorted(p.name for p in folder.iterdir()) == ["AC", "ADENOMA", "H"]
    assert len(list((folder / "ADENOMA").iterdir())) == 17


def test_the_table_reports_means_and_the_paired_difference_to_ce_with_a_t_interval(tmp_path):
    ce = [0.50, 0.60, 0.55]
    moma = [0.56, 0.63, 0.62]
    rows = [{"method": m, "seed": s, "accuracy": v, "macro_f1": v, "balanced_accuracy": v}
            for m, values in (("ce", ce), ("moma", moma)) for s, v in enumerate(values)]
    table = compare.summarise(rows, ["ce", "moma"], tmp_path, "test")
    # Differences 6, 3, 7 points: mean 5.333, sample std 2.082, t(0.975, 2) = 4.303 -> half-width 5.172.
    assert "| moma | 60.3 ± 3.8 |" in table
    assert "+5.3 [+0.2, +10.5]" in table
    assert compare.t_quantile(2) == pytest.approx(4.3027, abs=1e-4)
    assert (tmp_path / "results.png").stat().st_size > 0


def test_any_two_rows_of_two_results_files_are_paired_over_their_common_seeds(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "paired_difference.py"
    header = "method,seed,accuracy,macro_f1,balanced_accuracy\n"
    for name, method, values in (("a", "moma", [0.56, 0.63, 0.62, 0.9]), ("b", "rkd", [0.50, 0.60, 0.55])):
        (tmp_path / f"{name}.csv").write_text(header + "".join(f"{method},{s},0,{v},0\n" for s, v in enumerate(values)))
    run = subprocess.run([sys.executable, str(script), "--row", str(tmp_path / "a.csv"), "moma",
                          "--row", str(tmp_path / "b.csv"), "rkd"], capture_output=True, text=True, check=True)
    # Seed 3 is in one file only. Differences 6, 3, 7 points, as in the table test above: +5.3 [+0.2, +10.5].
    assert run.stdout.strip() == "moma - rkd (macro_f1, seeds 0, 1, 2): +5.3 [+0.2, +10.5]"
    missing = subprocess.run([sys.executable, str(script), "--row", str(tmp_path / "a.csv"), "kd",
                              "--row", str(tmp_path / "b.csv"), "rkd"], capture_output=True, text=True)
    assert missing.returncode != 0 and f"No row 'kd' in {tmp_path / 'a.csv'}." in missing.stderr


def _rows(method_values: dict[str, list[float]]) -> list[dict]:
    return [{"method": m, "seed": s, "accuracy": v, "macro_f1": v, "balanced_accuracy": v}
            for m, values in method_values.items() for s, v in enumerate(values)]


def test_a_teacher_whose_probe_is_below_the_ce_student_is_warned_about_in_the_table(tmp_path):
    weak = _rows({"ce": [0.50, 0.60, 0.55], compare.TEACHER_PROBE: [0.45, 0.47, 0.46]})
    warning = compare.weak_teacher_warning(weak)
    assert warning.startswith("Warning: the teacher's linear probe (46.0 macro-F1) scores below the CE student (55.0)")
    table = compare.summarise(weak, ["ce", compare.TEACHER_PROBE], tmp_path, "test", note=warning)
    assert table.rstrip().endswith("may transfer the teacher's mistakes.")
    assert "| teacher (linear probe) | 46.0 ± 1.0 |" in table  # paired with ce like any method: -9.0 points
    assert "-9.0 [" in table
    strong = _rows({"ce": [0.50, 0.60, 0.55], compare.TEACHER_PROBE: [0.70, 0.72, 0.71]})
    assert compare.weak_teacher_warning(strong) is None
    assert compare.weak_teacher_warning(_rows({compare.TEACHER_PROBE: [0.1]})) is None  # no ce row to compare


def test_the_teacher_probe_of_a_seed_runs_once_at_the_students_image_size(tmp_path):
    demo = Path(__file__).resolve().parents[1] / "examples"
    config = {"distill_args": {"image_size": 112}}
    out = tmp_path / "seed0" / "teacher_probe"
    first = compare.probe_teacher(str(demo / "demo_teacher"), demo / "demo_data" / "train",
                                  demo / "demo_data" / "validation", config, out)
    saved = json.loads((out / "probe_results.json").read_text())
    assert saved["image_size"] == 112 and saved["eval_images"] == 38
    assert first == {name: saved[name] for name in compare.METRICS}
    stamp = (out / "probe_results.json").stat().st_mtime_ns
    assert compare.probe_teacher("no-such-teacher", Path("nowhere"), Path("nowhere"), config, out) == first
    assert (out / "probe_results.json").stat().st_mtime_ns == stamp  # reused, not recomputed


def test_each_row_is_paired_with_the_ce_of_its_own_starting_point(tmp_path):
    same = "--student_model_name_or_path same-as-teacher"
    rows = _rows({"ce": [0.50, 0.60, 0.55], "moma": [0.56, 0.63, 0.62], f"ce {same}": [0.70, 0.72, 0.71],
                  f"moma {same} --teacher_update momentum": [0.71, 0.75, 0.70],
                  "kd --student_model_name_or_path=same-as-teacher": [0.70, 0.72, 0.71],
                  "kd --student_model_name_or_path resnet18": [0.1, 0.2, 0.3]})
    labels = list(dict.fromkeys(row["method"] for row in rows))
    table = compare.summarise(rows, labels, tmp_path, "test")
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert lines["moma"].endswith("| +5.3 [+0.2, +10.5] |")  # against the from-scratch ce, as before
    # Against fine-tuning the teacher: differences 1, 3, -1 points, std 2.0, half-width 4.303 * 2 / sqrt(3) = 4.97.
    assert lines[f"moma {same} --teacher_update momentum"].endswith("| +1.0 [-4.0, +6.0] |")
    assert lines["kd --student_model_name_or_path=same-as-teacher"].endswith("| +0.0 [+0.0, +0.0] |")
    assert lines[f"ce {same}"].endswith("| — |") and lines["ce"].endswith("| — |")
    assert lines["kd --student_model_name_or_path resnet18"].endswith("| — |")  # no ce of that start: not paired
    assert compare.paired_reference(f"moma {same} + unlabeled", labels) == f"ce {same}"
    assert compare.paired_reference(compare.TEACHER_PROBE, labels) == "ce"


def _scenario_over(test_split: Path, root: Path) -> dict:
    """A scenario config whose test split is `test_split` (linked as `root/test`), seen at 112 px."""
    root.mkdir(parents=True)
    (root / "test").symlink_to(test_split)
    return {"data_dir": str(root), "distill_args": {"image_size": 112}}


def test_a_teacher_with_the_students_classes_is_scored_with_its_own_head_and_others_are_not(tmp_path):
    demo = Path(__file__).resolve().parents[1] / "examples"
    config = _scenario_over(demo / "demo_data" / "validation", tmp_path / "data")
    teacher, out = str(demo / "demo_teacher"), tmp_path / "teacher_eval"
    own = compare.teacher_own_score(teacher, config, out)
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["image_size"] == 112 and saved["eval_samples"] == 38
    assert own == pytest.approx({name: saved[f"eval_{name}"] for name in compare.METRICS})
    one_class = compare.link_subset({"ADI": sorted((demo / "demo_data" / "validation" / "ADI").iterdir())},
                                    tmp_path / "one_class")
    fewer = _scenario_over(one_class, tmp_path / "fewer")
    assert compare.teacher_own_score(teacher, fewer, tmp_path / "other") is None  # other classes: no row
    assert not (tmp_path / "other").exists()
    timm_teacher = tmp_path / "timm_teacher"  # its config.json keeps label_names, not id2label
    timm_classifier().save_pretrained(timm_teacher)
    timm_own = compare.teacher_own_score(str(timm_teacher), {**config, "distill_args": {"image_size": 64}},
                                         tmp_path / "timm_eval")
    assert set(timm_own) == set(compare.METRICS)


def test_a_teacher_of_finer_classes_is_scored_in_the_students_groups(tmp_path):
    demo = Path(__file__).resolve().parents[1] / "examples"
    teacher, plain = str(demo / "demo_teacher"), _scenario_over(demo / "demo_data" / "validation", tmp_path / "data")
    compare.teacher_own_score(teacher, plain, tmp_path / "fine")
    fine = json.loads((tmp_path / "fine" / "confusion_matrix.json").read_text())
    grouping = {"ADI": "STROMA_OR_FAT", "STR": "STROMA_OR_FAT", "MUS": "STROMA_OR_FAT", "NORM": "MUCOSA",
                "TUM": "MUCOSA"}
    grouped = compare.teacher_own_score(teacher, {**plain, "student_grouping": grouping}, tmp_path / "grouped")
    # Independently: every (true, predicted) pair of the 9-class matrix, both mapped to their group.
    fine_pairs = [(t, p) for i, t in enumerate(fine["labels"]) for j, p in enumerate(fine["labels"])
                  for _ in range(fine["matrix"][i][j])]
    pairs = [(grouping.get(t, t), grouping.get(p, p)) for t, p in fine_pairs]
    assert len(pairs) == 38
    assert grouped["accuracy"] == pytest.approx(np.mean([t == p for t, p in pairs]))
    assert grouped["macro_f1"] == pytest.approx(f1_score(*zip(*pairs), average="macro"))
    assert grouped["macro_f1"] != pytest.approx(f1_score(*zip(*fine_pairs), average="macro"))  # the merge counts


def test_a_student_grouping_relabels_the_labeled_subsets_and_the_test_part(crc_polyp_dir, tmp_path):
    demo_teacher = Path(__file__).resolve().parents[1] / "examples" / "demo_teacher"
    config = {"data_dir": str(crc_polyp_dir), "teacher_fraction": 0.5, "label_budget": 0.01, "test_fraction": 0.01,
              "teacher": {"path": str(demo_teacher)},
              "student_grouping": {"S": "ADENOMA", "T": "ADENOMA", "V": "ADENOMA"}}
    teacher, test_dir, pool = compare.prepare_scenario(config, tmp_path)
    assert teacher == str(demo_teacher.resolve())
    assert sorted(compare.list_images(test_dir)) == ["AC", "ADENOMA", "H"]
    assert len(compare.list_images(test_dir)["ADENOMA"]) == 17  # 5 + 6 + 6 of the fixed 1% test part
    assert sorted(pool) == ["AC", "H", "S", "T", "V"]  # drawn per fine class, relabeled when linked
    labeled = compare.list_images(compare.labeled_subset(pool, config, 0, tmp_path))
    fine, _ = compare.stratified_split(pool, 0.01, 0)
    assert sorted(labeled) == ["AC", "ADENOMA", "H"]
    assert len(labeled["ADENOMA"]) == len(fine["S"]) + len(fine["T"]) + len(fine["V"])


def test_the_confusion_benchmark_sums_each_methods_matrices_over_seeds(tmp_path):
    def save(folder, matrix, labels=("A", "B")):
        folder.mkdir(parents=True)
        (folder / "confusion_matrix.json").write_text(json.dumps({"labels": list(labels), "matrix": matrix}))

    save(tmp_path / "seed0" / "ce", [[3, 1], [0, 4]])
    save(tmp_path / "seed1" / "ce", [[1, 3], [2, 2]])
    save(tmp_path / "seed0" / "moma", [[4, 0], [1, 3]])  # only one seed: left out
    save(tmp_path / "teacher_eval", [[9, 1], [5, 5]])
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_confusions.py"
    table = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                           check=True).stdout
    # ce over both seeds: A row 4 right, 4 wrong (50.0% A→B); B row 2 wrong of 8 (25.0% B→A).
    assert "| ce | 50.0 | 25.0 |" in table and "| moma |" not in table
    assert "Summed over 2 seeds" in table and "| 10.0 | 50.0 |" in table  # the teacher's own head
