"""A used --output_dir is never silently mixed with a new run (issue 13, Faults: "Re-running into a used
--output_dir silently overwrites"): refusal, clean overwrite that keeps a teacher-feature cache, resume of an
interrupted run, the same rule in train_teacher.py, and compare_methods taking up a run stopped mid-way."""

import importlib.util
import json
import shutil
import sys

import pytest
from conftest import REPO
from transformers import TrainingArguments

from moma_hf.training.run_folder import OutputDirInUseError, check_output_dir, prepare_output_dir, unfinished_run_flags

# A short demo run (the demo config supplies teacher, student and data) that keeps two checkpoints.
DEMO_FLAGS = ["--max_steps", "2", "--save_steps", "1", "--save_total_limit", "5", "--report_to", "none",
              "--per_device_train_batch_size", "8", "--disable_tqdm", "true", "--logging_steps", "1"]


def _example(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # train_teacher's argument class is pickled into its checkpoints
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-step demo run with a frozen teacher and its teacher-feature cache: its folder."""
    out = tmp_path_factory.mktemp("runs") / "finished"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # the demo config names its teacher and data relative to the repository
        assert _example("distill").main(DEMO_FLAGS + ["--output_dir", str(out), "--teacher_update", "frozen",
                                                      "--cache_teacher_features", "true", "--cache_views", "1"]) == 0
    assert {"checkpoint-1", "checkpoint-2", "config.json", "README.md", "confusion_matrix.png",
            "_teacher-feature-cache"} <= {p.name for p in out.iterdir()}
    return out


@pytest.mark.timeout(600)
def test_rerunning_into_a_finished_run_is_refused_then_overwritten_cleanly_keeping_the_cache(
        finished_run, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    flags = DEMO_FLAGS + ["--output_dir", str(out), "--teacher_update", "frozen", "--cache_teacher_features", "true",
                          "--cache_views", "1"]
    with pytest.raises(OutputDirInUseError, match="finished run") as refusal:
        _example("distill").main(flags)
    assert "--overwrite_output_dir" in str(refusal.value) and "checkpoint-2" in str(refusal.value)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in finished_run.iterdir())  # untouched

    cache_info = out / "_teacher-feature-cache" / "cache_info.json"
    built = cache_info.stat().st_mtime_ns
    # One step, no evaluation: nothing of the first run (checkpoint-2, its confusion matrix) may be left.
    assert _example("distill").main(flags[:1] + ["1"] + flags[2:] + ["--overwrite_output_dir", "true",
                                                                     "--validation_split", ""]) == 0
    names = {p.name for p in out.iterdir()}
    assert "checkpoint-1" in names and "checkpoint-2" not in names
    assert not names & {"confusion_matrix.png", "eval_results.json"}
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1
    assert cache_info.stat().st_mtime_ns == built  # the cache was reused, not rebuilt or deleted


@pytest.mark.timeout(600)
def test_an_interrupted_run_is_refused_with_both_commands_and_the_resume_command_works(finished_run, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "interrupted"
    shutil.copytree(finished_run / "checkpoint-1", out / "checkpoint-1")  # stopped after its first checkpoint
    flags = DEMO_FLAGS + ["--output_dir", str(out), "--teacher_update", "frozen"]
    with pytest.raises(OutputDirInUseError, match="interrupted run") as refusal:
        _example("distill").main(flags)
    message = str(refusal.value)
    resume = f"--resume_from_checkpoint {out / 'checkpoint-1'}"
    assert resume in message and "--overwrite_output_dir" in message
    assert _example("distill").main(flags + resume.split()) == 0
    assert (out / "config.json").exists() and (out / "checkpoint-2").exists()


def test_what_is_refused_even_with_overwrite_and_what_is_not(tmp_path):
    def args(folder, **kwargs):
        return TrainingArguments(output_dir=str(folder), report_to="none", use_cpu=True, **kwargs)

    check_output_dir(args(tmp_path / "new"))  # a folder that does not exist yet
    (tmp_path / "cache_only" / "_teacher-feature-cache").mkdir(parents=True)
    check_output_dir(args(tmp_path / "cache_only"))  # a cache is not a run
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("not a run output")
    with pytest.raises(OutputDirInUseError, match="no run wrote"):
        prepare_output_dir(args(notes), overwrite=True)
    assert (notes / "thesis.tex").exists()
    (tmp_path / "run" / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(ValueError, match="would delete"):
        check_output_dir(args(tmp_path / "run", resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3")),
                         overwrite=True)


def test_the_advice_names_only_complete_checkpoints(tmp_path):
    def args(folder):
        return TrainingArguments(output_dir=str(folder), report_to="none", use_cpu=True)

    out = tmp_path / "killed"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-2").mkdir()  # a kill mid-save: no trainer_state.json, so it cannot be resumed
    with pytest.raises(OutputDirInUseError, match="interrupted run") as refusal:
        check_output_dir(args(out))
    assert f"--resume_from_checkpoint {out / 'checkpoint-1'} " in str(refusal.value)
    assert unfinished_run_flags(out) == [f"--resume_from_checkpoint={out / 'checkpoint-1'}"]
    (out / "checkpoint-1" / "trainer_state.json").unlink()  # no complete checkpoint is left: start afresh
    with pytest.raises(OutputDirInUseError, match="no checkpoint to resume from"):
        check_output_dir(args(out))
    assert unfinished_run_flags(out) == ["--overwrite_output_dir=true"]
    prepare_output_dir(args(out), overwrite=True)  # still a run's folder, so it may be cleared
    assert list(out.iterdir()) == []


@pytest.mark.timeout(600)
def test_train_teacher_follows_the_same_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "teacher"
    flags = ["--model_name_or_path", "test_resnet", "--train_dir", "examples/demo_data", "--validation_split", "",
             "--image_size", "64", "--max_steps", "1", "--per_device_train_batch_size", "8", "--report_to", "none",
             "--save_strategy", "no", "--use_cpu", "true", "--output_dir", str(out)]
    _example("train_teacher").main(flags)
    assert (out / "config.json").exists()
    with pytest.raises(OutputDirInUseError, match="finished run"):
        _example("train_teacher").main(flags)
    (out / "training_curves.png").write_bytes(b"left by an older run")
    _example("train_teacher").main(flags + ["--overwrite_output_dir", "true"])
    assert (out / "config.json").exists() and not (out / "training_curves.png").exists()


@pytest.mark.timeout(600)
def test_compare_methods_takes_up_a_run_stopped_after_a_checkpoint(finished_run, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    from moma_hf.commands import compare

    config = {"student": "resnet18", "distill_args": {"max_steps": 2, "per_device_train_batch_size": 8,
                                                      "image_size": 112, "queue_size": 64}}
    data = REPO / "examples" / "demo_data"
    variant = "ce --save_strategy=steps --save_steps=1"  # the checkpoint a SIGTERM would leave
    args = (0, data / "train", data / "validation", str(REPO / "examples" / "demo_teacher"), config)
    straight = compare.run_method(variant, *args, tmp_path / "straight")
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "straight" / "checkpoint-1", stopped / "checkpoint-1")
    kept = (stopped / "checkpoint-1" / "trainer_state.json").stat().st_mtime_ns
    assert compare.run_method(variant, *args, stopped) == straight  # resumed: exactly the straight run's scores
    assert (stopped / "checkpoint-1" / "trainer_state.json").stat().st_mtime_ns == kept  # taken up, not redone
    (stopped / "eval_results.json").unlink()  # stopped after training, before its scores were written
    assert compare.run_method(variant, *args, stopped) == straight


@pytest.mark.timeout(600)
def test_train_teacher_evaluates_during_training_with_the_evaluation_collator(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "teacher"
    _example("train_teacher").main([
        "--model_name_or_path", "test_resnet", "--train_dir", "examples/demo_data", "--validation_dir",
        "examples/demo_data", "--image_size", "64",
        "--max_steps", "2", "--per_device_train_batch_size", "8", "--eval_strategy", "steps", "--eval_steps", "1",
        "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true", "--output_dir", str(out)])
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [h for h in history if "eval_macro_f1" in h]
    assert [h["step"] for h in evals] == [1, 2]
    final = json.loads((out / "eval_results.json").read_text())
    # Unaugmented evaluation both times (random crops would move the loss): the last in-training score is the final.
    assert evals[-1]["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-6)
    assert evals[-1]["eval_macro_f1"] == final["eval_macro_f1"]
