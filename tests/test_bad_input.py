"""Bad input (issue 13): unreadable images in evaluation and short runs, names that do not exist, odd configs."""

import json
import shutil
import warnings

import pytest
from conftest import make_trainer
from test_evaluate_script import DEMO_TEACHER, DEMO_VALIDATION
from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer, TrainingArguments

from moma_hf.data.arguments import DataArguments, build_collators
from moma_hf.data.collator import BadImageWarning, TooManyBadImagesError
from moma_hf.data.loading import label_names, load_patch_dataset
from moma_hf.data.transforms import normalization_from_processor
from moma_hf.evaluation.metrics import evaluate_and_save


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


# ---- names that do not exist ------------------------------------------------------------------------
_LOAD_AND_TIME = """
import sys, time
from moma_hf.networks.students import build_student
from moma_hf.networks.teachers import load_teacher
start = time.perf_counter()  # the load alone, not the imports
try:
    if sys.argv[1] == "teacher":
        load_teacher(sys.argv[2])
    else:
        build_student(sys.argv[2], {0: "tumour", 1: "normal"})
except Exception as error:
    print(f"{time.perf_counter() - start:.1f}")
    print(type(error).__name__, error)
"""


def _load_in_child(tmp_path, kind: str, name: str, **env) -> tuple[float, str]:
    """`(seconds the load took, the error it raised)` in a fresh interpreter that reads the Hub settings of `env`."""
    import os
    import subprocess
    import sys

    child_env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    child_env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_XET="1", NO_PROXY="127.0.0.1,localhost", **env)
    result = subprocess.run([sys.executable, "-c", _LOAD_AND_TIME, kind, name], env=child_env, capture_output=True,
                            text=True, timeout=300)
    lines = result.stdout.strip().splitlines()
    assert len(lines) >= 2, f"the load did not fail: {result.stdout}\n{result.stderr[-3000:]}"
    return float(lines[0]), "\n".join(lines[1:])


def _closed_port_endpoint() -> dict:
    from conftest import free_port

    return {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}


@pytest.mark.parametrize("offline", ["closed port", "HF_HUB_OFFLINE=1"])
@pytest.mark.slow
def test_a_hub_teacher_without_a_reachable_hub_fails_at_once_saying_so(tmp_path, offline):
    env = _closed_port_endpoint() if offline == "closed port" else {"HF_HUB_OFFLINE": "1"}
    seconds, error = _load_in_child(tmp_path, "teacher", "owkin/phikon", **env)
    assert error.startswith("TeacherLoadError") and "not in the local cache, and the Hub cannot be reached" in error
    assert ("HF_HUB_OFFLINE=1 is set" if offline != "closed port" else "did not answer (ConnectError") in error
    assert "has no config.json" not in error
    assert seconds < 20, f"took {seconds} s: the client's retries were not skipped"  # ~25 s with 5 retries


@pytest.mark.slow
def test_an_unknown_student_name_suggests_timm_architectures(tmp_path):
    seconds, error = _load_in_child(tmp_path, "student", "resnet181", **_closed_port_endpoint())
    assert error.startswith("ModelLoadError")
    assert "'resnet181' is neither a timm architecture (nearest names: resnet18," in error
    assert "the Hub cannot be reached" in error and seconds < 20


def test_an_unknown_student_name_on_a_reachable_hub_says_it_is_not_there(hub):
    from moma_hf.networks.model_names import ModelLoadError
    from moma_hf.networks.students import build_student

    with pytest.raises(ModelLoadError, match=r"neither a timm architecture \(nearest names: resnet18.*does not exist "
                                             r"on the Hub"):
        build_student("resnet181", {0: "tumour", 1: "normal"})
    assert any(path.startswith("/resnet181/resolve/main/config.json") for _, path, _ in hub.requests)


@pytest.mark.parametrize("path", ["/tmp/no_such_teacher", "./no_such_teacher", "outputs/runs/no_such_teacher"])
def test_a_missing_local_teacher_folder_is_named_as_such(path):
    from moma_hf.networks.teachers import TeacherLoadError, load_teacher

    with pytest.raises(TeacherLoadError, match=rf"'{path}' looks like a local path, but this folder does not exist"):
        load_teacher(path)


def test_a_missing_train_dir_fails_at_once_without_asking_the_hub(tmp_path, monkeypatch):
    import time

    from moma_hf.data.arguments import load_datasets

    monkeypatch.chdir(tmp_path)  # "data/patches" could be a Hub dataset id; as --train_dir it is a local path
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"--train_dir 'data/patches' does not exist \(relative to .*--dataset_name"):
        load_datasets(DataArguments(train_dir="data/patches"), streaming=False)
    assert time.perf_counter() - start < 20


# ---- configuration edge cases ----------------------------------------------------------------------
def _parse(*argv):
    from moma_hf.commands.parsing import parse_args
    from moma_hf.training_args import DistillationTrainingArguments

    return parse_args((DataArguments, DistillationTrainingArguments), ["--train_dir", "examples/demo_data",
                                                                "--output_dir", "out", *argv])


def test_zero_attention_heads_is_refused_with_the_flag_and_a_fix():
    from moma_hf.configuration_distillation import DistillationConfig

    # refused as the flags are parsed, not minutes later when the model is built
    with pytest.raises(ValueError, match=r"num_attention_heads=0 \(--attention_heads\) must be a positive integer"):
        _parse("--attention_heads", "0")
    with pytest.raises(ValueError, match=r"projection_dim=512 must be a positive multiple of num_attention_heads=3"):
        DistillationConfig(num_attention_heads=3)


def test_a_yaml_file_that_is_not_a_mapping_is_named(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("- learning_rate: 0.1\n- queue_size: 128\n")
    with pytest.raises(ValueError, match=rf"config file {config} holds a list; it must hold a mapping"):
        _parse("--config", str(config))


def test_config_with_an_equals_sign_is_read(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("queue_size: 128\nlearning_rate: 0.01\n")
    _, args = _parse(f"--config={config}", "--queue_size", "256")
    assert args.learning_rate == 0.01 and args.queue_size == 256  # the file's value, and the flag over the file


def test_a_prefix_of_a_flag_is_an_error_not_that_flag():
    with pytest.raises(ValueError, match=r"not used by the HfArgumentParser: \['--learning_rat', '0.1'\]"):
        _parse("--learning_rat", "0.1")


def test_an_unknown_yaml_key_names_the_key_and_the_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("queue_size: 128\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match=rf"{config} has unknown keys: 'learning_rat' \(did you mean 'learning_rate'"):
        _parse("--config", str(config))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_the_end_of_run_limit_sums_every_process(nct_mini_dir, tmp_path):
    # Rank 1 alone has 1 bad image of 10 (10%); the run has 1 of 20 (5%). A 7% limit passes on both ranks,
    # a 4% limit fails on both: every rank judges the whole run, so none is left waiting for the other.
    from conftest import REPO, launch_two_processes

    verdicts = {}
    for limit in ("0.07", "0.04"):
        out = tmp_path / limit
        out.mkdir()
        launch_two_processes(REPO / "tests" / "_bad_image_launch_worker.py", "--data", nct_mini_dir, "--out", out,
                             "--max_bad_fraction", limit)
        verdicts[limit] = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [v["num_bad"] for v in verdicts["0.07"]] == [0, 1]
    assert [v["error"] for v in verdicts["0.07"]] == [None, None]
    for verdict in verdicts["0.04"]:
        assert "1 of 20 images (5.00%) could not be decoded in the whole training run" in verdict["error"]
