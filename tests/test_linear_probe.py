"""The linear probe (moma_hf.evaluation.linear_probe) and `moma-probe`, on real patches: the bundled demo teacher's
embedding of the demo data (91 training and 38 validation patches), checked against scikit-learn."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, shared_data
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score
from sklearn.preprocessing import StandardScaler

from moma_hf.commands import probe as probe_command
from moma_hf.data import UNREADABLE, DataArguments, build_collators, load_datasets
from moma_hf.evaluation.linear_probe import (
    PROBE_PROTOCOL,
    ProbeSettings,
    extract_embeddings,
    fit_linear_probe,
    probe_scores,
    run_linear_probe,
    stratified_split,
)
from moma_hf.networks.backbones import pooled_features
from moma_hf.networks.teachers import load_teacher

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DEMO_TEACHER, DEMO_DATA = EXAMPLES / "demo_teacher", EXAMPLES / "demo_data"
NUM_LABELS = 9


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(str(DEMO_TEACHER))


@pytest.fixture(scope="module")
def demo_loaders(teacher):
    """DataLoaders of the demo train/ and validation/ splits, as the probe command builds them."""
    data_args = DataArguments(train_dir=str(DEMO_DATA), validation_dir=str(DEMO_DATA))
    train, evaluation, names = load_datasets(data_args, streaming=False)
    collator = build_collators(data_args, teacher.input_size, len(names), (teacher.mean, teacher.std))[1]
    return [torch.utils.data.DataLoader(d, batch_size=32, collate_fn=collator) for d in (train, evaluation)]


@pytest.fixture(scope="module")
def features(teacher, demo_loaders):
    """`(train_x (91, 128), train_y, eval_x (38, 128), eval_y)`: the demo teacher's embeddings."""
    return (*extract_embeddings(teacher.model, demo_loaders[0], "cpu"),
            *extract_embeddings(teacher.model, demo_loaders[1], "cpu"))


def sklearn_logistic_regression_accuracy(train_x, train_y, eval_x, eval_y) -> float:
    """Evaluation accuracy of scikit-learn's L2 logistic regression on `StandardScaler`-ed features."""
    scaler = StandardScaler().fit(train_x.numpy())
    classifier = LogisticRegression(max_iter=5000).fit(scaler.transform(train_x.numpy()), train_y.numpy())
    return accuracy_score(eval_y.numpy(), classifier.predict(scaler.transform(eval_x.numpy())))


def test_embeddings_are_the_pooled_features_of_every_readable_image(teacher, demo_loaders, features):
    train_x, train_y, eval_x, eval_y = features
    assert train_x.shape == (91, 128) and eval_x.shape == (38, 128) and train_x.dtype == torch.float32
    assert torch.bincount(train_y, minlength=NUM_LABELS).tolist() == [12, 2, 5, 12, 12, 12, 12, 12, 12]
    batch = next(iter(demo_loaders[1]))
    with torch.no_grad():
        expected = pooled_features(teacher.model, batch["pixel_values"])[0]
    torch.testing.assert_close(eval_x[: len(expected)], expected)

    # An unreadable image (marked by the collator) is left out, and a model in training mode is put back in it.
    batch["labels"][3] = UNREADABLE
    teacher.model.train()
    try:
        x, y = extract_embeddings(teacher.model, [batch], "cpu")
        assert teacher.model.training
    finally:
        teacher.model.eval()
    assert len(x) == len(batch["labels"]) - 1
    torch.testing.assert_close(x, torch.cat([expected[:3], expected[4:]]))


def test_held_out_part_is_stratified_seeded_and_keeps_every_class(features):
    train_y = features[1]
    fit, held_out = stratified_split(train_y, 0.2, seed=0)
    assert sorted(fit.tolist() + held_out.tolist()) == list(range(len(train_y)))
    per_class = torch.bincount(train_y[held_out], minlength=NUM_LABELS).tolist()
    assert per_class == [2, 0, 1, 2, 2, 2, 2, 2, 2]  # 20% of 12 rounds to 2, of 5 to 1; BACK's 2 both fit
    assert torch.equal(stratified_split(train_y, 0.2, seed=0)[1], held_out)
    assert not torch.equal(stratified_split(train_y, 0.2, seed=1)[1], held_out)


