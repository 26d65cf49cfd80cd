"""Faults lose nothing: NaN losses, SIGTERM, a crash or kill mid-save and a failed upload each leave a usable run."""

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_trainer
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from moma_hf.hub import HubPushError, push_student
from moma_hf.training.fault_tolerance import (
    IncompleteCheckpointError,
    NonFiniteLossError,
    NonFiniteStateError,
    is_checkpoint_folder,
    is_complete_checkpoint,
    last_complete_checkpoint,
    last_healthy_checkpoint,
    non_finite_tensors,
    remove_incomplete_checkpoints,
)

REPO = Path(__file__).resolve().parents[1]


def _all_finite(tensors):
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


@pytest.mark.slow
def test_a_nan_loss_stops_before_the_weights_change_and_names_the_step_and_term(small_moma, nct_mini_dir, tmp_path):
    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path, max_steps=20, save_steps=5)
    calls = []

    def poison_the_query_at_step_10(module, inputs, output):
        calls.append(1)
        return output * float("nan") if len(calls) == 10 else output

    trainer.distillation_model.query_head.register_forward_hook(poison_the_query_at_step_10)
    with pytest.raises(NonFiniteLossError, match=r"optimiser step 10: loss, loss_moma is NaN or Inf.*"
                                                 r"--resume_from_checkpoint"):
        trainer.train()
    # Step 10 was a save step: its checkpoint was never written, so no checkpoint holds NaN weights.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-5"]
    assert _all_finite(load_file(tmp_path / "checkpoint-5" / "model.safetensors").values())
    assert _all_finite(trainer.distillation_model.state_dict().values())  # the optimiser never applied the NaN step


def _poison_running_var_at_call(module, call):
    """Make `module` (a BatchNorm) set its running_var to Inf in its `call`-th forward: the loss stays finite."""
    calls = []

    def hook(module, inputs, output):
        calls.append(1)
        if len(calls) == call:
            module.running_var.data[0] = float("inf")  # .data: autograd saved this buffer for backward

    module.register_forward_hook(hook)


@pytest.mark.slow
def test_a_non_finite_buffer_stops_the_run_before_its_checkpoint_and_is_named(small_moma, nct_mini_dir, tmp_path):
    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path, max_steps=20, save_steps=5)
    batch_norm = trainer.distillation_model.student.timm_model.bn1
    _poison_running_var_at_call(batch_norm, 8)  # BN uses batch statistics in training: every loss stays finite
    with pytest.raises(NonFiniteStateError, match=r"after optimiser step 10: 1 tensor\(s\) hold NaN or Inf "
                                                  r"\(student\.timm_model\.bn1\.running_var\)"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-5"]
    assert _all_finite(load_file(tmp_path / "checkpoint-5" / "model.safetensors").values())


def test_a_non_finite_state_is_never_exported(small_moma, nct_mini_dir, tmp_path):
    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path, max_steps=3, save_steps=100)
    _poison_running_var_at_call(trainer.distillation_model.student.timm_model.bn1, 3)
    with pytest.raises(NonFiniteStateError, match=r"after optimiser step 3.*bn1\.running_var"):
        trainer.train()  # raised at the end of training, before the caller's save_model()


def test_the_state_check_covers_parameters_buffers_and_the_key_queue(small_moma):
    model = small_moma()
    assert non_finite_tensors(model) == []
    model.key_queue.queue[3, 0] = float("nan")
    name, parameter = next(iter(model.query_head.named_parameters()))
    parameter.data.view(-1)[0] = float("-inf")
    assert set(non_finite_tensors(model)) == {"key_queue.queue", f"query_head.{name}"}


def _complete_checkpoint(folder: Path, files=("model.safetensors", "trainer_state.json")) -> Path:
    """A stand-in `checkpoint-N` folder holding `files` (only their names matter to the completeness rule)."""
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_text("{}")
    return folder


def test_the_last_healthy_checkpoint_predates_the_blow_up_of_the_logged_loss(tmp_path):
    for step in (2, 4, 6):
        _complete_checkpoint(tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-8").mkdir()  # a save cut short is never the advice
    steady = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 7)]
    assert last_healthy_checkpoint(str(tmp_path), steady, 1) == str(tmp_path / "checkpoint-6")
    blown_up = steady[:4] + [{"step": 5, "loss": 1e9}, {"step": 6, "loss": float("nan")}]
    # checkpoint-4's weights made the loss of step 5, which blew up; checkpoint-2's made a normal one
    assert last_healthy_checkpoint(str(tmp_path), blown_up, 1) == str(tmp_path / "checkpoint-2")
    assert last_healthy_checkpoint(str(tmp_path), blown_up[:1] + [{"step": 2, "loss": 1e9}], 1) is None


