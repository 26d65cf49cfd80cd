"""Faults lose nothing: NaN losses, SIGTERM, a crash mid-save and a failed upload each leave a usable run."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from conftest import make_trainer
from moma_hf.fault_tolerance import STAGING_DIR, NonFiniteLossError, publish_checkpoint
from moma_hf.hub import HubPushError, push_student

REPO = Path(__file__).resolve().parents[1]


def _all_finite(tensors):
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def test_a_nan_loss_stops_before_the_weights_change_and_names_the_step_and_term(small_moma, nct_mini_dir, tmp_path):
    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path, max_steps=20, save_steps=5)
    calls = []

    def poison_the_query_at_step_10(module, inputs, output):
        calls.append(1)
        return output * float("nan") if len(calls) == 10 else output

    trainer.moma_model.query_head.register_forward_hook(poison_the_query_at_step_10)
    with pytest.raises(NonFiniteLossError, match=r"optimiser step 10: loss, loss_moma is NaN or Inf.*"
                                                 r"--resume_from_checkpoint"):
        trainer.train()
    # Step 10 was a save step: its checkpoint was never written, so no checkpoint holds NaN weights.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-5"]
    assert _all_finite(load_file(tmp_path / "checkpoint-5" / "model.safetensors").values())
    assert _all_finite(trainer.moma_model.state_dict().values())  # the optimiser never applied the NaN step


def test_a_crash_mid_save_leaves_no_checkpoint_that_resume_would_pick(small_moma, nct_mini_dir, tmp_path,
                                                                        monkeypatch):
    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path, max_steps=10, save_steps=5)
    save_rng_state = trainer._save_rng_state

    def disk_full_at_step_10(output_dir):
        if trainer.state.global_step == 10:  # the model weights are already written by now
            raise OSError(28, "No space left on device")
        save_rng_state(output_dir)

    monkeypatch.setattr(trainer, "_save_rng_state", disk_full_at_step_10)
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    assert (tmp_path / STAGING_DIR / "checkpoint-10" / "model.safetensors").exists()  # half-written, hidden
    assert not (tmp_path / "checkpoint-10").exists()
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-5")

    resumed = make_trainer(small_moma, nct_mini_dir, tmp_path, max_steps=10, save_steps=5)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 10
    assert (tmp_path / "checkpoint-10" / "trainer_state.json").exists() and not (tmp_path / STAGING_DIR).exists()


def test_publishing_replaces_an_older_checkpoint_of_the_same_step(tmp_path):
    old, staged = tmp_path / "checkpoint-5", tmp_path / STAGING_DIR / "checkpoint-5"
    old.mkdir()
    (old / "model.safetensors").write_text("old run")
    staged.mkdir(parents=True)
    (staged / "model.safetensors").write_text("new run")
    publish_checkpoint(str(staged), str(old))
    assert (old / "model.safetensors").read_text() == "new run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]


class _SigtermAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_finishes_the_step_saves_a_checkpoint_and_stops(small_moma, nct_mini_dir, tmp_path):
    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path, max_steps=30, save_steps=100)
    trainer.add_callback(_SigtermAt(6))
    handler_before = signal.getsignal(signal.SIGTERM)
    trainer.train()
    assert trainer.stopped_by_signal and trainer.state.global_step == 7
    saved = load_file(tmp_path / "checkpoint-7" / "model.safetensors")
    assert saved["key_queue.queue_ptr"].item() == 7 * 16 % 32
    assert torch.equal(saved["key_queue.queue"], trainer.moma_model.key_queue.queue)
    assert (tmp_path / "checkpoint-7" / "optimizer.pt").exists()
    assert signal.getsignal(signal.SIGTERM) == handler_before


@pytest.mark.timeout(300)
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
