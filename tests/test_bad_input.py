"""Bad input (issue 13): unreadable images in evaluation and short runs, names that do not exist, odd configs."""

import json
import shutil
import warnings

import pytest
from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer, TrainingArguments

from conftest import make_trainer
from moma_hf.cli import DataArguments, build_collators
from moma_hf.collator import BadImageWarning, TooManyBadImagesError
from moma_hf.data import label_names, load_patch_dataset
from moma_hf.evaluation import evaluate_and_save
from moma_hf.transforms import normalization_from_processor

from test_evaluate_script import DEMO_TEACHER, DEMO_VALIDATION


def _add_unreadable(folder, count: int) -> None:
    """`count` files that cannot be decoded (truncated JPEGs of real patches, text, empty files), spread over the
    class folders of `folder`."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    first_patch = {target: sorted(target.glob("*.jpg"))[0].read_bytes() for target in classes}
    for i in range(count):
        target = classes[i % len(classes)]
        real = first_patch[target]
        kind = i % 3
        content = real[: len(real) // 3] if kind == 0 else (b"" if kind == 1 else b"not an image")
        (target / f"bad{i}.jpg").write_bytes(content)


# ---- unreadable images ------------------------------------------------------------------------------
def test_the_evaluation_after_training_scores_only_readable_images(tmp_path):
    # What examples/distill.py and train_teacher.py do after training: the eval collator of build_collators,
    # then evaluate_and_save through the Trainer's predict loop.
    data = tmp_path / "data"
    shutil.copytree(DEMO_VALIDATION, data)
    _add_unreadable(data, 3)
    dataset = load_patch_dataset(str(data), "validation", streaming=False)
    model = AutoModelForImageClassification.from_pretrained(DEMO_TEACHER)
    processor = AutoImageProcessor.from_pretrained(DEMO_TEACHER)
    data_args = DataArguments(train_dir=str(data), max_bad_image_fraction=0.1)
    _, eval_collator = build_collators(data_args, 112, 9, normalization_from_processor(processor))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_eval_batch_size=16, report_to="none",
                             use_cpu=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, data_collator=eval_collator)
    with pytest.warns(BadImageWarning):
        metrics = evaluate_and_save(trainer, dataset, label_names(dataset))

    assert metrics["eval_samples"] == 38 and metrics["eval_unreadable_images"] == 3
    saved = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert saved["eval_samples"] == 38 and saved["eval_unreadable_images"] == 3
    assert sum(map(sum, json.loads((tmp_path / "out" / "confusion_matrix.json").read_text())["matrix"])) == 38
    reference = json.loads((DEMO_TEACHER / "eval_results.json").read_text())  # the same 38 patches, no bad ones
    assert metrics["eval_accuracy"] == pytest.approx(reference["eval_accuracy"])


def test_a_short_run_with_too_many_unreadable_images_never_ends_successfully(small_moma, nct_mini_dir, tmp_path):
    # 4 steps of 16 = 64 images, below the 100 after which the collator checks: 48 real patches + 16 bad files
    # (25%). One DataLoader worker collates, so the counts must come back from its process.
    data = tmp_path / "data"
    for tissue in ("ADI", "LYM", "TUM"):
        (data / tissue).mkdir(parents=True)
        for file in sorted((nct_mini_dir / tissue).glob("*.jpg"))[:16]:
            shutil.copy(file, data / tissue / file.name)
    _add_unreadable(data, 16)
    trainer = make_trainer(small_moma, data, tmp_path / "run", max_steps=4, save_steps=100, logging_steps=2,
                           dataloader_num_workers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        with pytest.raises(TooManyBadImagesError, match=r"of 64 images .* in the whole training run, more than the "
                                                        r"allowed 1\.00%.*--max_bad_image_fraction"):
            trainer.train()
    assert trainer.state.global_step == 4
