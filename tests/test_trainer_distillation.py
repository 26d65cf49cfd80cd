"""DistillationTrainer on real patches: the loss falls, checkpoints keep the MoMA state, the export is a plain student."""

import json

import pytest

import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

from conftest import make_trainer


def test_a_30_step_run_lowers_the_loss_logs_every_term_and_exports_the_student(small_moma, nct_mini_dir, tmp_path):
    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 30
    assert all({"loss_ce", "loss_kd", "loss_moma", "queue_fill", "data_wait_fraction"} <= h.keys() for h in logs)
    assert all(0 <= h["data_wait_fraction"] <= 1 for h in logs)
    assert logs[0]["queue_fill"] == 0.5 and logs[-1]["queue_fill"] == 1.0  # 16 keys a step into 32 slots
    # From step 3 on the queue is full, so the contrastive term has its final number of negatives.
    first, last = sum(h["loss"] for h in logs[2:7]) / 5, sum(h["loss"] for h in logs[-5:]) / 5
    assert last < 0.9 * first, (first, last)

    moma = trainer.distillation_model
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


def test_data_wait_fraction_is_the_time_spent_fetching_batches(small_moma, nct_mini_dir, tmp_path):
    import time

    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path)

    def slow_batches():
        while True:
            time.sleep(0.3)  # a DataLoader that keeps the step waiting
            yield {}

    batches = slow_batches()
    for _ in range(2):
        trainer.get_batch_samples(batches, 1, "cpu")
        time.sleep(0.1)  # the step's compute
    logs = {"loss": 1.0}
    trainer.log(logs)
    # 0.6 s waiting in a window of 0.8 s, from the first fetch to the log
    assert 0.6 <= logs["data_wait_fraction"] <= 0.85, logs


def test_bf16_runs_the_whole_moma_step_and_keeps_the_queue_in_fp32(small_moma, nct_mini_dir, tmp_path):
    import math

    runs = {}
    for precision in ("fp32", "bf16"):
        trainer = make_trainer(small_moma, nct_mini_dir, tmp_path / precision, max_steps=4, save_strategy="no",
                               bf16=precision == "bf16")
        dtypes = []
        trainer.model.query_head.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
        trainer.train()
        runs[precision] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        queue = trainer.distillation_model.key_queue.queue
        assert queue.dtype == torch.float32 and trainer.distillation_model.key_queue.queue_len.item() == 32
        assert torch.isfinite(queue).all()
        torch.testing.assert_close(queue.norm(dim=1), torch.ones(32))  # enqueued keys stay unit rows
        # the projection heads really ran under bf16 autocast (or not)
        assert set(dtypes) == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert all(math.isfinite(loss) for loss in runs["bf16"])
    # The first step starts from the same weights and batch: bf16 changes its loss by rounding only.
    assert abs(runs["bf16"][0] - runs["fp32"][0]) < 0.03 * runs["fp32"][0], runs


@pytest.mark.slow
def test_torch_compile_trains_the_moma_model_as_eager_does(small_moma, nct_mini_dir, tmp_path):
    # --torch_compile compiles the whole MoMAForDistillation (pooled_features' hooks included).
    losses = {}
    for compiled in (False, True):
        trainer = make_trainer(small_moma, nct_mini_dir, tmp_path / str(compiled), max_steps=2, save_strategy="no",
                               torch_compile=compiled)
        trainer.train()
        losses[compiled] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # Same weights and batch: the first step's loss agrees to kernel rounding; the second follows an optimiser
    # step on slightly different gradients (fused kernels), so it agrees less tightly.
    assert abs(losses[True][0] - losses[False][0]) < 1e-4 * losses[False][0]
    assert abs(losses[True][1] - losses[False][1]) < 1e-2 * losses[False][1]


def test_persistent_workers_are_refused_for_map_style_data(small_moma, nct_mini_dir, tmp_path):
    import pytest

    with pytest.raises(ValueError, match="repeat epoch 0's augmentation"):
        make_trainer(small_moma, nct_mini_dir, tmp_path, dataloader_num_workers=1, dataloader_persistent_workers=True)
    # A stream is one endless epoch whose examples carry their own epoch, so workers may persist.
    make_trainer(small_moma, nct_mini_dir, tmp_path, streaming=True, dataloader_num_workers=1,
                 dataloader_persistent_workers=True)
