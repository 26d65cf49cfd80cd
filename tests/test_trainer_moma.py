"""MoMATrainer on real patches: the loss falls, checkpoints keep the MoMA state, the export is a plain student."""

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

from conftest import make_trainer


def test_a_30_step_run_lowers_the_loss_logs_every_term_and_exports_the_student(small_moma, nct_mini_dir, tmp_path):
    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 30
    assert all({"loss_ce", "loss_kd", "loss_moma", "queue_fill"} <= h.keys() for h in logs)
    assert logs[0]["queue_fill"] == 0.5 and logs[-1]["queue_fill"] == 1.0  # 16 keys a step into 32 slots
    # From step 3 on the queue is full, so the contrastive term has its final number of negatives.
    first, last = sum(h["loss"] for h in logs[2:7]) / 5, sum(h["loss"] for h in logs[-5:]) / 5
    assert last < 0.9 * first, (first, last)

    moma = trainer.moma_model
    assert moma.key_queue.queue_ptr.item() == (30 * 16) % 32  # short last batches are dropped
    checkpoint = load_file(tmp_path / "checkpoint-30" / "model.safetensors")
    assert torch.equal(checkpoint["key_queue.queue"], moma.key_queue.queue)
    assert any(name.startswith("teacher.") for name in checkpoint)

    trainer.save_model()
    exported = json.loads((tmp_path / "config.json").read_text())
    assert exported["model_type"] == "timm_wrapper" and "teacher" not in str(exported.get("architectures"))
    student = AutoModelForImageClassification.from_pretrained(tmp_path)  # no trust_remote_code
    pixels = torch.randn(4, 3, 64, 64)
    moma.eval()
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(student(pixel_values=pixels).logits, moma.student(pixel_values=pixels).logits)
    assert "hub_token" not in (tmp_path / "training_args.json").read_text() or "<HUB_TOKEN>" in (
        tmp_path / "training_args.json").read_text()