def test_probe_metrics_equal_scikit_learn_on_its_predictions(features):
    train_x, train_y, eval_x, eval_y = features
    fit = fit_linear_probe(train_x, train_y, NUM_LABELS, ProbeSettings())
    predictions, truth = fit.predict(eval_x), eval_y.numpy()
    scores = probe_scores(fit, eval_x, eval_y)

    assert scores["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, predictions))
    assert scores["macro_f1"] == pytest.approx(f1_score(truth, predictions, average="macro"))
    assert scores["cohen_kappa"] == pytest.approx(cohen_kappa_score(truth, predictions))
    assert scores["accuracy"] == pytest.approx(accuracy_score(truth, predictions))
    # The head is an nn.Linear on features standardized with the fitting part's mean and std.
    fit_idx = stratified_split(train_y, 0.2, seed=0)[0]
    scaler = StandardScaler().fit(train_x[fit_idx].numpy())
    np.testing.assert_allclose(fit.mean.numpy(), scaler.mean_, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fit.std.numpy(), scaler.scale_, rtol=1e-4)
    assert isinstance(fit.head, torch.nn.Linear) and fit.head.weight.shape == (NUM_LABELS, 128)
    assert fit.train_images == 76 and fit.validation_images == 15 and 1 <= fit.best_epoch <= fit.epochs


def test_probe_is_close_to_logistic_regression_and_well_above_chance(features):
    results = run_linear_probe(*features, NUM_LABELS, ProbeSettings())
    reference = sklearn_logistic_regression_accuracy(*features)
    assert abs(results["accuracy"] - reference) <= 0.10, (results, reference)
    assert results["accuracy"] > 3 / NUM_LABELS and results["balanced_accuracy"] > 3 / NUM_LABELS


def test_two_runs_give_identical_numbers_and_leave_the_global_rng_alone(features):
    rng_state = torch.random.get_rng_state()
    first = run_linear_probe(*features, NUM_LABELS, ProbeSettings())
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # a probe before training shifts no random stream
    second = run_linear_probe(*features, NUM_LABELS, ProbeSettings())
    assert first == second
    assert set(first) >= {"balanced_accuracy", "macro_f1", "cohen_kappa", "accuracy"}
    assert first["train_images"] + first["validation_images"] == 91 and first["eval_images"] == 38


@pytest.mark.parametrize("flag, value", [("probe_validation_fraction", "1.5"), ("probe_patience", "0"),
                                         ("probe_learning_rate", "-1")])
def test_command_rejects_a_bad_setting_naming_it(flag, value, tmp_path):
    argv = ["--model_name_or_path", str(DEMO_TEACHER), "--train_dir", str(DEMO_DATA), "--validation_dir",
            str(DEMO_DATA), "--output_dir", str(tmp_path), f"--{flag}", value]
    with pytest.raises(ValueError, match=f"--{flag}={value}"):
        probe_command.run(argv)
    assert not (tmp_path / "probe_results.json").exists()


def test_command_refuses_streaming_and_a_missing_evaluation_split(tmp_path):
    base = ["--model_name_or_path", str(DEMO_TEACHER), "--train_dir", str(DEMO_DATA), "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="streaming is not supported"):
        probe_command.run([*base, "--validation_dir", str(DEMO_DATA), "--streaming"])
    with pytest.raises(ValueError, match="--validation_dir"):
        probe_command.run(base)


def test_command_end_to_end_with_a_config_file(features, tmp_path):
    config = tmp_path / "probe.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": str(DEMO_TEACHER), "train_dir": str(DEMO_DATA),
                                      "validation_dir": str(DEMO_DATA), "dataloader_num_workers": 0}))
    out = tmp_path / "out"
    assert probe_command.main(["--config", str(config), "--output_dir", str(out),
                               "--per_device_eval_batch_size", "16"]) == 0

    saved = json.loads((out / "probe_results.json").read_text())
    assert {"balanced_accuracy", "macro_f1", "cohen_kappa", "accuracy", "protocol", "settings", "feature_dim",
            "train_images", "validation_images", "eval_images", "model_name_or_path"} <= set(saved)
    assert saved["protocol"] == PROBE_PROTOCOL and saved["settings"]["probe_patience"] == 7
    assert (saved["feature_dim"], saved["eval_images"], saved["image_size"]) == (128, 38, 112)
    assert saved["model_name_or_path"] == str(DEMO_TEACHER)
    # A thin wrapper: the same numbers as the probe on the embeddings computed here.
    expected = run_linear_probe(*features, NUM_LABELS, ProbeSettings())
    for key, value in expected.items():
        assert saved[key] == pytest.approx(value), key


