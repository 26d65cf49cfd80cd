"""MoMATrainer on real patches: the loss falls, checkpoints keep the MoMA state, the export is a plain student."""

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

from conftest import timm_classifier, tiny_vit
from moma_hf import MoMATrainer, MoMATrainingArguments
from moma_hf.cli import DataArguments, build_collators
from moma_hf.data import label_names, load_patch_dataset
from moma_hf.transforms import IMAGENET_MEAN, IMAGENET_STD


def _trainer(small_moma, nct_mini_dir, output_dir, **overrides):
    dataset = load_patch_dataset(str(nct_mini_dir), "train", streaming=False)
    names = label_names(dataset)
    args = MoMATrainingArguments(
        output_dir=str(output_dir), max_steps=30, per_device_train_batch_size=16, learning_rate=2e-3,
        lr_scheduler_type="constant", logging_steps=1, save_steps=15,
        report_to="none", use_cpu=True, seed=0, queue_size=32, projection_dim=32, **overrides,
    )
    model = small_moma(timm_classifier(names=names), tiny_vit(names=names), **args.moma_config_kwargs())
    data_args = DataArguments(train_dir=str(nct_mini_dir), randaugment="", stain_jitter=0.0)
    train_collator, eval_collator = build_collators(data_args, 64, len(names), (IMAGENET_MEAN, IMAGENET_STD),
                                                    ([0.5] * 3, [0.5] * 3))
    return MoMATrainer(model=model, args=args, train_dataset=dataset, data_collator=train_collator,
                       eval_data_collator=eval_collator)


def test_a_30_step_run_lowers_the_loss_logs_every_term_and_exports_the_student(small_moma, nct_mini_dir, tmp_path):
    trainer = _trainer(small_moma, nct_mini_dir, tmp_path)
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
