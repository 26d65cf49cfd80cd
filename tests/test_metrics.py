"""The shipped `evaluate` metric modules (moma_hf/evaluation/metric_scripts) against values worked out by hand, and
moma_hf.evaluation.metrics and plots."""

import json
import math
import os
import socket
import subprocess
import sys
from fractions import Fraction as F

import numpy as np
import pytest
from transformers import EvalPrediction

from moma_hf.evaluation import metrics as evaluation
from moma_hf.evaluation import plots
from moma_hf.evaluation.metric_scripts import METRIC_NAMES, METRICS_DIR, load_metric

# The worked example: 3 classes, 12 examples, confusion matrix (rows: reference, columns: prediction)
#     [[4, 1, 0],      row sums (support)      r = (5, 5, 2)
#      [2, 2, 1],      column sums (predicted) c = (6, 4, 2)
#      [0, 1, 1]]
REFERENCES = [0] * 5 + [1] * 5 + [2] * 2
PREDICTIONS = [0, 0, 0, 0, 1] + [0, 0, 1, 1, 2] + [1, 2]
MATRIX = [[4, 1, 0], [2, 2, 1], [0, 1, 1]]
# accuracy  = (4 + 2 + 1) / 12                                 = 7/12
# recall    = 4/5, 2/5, 1/2      -> balanced accuracy = 1.7 / 3 = 17/30
# F1_c      = 2 TP / (predicted + support) = 8/11, 4/9, 2/4 -> macro-F1 = (8/11 + 4/9 + 1/2) / 3 = 331/594
# kappa     p_o = 7/12, p_e = (5*6 + 5*4 + 2*2) / 12^2 = 54/144 = 3/8
#           (p_o - p_e) / (1 - p_e) = (5/24) / (5/8)           = 1/3
# quadratic w_ij = (i-j)^2 / (C-1)^2 = (i-j)^2 / 4; kappa = 1 - sum(w O) / sum(w E), O, E in counts / 12:
#           sum(w O): 5 disagreements, all between neighbours: 5 * 1/4 / 12       = 15/144
#           sum(w E) = sum w_ij r_i c_j / 12^2: neighbours (0,1) 20, (1,0) 30, (1,2) 10, (2,1) 8 -> 68 * 1/4 = 17,
#                      two apart (0,2) 10, (2,0) 12 -> 22 * 1 = 22; (17 + 22) / 144  = 39/144
#           1 - 15/39                                          = 8/13
# linear    w_ij = |i-j| / 2: sum(w O) = 5 * 1/2 / 12 = 30/144; sum(w E) = (68/2 + 22) / 144 = 56/144
#           1 - 30/56                                          = 13/28
EXPECTED = {
    "accuracy": F(7, 12), "balanced_accuracy": F(17, 30), "macro_f1": F(331, 594),
    "cohen_kappa": F(1, 3), "quadratic_kappa": F(8, 13),
}


def compute(name, predictions, references, **kwargs):
    return load_metric(name).compute(predictions=predictions, references=references, **kwargs)


def test_every_metric_loads_from_its_script_inside_the_package():
    for name in METRIC_NAMES:
        metric = load_metric(name)
        assert metric.name == name and (METRICS_DIR / name / f"{name}.py").is_file()
        assert load_metric(name) is metric  # loaded once per process