@pytest.mark.slow
def test_probe_on_crc_polyp_agrees_with_logistic_regression(teacher):
    """16,500 real patches (5 classes, 3,619 scored): the probe and scikit-learn agree within 5 points."""
    root = shared_data("crc-polyp-96")
    data_args = DataArguments(train_dir=str(root), validation_dir=str(root), validation_split="test")
    train, evaluation, names = load_datasets(data_args, streaming=False)
    collator = build_collators(data_args, teacher.input_size, len(names), (teacher.mean, teacher.std))[1]
    loaders = [torch.utils.data.DataLoader(d, batch_size=128, collate_fn=collator) for d in (train, evaluation)]
    features = (*extract_embeddings(teacher.model, loaders[0], "cpu"),
                *extract_embeddings(teacher.model, loaders[1], "cpu"))
    results = run_linear_probe(*features, len(names), ProbeSettings())
    assert (results["train_images"] + results["validation_images"], results["eval_images"]) == (12881, 3619)
    assert results["balanced_accuracy"] > 0.4  # chance is 0.2
    reference = sklearn_logistic_regression_accuracy(*features)
    assert abs(results["accuracy"] - reference) <= 0.05, (results, reference)


@pytest.mark.slow
def test_distill_probes_teacher_and_student_and_the_card_records_the_scores(tmp_path, monkeypatch):
    """`--probe_teacher --probe_student` on the demo: three probes beside the run, their numbers in the card."""
    from huggingface_hub import ModelCard

    from moma_hf.commands import distill

    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    flags = ["--config", "examples/configs/demo.yaml", "--max_steps", "2", "--save_strategy", "no",
             "--report_to", "none", "--per_device_train_batch_size", "8", "--disable_tqdm", "true",
             "--probe_teacher", "--probe_student", "--output_dir", str(out)]
    assert distill.main(flags) == 0
    probes = {who: json.loads((out / f"probe_{who}.json").read_text())
              for who in ("teacher", "student_initial", "student")}
    assert probes["teacher"]["feature_dim"] == 128 and probes["student"]["feature_dim"] == 512  # ViT, ResNet-18
    assert all(p["protocol"] == PROBE_PROTOCOL and p["eval_images"] == 38 for p in probes.values())
    provenance = json.loads((out / "config.json").read_text())["distilled_from"]
    assert provenance == {"teacher": "examples/demo_teacher", "revision": "main", "preset": None}
    line = next(line for line in ModelCard.load(out / "README.md").text.splitlines() if "Linear probe" in line)
    assert line.endswith(f"teacher {probes['teacher']['balanced_accuracy']:.3f}; student before distillation "
                         f"{probes['student_initial']['balanced_accuracy']:.3f}; student "
                         f"{probes['student']['balanced_accuracy']:.3f}")


def test_distill_refuses_a_probe_of_a_stream_before_loading_anything(tmp_path, monkeypatch):
    from moma_hf.commands import distill

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(distill, "load_teacher", lambda *a, **k: pytest.fail("loaded a teacher first"))
    with pytest.raises(ValueError, match="--streaming is not supported"):
        distill.main(["--config", "examples/configs/demo.yaml", "--streaming", "--max_steps", "2",
                      "--probe_teacher", "--output_dir", str(tmp_path / "run")])
