"""moma-evaluate (examples/evaluate_model.py) on a real model and real patches: the bundled demo teacher on the demo
validation split."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import NCT_CLASSES, shared_data
from transformers import AutoModelForImageClassification

from moma_hf.data.transforms import build_eval_transform, load_rgb_image
from moma_hf.evaluation.metrics import METRIC_KEYS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DEMO_TEACHER = EXAMPLES / "demo_teacher"
DEMO_VALIDATION = EXAMPLES / "demo_data" / "validation"


@pytest.fixture(scope="module")
def script():
    """The `moma-evaluate` command's module (`run` returns the results that `main` writes)."""
    from moma_hf.commands import evaluate

    return evaluate


def run(script, data_dir, output_dir, *flags):
    argv = ["--model_name_or_path", str(DEMO_TEACHER), "--data_dir", str(data_dir), "--split", "validation",
            "--output_dir", str(output_dir), "--batch_size", "16", "--num_workers", "0", *flags]
    return script.run(argv)


@pytest.fixture(scope="module")
def hand_predictions() -> dict[str, int]:
    """The demo teacher's prediction for each validation file name, computed here without the script: its 112 px
    eval resize and its processor's mean/std (0.5), one forward pass."""
    files = sorted(DEMO_VALIDATION.glob("*/*.jpg"))
    model = AutoModelForImageClassification.from_pretrained(DEMO_TEACHER).eval()
    transform = build_eval_transform(112)
    pixels = torch.stack([transform(load_rgb_image(str(f))) for f in files])
    with torch.no_grad():
        predictions = model(pixel_values=(pixels - 0.5) / 0.5).logits.argmax(-1).tolist()
    return {f.name: p for f, p in zip(files, predictions)}


def hand_accuracy(files: list[Path], hand_predictions: dict[str, int]) -> tuple[int, list[int]]:
    """`(number correct, true NCT ids)` of `files` (in class folders) under the hand-made predictions."""
    truth = [NCT_CLASSES.index(f.parent.name) for f in files]
    return sum(hand_predictions[f.name] == t for f, t in zip(files, truth)), truth


def test_evaluates_the_demo_teacher_on_real_patches(script, hand_predictions, tmp_path):
    results = run(script, DEMO_VALIDATION, tmp_path)

    files = sorted(DEMO_VALIDATION.glob("*/*.jpg"))
    written = {p.name for p in tmp_path.iterdir()}
    assert written == {"eval_results.json", "per_class_metrics.json", "confusion_matrix.json", "confusion_matrix.png"}
    saved = json.loads((tmp_path / "eval_results.json").read_text())
    assert saved == results and saved["eval_samples"] == len(files) == 38
    for key in METRIC_KEYS:
        assert 0 <= saved[f"eval_{key}"] <= 1, key
    matrix = json.loads((tmp_path / "confusion_matrix.json").read_text())
    assert matrix["labels"] == NCT_CLASSES
    assert sum(map(sum, matrix["matrix"])) == len(files)
    per_class = json.loads((tmp_path / "per_class_metrics.json").read_text())
    assert list(per_class) == NCT_CLASSES
    assert [per_class[c]["support"] for c in NCT_CLASSES] == [len(list((DEMO_VALIDATION / c).glob("*.jpg")))
                                                              for c in NCT_CLASSES]

    correct, _ = hand_accuracy(files, hand_predictions)
    assert 0 < correct < len(files)  # a real, imperfect model: the check below can fail
    assert saved["eval_accuracy"] == pytest.approx(correct / len(files))
    assert sum(matrix["matrix"][i][i] for i in range(9)) == correct


def test_a_split_with_some_classes_in_another_order_is_matched_by_name(script, hand_predictions, tmp_path):
    # Three class folders only: the dataset's labels are [ADI, STR, TUM] (ids 0, 1, 2), the model's ids 0, 7, 8.
    data = tmp_path / "data"
    for name in ("ADI", "STR", "TUM"):
        shutil.copytree(DEMO_VALIDATION / name, data / name)
    results = run(script, data, tmp_path / "out")

    files = sorted(data.glob("*/*.jpg"))
    correct, truth = hand_accuracy(files, hand_predictions)
    assert results["eval_accuracy"] == pytest.approx(correct / len(files))
    matrix = json.loads((tmp_path / "out" / "confusion_matrix.json").read_text())["matrix"]
    assert [sum(row) for row in matrix] == [truth.count(i) for i in range(9)]