def test_worked_example_by_hand():
    assert compute("accuracy", PREDICTIONS, REFERENCES)["accuracy"] == pytest.approx(float(EXPECTED["accuracy"]))
    assert compute("balanced_accuracy", PREDICTIONS, REFERENCES)["balanced_accuracy"] == pytest.approx(17 / 30)
    assert compute("macro_f1", PREDICTIONS, REFERENCES)["macro_f1"] == pytest.approx(331 / 594)
    assert compute("cohen_kappa", PREDICTIONS, REFERENCES)["cohen_kappa"] == pytest.approx(1 / 3)
    assert compute("cohen_kappa", PREDICTIONS, REFERENCES, weights="quadratic")["cohen_kappa"] == pytest.approx(8 / 13)
    assert compute("cohen_kappa", PREDICTIONS, REFERENCES, weights="linear")["cohen_kappa"] == pytest.approx(13 / 28)
    matrix = compute("confusion_matrix", PREDICTIONS, REFERENCES)["confusion_matrix"]
    assert matrix.tolist() == MATRIX and matrix.dtype == np.int64
    per_class = compute("macro_f1", PREDICTIONS, REFERENCES, average=None)
    assert per_class["classes"] == [0, 1, 2] and per_class["f1"] == pytest.approx([8 / 11, 4 / 9, 1 / 2])


def test_quadratic_kappa_penalises_far_misses_more_than_near_misses():
    # Both have p_o = 1/2 with the same marginals; one misses by one grade, the other by three.
    references = [0, 1, 2, 3, 0, 1, 2, 3]
    near = [0, 1, 2, 3, 1, 0, 3, 2]
    far = [0, 1, 2, 3, 3, 2, 1, 0]
    plain = [compute("cohen_kappa", p, references)["cohen_kappa"] for p in (near, far)]
    quadratic = [compute("cohen_kappa", p, references, weights="quadratic")["cohen_kappa"] for p in (near, far)]
    assert plain[0] == pytest.approx(plain[1])
    # near: sum(w O) = 4 * 1/9 / 8; uniform marginals: sum(w E) = sum_ij (i-j)^2 / 9 / 16 = 40/144 -> 1 - 1/5 = 4/5
    # far: the misses are (0,3), (3,0) at 1 and (1,2), (2,1) at 1/9: (2 + 2/9) / 8 = 20/72 -> 1 - 1 = 0
    assert quadratic == pytest.approx([4 / 5, 0.0], abs=1e-12)


def test_perfect_agreement_gives_one_everywhere():
    labels = [0, 1, 2, 2, 1, 0, 2]
    for name, key in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced_accuracy"), ("macro_f1", "macro_f1")):
        assert compute(name, labels, labels)[key] == 1.0
    for weights in (None, "linear", "quadratic"):
        assert compute("cohen_kappa", labels, labels, weights=weights)["cohen_kappa"] == pytest.approx(1.0)
    assert compute("balanced_accuracy", labels, labels, adjusted=True)["balanced_accuracy"] == pytest.approx(1.0)


def test_chance_level_and_below():
    # Predictions independent of the references: p_o = 1/2 = p_e (marginals 1/2, 1/2 on both sides) -> kappa 0.
    references, predictions = [0, 0, 1, 1], [0, 1, 0, 1]
    assert compute("cohen_kappa", predictions, references)["cohen_kappa"] == 0.0
    # Always the same class: p_o = p_e = its share of the references, for any weights; exactly 0, not -2e-16.
    for weights in (None, "linear", "quadratic"):
        assert compute("cohen_kappa", [2] * 7, [0, 1, 2, 2, 1, 0, 0], weights=weights)["cohen_kappa"] == 0.0
    # Recalls 1/2, 1/2: balanced accuracy 1/2, adjusted (1/2 - 1/2) / (1 - 1/2) = 0.
    assert compute("balanced_accuracy", predictions, references)["balanced_accuracy"] == 0.5
    assert compute("balanced_accuracy", predictions, references, adjusted=True)["balanced_accuracy"] == 0.0
    # Always wrong on two balanced classes: p_o = 0, p_e = 1/2 -> kappa = -1.
    assert compute("cohen_kappa", [1, 0], [0, 1])["cohen_kappa"] == pytest.approx(-1.0)