@pytest.mark.slow
def test_a_learning_rate_given_on_resume_replaces_the_checkpoints(small_moma, nct_mini_dir, tmp_path):
    first = make_trainer(small_moma, nct_mini_dir, tmp_path, max_steps=4, save_steps=4, learning_rate=2e-3)
    first.train()
    resumed = make_trainer(small_moma, nct_mini_dir, tmp_path, max_steps=8, save_steps=4, learning_rate=2e-4)
    resumed.train(resume_from_checkpoint=True)
    rates = {entry["step"]: entry["learning_rate"] for entry in resumed.state.log_history if "learning_rate" in entry}
    assert [rates[step] for step in range(1, 9)] == [2e-3] * 4 + [pytest.approx(2e-4)] * 4
    assert all(group["lr"] == pytest.approx(2e-4) for group in resumed.optimizer.param_groups)


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_a_diverged_run_saves_no_non_finite_state_and_the_command_it_prints_recovers(tmp_path):
    out = tmp_path / "out"
    flags = ["--student_model_name_or_path", "test_resnet", "--image_size", "112", "--per_device_train_batch_size",
             "8", "--save_steps", "1", "--max_steps", "10", "--logging_steps", "1", "--save_total_limit", "3",
             "--disable_tqdm", "true", "--report_to", "none", "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    diverged = subprocess.run([sys.executable, "examples/distill.py", *flags, "--learning_rate", "1e6"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=400)
    assert diverged.returncode != 0
    assert re.search(r"Non-finite model state after optimiser step \d+: .*running_var", diverged.stderr)
    checkpoints = list(out.glob("checkpoint-*"))
    assert checkpoints and all(_all_finite(load_file(c / "model.safetensors").values()) for c in checkpoints)
    command = re.search(r"e\.g\. \(with your launcher's options, if any\):\n  (.+)", diverged.stderr).group(1)
    assert command.startswith("accelerate launch examples/distill.py") and "--learning_rate 100000" in command
    recovered = subprocess.run(shlex.split(command), cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert recovered.returncode == 0, recovered.stderr[-3000:]
    assert _all_finite(load_file(out / "model.safetensors").values())


@pytest.mark.slow
def test_a_crash_mid_save_leaves_no_checkpoint_that_resume_would_pick(small_moma, nct_mini_dir, tmp_path,
                                                                        monkeypatch, caplog):
    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path, max_steps=10, save_steps=5)
    save_rng_state = trainer._save_rng_state

    def disk_full_at_step_10(output_dir):
        if trainer.state.global_step == 10:  # the model weights are already written by now
            assert (Path(output_dir) / "model.safetensors").exists() and not is_complete_checkpoint(output_dir)
            raise OSError(28, "No space left on device")
        save_rng_state(output_dir)

    monkeypatch.setattr(trainer, "_save_rng_state", disk_full_at_step_10)
    with caplog.at_level(logging.WARNING), pytest.raises(OSError, match="No space left"):
        trainer.train()
    assert "checkpoint-10" in caplog.text and "cannot be resumed" in caplog.text  # the half-written one, named
    assert not (tmp_path / "checkpoint-10").exists()
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-5")

    resumed = make_trainer(small_moma, nct_mini_dir, tmp_path, max_steps=10, save_steps=5)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 10
    assert (tmp_path / "checkpoint-10" / "trainer_state.json").exists()


class _StepsRun(TrainerCallback):
    """Records the global step after each optimiser step this `train()` call runs."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _kill_mid_save(folder: Path) -> None:
    """What a SIGKILL during the save of step 10 leaves: checkpoint-10 with its weights and nothing after them."""
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "model.safetensors").write_bytes((folder / "checkpoint-5" / "model.safetensors")
                                                                 .read_bytes())


@pytest.mark.slow
def test_after_a_kill_mid_save_resume_continues_from_the_last_complete_checkpoint(small_moma, nct_mini_dir, tmp_path,
                                                                                   caplog):
    make_trainer(small_moma, nct_mini_dir, tmp_path, max_steps=5, save_steps=5).train()
    _kill_mid_save(tmp_path)
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")  # what the Trainer alone would pick
    resumed = make_trainer(small_moma, nct_mini_dir, tmp_path, max_steps=10, save_steps=5)
    steps_run = _StepsRun()
    resumed.add_callback(steps_run)
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint=True)
    assert str(tmp_path / "checkpoint-10") in caplog.text and "cannot be resumed" in caplog.text
    assert steps_run.steps == [6, 7, 8, 9, 10]  # resumed at step 5, not restarted from step 0
    assert is_complete_checkpoint(tmp_path / "checkpoint-10")


def test_resuming_from_an_incomplete_checkpoint_is_refused_naming_the_last_complete_one(small_moma, nct_mini_dir,
                                                                                         tmp_path):
    _complete_checkpoint(tmp_path / "checkpoint-5")
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "model.safetensors").write_text("cut short")
    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path, max_steps=10, save_steps=5)
    with pytest.raises(IncompleteCheckpointError, match=r"(?s)checkpoint-10: it is an incomplete checkpoint \(no "
                                                        r"trainer_state\.json.*last complete checkpoint beside it is "
                                                        rf"{re.escape(str(tmp_path / 'checkpoint-5'))}"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-10"))
    assert (tmp_path / "checkpoint-10" / "model.safetensors").exists()  # refused before anything was removed


def test_a_checkpoint_is_complete_once_its_trainer_state_is_written(tmp_path, caplog):
    complete = _complete_checkpoint(tmp_path / "checkpoint-5")
    cut_short = _complete_checkpoint(tmp_path / "checkpoint-10", ("model.safetensors", "optimizer.pt"))
    empty = tmp_path / "checkpoint-15"
    empty.mkdir()
    _complete_checkpoint(tmp_path / "runs" / "checkpoint-20")  # not a checkpoint of this folder
    assert is_complete_checkpoint(complete) and not is_complete_checkpoint(cut_short)
    assert not is_complete_checkpoint(empty)
    assert last_complete_checkpoint(tmp_path) == str(complete)
    with caplog.at_level(logging.WARNING):
        assert remove_incomplete_checkpoints(tmp_path) == [str(cut_short), str(empty)]
    assert str(cut_short) in caplog.text and str(empty) in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5", "runs"]
    assert get_last_checkpoint(str(tmp_path)) == str(complete)  # transformers' own pick is now the complete one


def test_only_checkpoint_folders_receive_the_full_state(small_moma, nct_mini_dir, tmp_path):
    # The rule, by name: transformers' `checkpoint-<step>` folders, wherever they lie.
    assert is_checkpoint_folder("out/checkpoint-30") and is_checkpoint_folder(tmp_path / "run-1" / "checkpoint-5")
    assert not any(map(is_checkpoint_folder, ["out", "out/checkpoint", "out/checkpoint-best", "out/checkpoints-2",
                                              "checkpoint-5/student"]))
    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path, max_steps=1)
    for name in ("checkpoint-1", "checkpoint-best"):
        trainer.save_model(str(tmp_path / name))
    full, student = (load_file(tmp_path / name / "model.safetensors") for name in ("checkpoint-1", "checkpoint-best"))
    assert any(key.startswith("teacher.") for key in full) and "key_queue.queue" in full
    assert not any("teacher" in key or "queue" in key for key in student)
    assert (tmp_path / "checkpoint-best" / "config.json").exists()


@pytest.mark.slow
def test_a_resumed_run_that_rewrites_a_checkpoint_makes_the_old_one_incomplete_first(small_moma, nct_mini_dir,
                                                                                        tmp_path, monkeypatch):
    make_trainer(small_moma, nct_mini_dir, tmp_path, max_steps=4, save_steps=2).train()
    # Resume from checkpoint-2 (as after a blow-up): the run writes checkpoint-4 again, over the old one.
    resumed = make_trainer(small_moma, nct_mini_dir, tmp_path, max_steps=4, save_steps=2)
    save_model = resumed.save_model
    seen = []

    def save_model_and_look(output_dir=None, _internal_call=False):
        seen.append((Path(output_dir).name, is_complete_checkpoint(output_dir)))  # while the weights change
        save_model(output_dir, _internal_call)

    monkeypatch.setattr(resumed, "save_model", save_model_and_look)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert seen == [("checkpoint-4", False)]
    assert is_complete_checkpoint(tmp_path / "checkpoint-4")


class _SigtermAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_a_checkpoint_and_stops(small_moma, nct_mini_dir, tmp_path):
    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path, max_steps=30, save_steps=100)
    trainer.add_callback(_SigtermAt(6))
    handler_before = signal.getsignal(signal.SIGTERM)
    trainer.train()
    assert trainer.stopped_by_signal and trainer.state.global_step == 7
    saved = load_file(tmp_path / "checkpoint-7" / "model.safetensors")
    assert saved["key_queue.queue_ptr"].item() == 7 * 16 % 32
    assert torch.equal(saved["key_queue.queue"], trainer.distillation_model.key_queue.queue)
    assert (tmp_path / "checkpoint-7" / "optimizer.pt").exists()
    assert signal.getsignal(signal.SIGTERM) == handler_before


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_a_sigterm_to_the_main_job_leaves_a_resumable_checkpoint_and_exit_code_143(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-u", "examples/distill.py", "--max_steps", "200", "--save_steps", "1000",
               "--logging_steps", "1", "--disable_tqdm", "true", "--report_to", "none", "--output_dir", str(out)]
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = []
    for line in job.stdout:  # wait for the first logged step, then pre-empt the job
        output.append(line)
        if "'loss'" in line:
            job.send_signal(signal.SIGTERM)
            break
    output += job.stdout.readlines()
    assert job.wait(timeout=120) == 143, "".join(output)[-3000:]
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").exists()
    assert f"--resume_from_checkpoint {checkpoints[0]}" in "".join(output)
    assert not (out / "model.safetensors").exists()  # an unfinished student is never exported as final


def test_a_failed_upload_keeps_the_output_and_says_how_to_retry(hub, small_moma, nct_mini_dir, tmp_path):
    token = "hf_moma_secret_write_token_123"
    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path / "out", max_steps=2, push_to_hub=True,
                           hub_model_id="user/moma-student", hub_token=token)
    trainer.train()
    trainer.save_model()
    hub.__exit__(None, None, None)  # the network goes down before the final upload
    with pytest.raises(HubPushError, match=r"(?s)user/moma-student failed.*hf upload user/moma-student") as error:
        push_student(trainer, "final student")
    assert token not in str(error.value)
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "README.md").exists()