def test_other_labels_than_the_model_give_a_clear_error(script, tmp_path):
    # crc-polyp-96 has 5 other classes (AC, H, S, T, V); two real patches of each are enough.
    source = shared_data("crc-polyp-96") / "test"
    if not source.is_dir():
        pytest.skip(f"{source} is not available")
    data = tmp_path / "polyp"
    for name in ("AC", "H", "S", "T", "V"):
        (data / name).mkdir(parents=True)
        for file in sorted((source / name).glob("*.jpg"))[:2]:
            shutil.copy(file, data / name / file.name)
    with pytest.raises(ValueError, match=r"do not match the model's id2label") as error:
        run(script, data, tmp_path / "out")
    message = str(error.value)
    assert "['AC', 'H', 'S', 'T', 'V']" in message and str(NCT_CLASSES) in message
    assert "Evaluate a model trained on these classes" in message
    assert not (tmp_path / "out").exists()


def test_the_data_source_is_required(script, tmp_path):
    with pytest.raises(ValueError, match="--dataset_name .* or --data_dir"):
        script.run(["--model_name_or_path", str(DEMO_TEACHER), "--output_dir", str(tmp_path)])


def _with_unreadable_files(tmp_path) -> Path:
    """The demo validation split (38 real patches) plus 3 files that cannot be decoded: 41 files."""
    data = tmp_path / "data"
    shutil.copytree(DEMO_VALIDATION, data)
    tumour = sorted((data / "TUM").glob("*.jpg"))[0].read_bytes()
    (data / "TUM" / "truncated.jpg").write_bytes(tumour[: len(tumour) // 3])
    (data / "ADI" / "notes.jpg").write_text("not an image")
    (data / "STR" / "empty.png").write_bytes(b"")
    return data


def test_unreadable_images_are_skipped_counted_and_left_out_of_the_metrics(script, hand_predictions, tmp_path,
                                                                            caplog):
    data = _with_unreadable_files(tmp_path)
    with caplog.at_level("WARNING", logger="moma_hf.evaluation.metrics"), pytest.warns(UserWarning, match="notes.jpg"):
        results = run(script, data, tmp_path / "out", "--max_bad_image_fraction", "0.1")

    files = sorted(DEMO_VALIDATION.glob("*/*.jpg"))
    assert results["eval_samples"] == len(files) == 38 and results["eval_unreadable_images"] == 3
    assert json.loads((tmp_path / "out" / "eval_results.json").read_text()) == results
    matrix = json.loads((tmp_path / "out" / "confusion_matrix.json").read_text())["matrix"]
    assert sum(map(sum, matrix)) == 38  # no stand-in copies of good images
    per_class = json.loads((tmp_path / "out" / "per_class_metrics.json").read_text())
    assert [per_class[c]["support"] for c in NCT_CLASSES] == [len(list((DEMO_VALIDATION / c).glob("*.jpg")))
                                                              for c in NCT_CLASSES]
    correct, _ = hand_accuracy(files, hand_predictions)
    assert results["eval_accuracy"] == pytest.approx(correct / 38)
    assert "skipped 3 unreadable image(s) of 41" in caplog.text


def test_an_evaluation_with_more_unreadable_images_than_allowed_fails_however_short(script, tmp_path):
    # 3 of 41 files (7%) in three batches: far below the 100 images after which the collator checks.
    data = _with_unreadable_files(tmp_path)
    too_many = r"3 of 41 images \(7\.32%\).* in this evaluation, more than the allowed 1\.00%.*--max_bad_image_fraction"
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=too_many):
        run(script, data, tmp_path / "out")
    assert not (tmp_path / "out" / "eval_results.json").exists()