def test_a_class_absent_from_both_sides():
    # Class 1 never occurs: refs [0, 0, 2, 2], preds [0, 2, 2, 2].
    references, predictions = [0, 0, 2, 2], [0, 2, 2, 2]
    assert compute("accuracy", predictions, references)["accuracy"] == 0.75
    assert compute("balanced_accuracy", predictions, references)["balanced_accuracy"] == 0.75  # recalls 1/2, 1
    # Averaged over the classes that occur: F1_0 = 2/(1+2), F1_2 = 4/(3+2) -> (2/3 + 4/5) / 2 = 11/15.
    assert compute("macro_f1", predictions, references)["macro_f1"] == pytest.approx(11 / 15)
    # p_o = 3/4, p_e = (2*1 + 2*3) / 16 = 1/2 -> 1/2. Quadratic: the one miss is two grades apart (w = 1):
    # sum(w O) = 1/4, sum(w E) = (2*3 + 2*1) / 16 = 1/2 -> 1/2 again (class 1's zero marginals add nothing).
    assert compute("cohen_kappa", predictions, references)["cohen_kappa"] == pytest.approx(0.5)
    assert compute("cohen_kappa", predictions, references, weights="quadratic")["cohen_kappa"] == pytest.approx(0.5)
    matrix = compute("confusion_matrix", predictions, references, num_labels=4)["confusion_matrix"]
    assert matrix.tolist() == [[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 2, 0], [0, 0, 0, 0]]


def test_a_class_only_predicted():
    # Class 2 is predicted once and never a reference: F1_2 = 0 counts in macro-F1, but it has no recall.
    references, predictions = [0, 0, 1, 1], [0, 2, 1, 1]
    assert compute("macro_f1", predictions, references)["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert compute("balanced_accuracy", predictions, references)["balanced_accuracy"] == pytest.approx(0.75)


def test_degenerate_and_invalid_inputs():
    # One and the same class on both sides: no expected disagreement, kappa undefined.
    assert math.isnan(compute("cohen_kappa", [1, 1], [1, 1])["cohen_kappa"])
    assert math.isnan(compute("balanced_accuracy", [0, 1], [0, 0], adjusted=True)["balanced_accuracy"])
    with pytest.raises(ValueError, match="weights"):
        compute("cohen_kappa", [0], [0], weights="cubic")
    with pytest.raises(ValueError, match="outside"):
        compute("confusion_matrix", [0, 3], [0, 1], num_labels=3)
    with pytest.raises(ValueError, match="at least one"):
        compute("accuracy", [], [])
    with pytest.raises(ValueError, match="Unknown metric"):
        load_metric("f2")


def test_metrics_load_offline_with_read_only_caches(monkeypatch, tmp_path):
    """No network and unwritable evaluate caches: the scripts are imported from a temporary folder instead."""
    import evaluate

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # nothing can be created below a file, even by root

    def no_network(*args, **kwargs):
        raise AssertionError("a metric tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", blocker / "modules")
    monkeypatch.setattr(evaluate.config, "HF_METRICS_CACHE", blocker / "metrics")
    load_metric.cache_clear()
    try:
        metric = load_metric("cohen_kappa")
        kappa = metric.compute(predictions=PREDICTIONS, references=REFERENCES, weights="quadratic")
    finally:
        load_metric.cache_clear()  # the other tests get metrics from the normal cache again
    assert type(metric).__module__.startswith("moma_hf_evaluate_modules.")  # imported from the temporary folder
    assert kappa["cohen_kappa"] == pytest.approx(8 / 13)


def test_no_script_shadows_the_evaluate_library():
    """`python examples/<script>.py` puts examples/ first on sys.path: no script there may be named evaluate.py."""
    examples = METRICS_DIR.parents[2] / "examples"
    assert not (examples / "evaluate.py").exists()
    found = subprocess.run([sys.executable, "-c", "import evaluate; print(evaluate.load.__module__)"], cwd=examples,
                           env={**os.environ, "PYTHONPATH": str(examples)}, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0 and found.stdout.strip() == "evaluate.loading", found.stderr


def test_evaluation_functions_use_the_modules():
    matrix = evaluation.confusion_matrix(np.array(PREDICTIONS), np.array(REFERENCES), num_labels=3)
    assert matrix.tolist() == MATRIX
    scores = evaluation.classification_metrics(matrix)
    assert set(scores) == set(evaluation.METRIC_KEYS)
    assert scores == pytest.approx({k: float(v) for k, v in EXPECTED.items()})
    logits = np.eye(3)[PREDICTIONS] + 0.1  # argmax gives PREDICTIONS
    compute_metrics = evaluation.make_compute_metrics(3)
    assert compute_metrics(EvalPrediction(predictions=logits, label_ids=np.array(REFERENCES))) == pytest.approx(scores)
    per_class = evaluation.per_class_metrics(matrix, ["a", "b", "c"])
    # precision = TP / column sum, recall = TP / row sum
    assert per_class["a"] == pytest.approx({"precision": 4 / 6, "recall": 4 / 5, "f1": 8 / 11, "support": 5})
    assert per_class["c"] == pytest.approx({"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2})
    assert np.mean([v["f1"] for v in per_class.values()]) == pytest.approx(scores["macro_f1"])


def test_save_evaluation_writes_the_report_files(tmp_path):
    metrics = {"eval_accuracy": 7 / 12}
    paths = evaluation.save_evaluation(tmp_path, metrics, np.array(MATRIX), ["a", "b", "c"])
    assert {p.name for p in tmp_path.iterdir()} == {
        "eval_results.json", "per_class_metrics.json", "confusion_matrix.json", "confusion_matrix.png"}
    assert json.loads(paths["results"].read_text()) == metrics
    assert json.loads(paths["matrix"].read_text()) == {"labels": ["a", "b", "c"], "matrix": MATRIX}
    assert json.loads(paths["per_class"].read_text())["b"]["support"] == 5
    assert paths["plot"].read_bytes().startswith(b"\x89PNG")


def test_drawing_the_figures_leaves_the_users_matplotlib_backend_and_figures_alone(tmp_path):
    """A notebook user picks a backend before importing moma_hf; importing the package and drawing every figure it
    writes (confusion matrix, training and learning curves, method comparison) must not switch it or leave figures
    open."""
    code = f"""
import matplotlib
matplotlib.use("svg")
import matplotlib.pyplot as plt
import numpy as np
import moma_hf
from moma_hf.commands import compare
from moma_hf.evaluation import metrics, model_card, plots
out = {str(tmp_path)!r}
metrics.save_evaluation(out, {{"eval_accuracy": 0.5}}, np.array({MATRIX}), ["a", "b", "c"])
assert plots.plot_training_curves([{{"step": 1, "loss": 2.0, "loss_ce": 1.5, "loss_fitnet": 0.5}}], out + "/curves.png")
rows = [{{"method": m, "seed": s, "accuracy": 0.5, "macro_f1": 0.4, "balanced_accuracy": 0.5}}
        for m in ("ce", "moma") for s in (0, 1)]
compare.summarise(rows, ["ce", "moma"], __import__("pathlib").Path(out), "t")
plots.plot_learning_curves({{"ce": [(50, 0.3), (100, 0.5)]}}, out + "/learning.png", "t\\nseed 0",
                           complete_runs={{"ce": [(50, 0.4), (100, 0.5)]}})
print(matplotlib.get_backend(), plt.get_fignums())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "svg []"
    assert all((tmp_path / name).read_bytes().startswith(b"\x89PNG")
               for name in ("confusion_matrix.png", "curves.png", "results.png", "learning.png"))


def test_training_curves_show_every_logged_loss_term(tmp_path):
    history = [{"step": s, "loss": 2.0 / s, "loss_ce": 1.0 / s, "loss_rkd": 0.5 / s, "learning_rate": 0.1}
               for s in (1, 2, 3)] + [{"step": 3, "eval_loss": 1.0}]
    assert plots.plot_training_curves(history, tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")
    assert plots.plot_training_curves([{"step": 1, "eval_loss": 1.0}], tmp_path / "none.png") is None
