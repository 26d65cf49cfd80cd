"""Every baseline trains through the same DistillationTrainer and data path as MoMA, and logs its own terms."""

import math

import pytest
import torch
from conftest import make_trainer

from moma_hf.configuration_distillation import BASELINE_METHODS
from moma_hf.modeling_baselines import BaselineForDistillation

EXPECTED_TERMS = {
    "ce": ("loss_ce",),
    "kd": ("loss_ce", "loss_kd"),
    "dkd": ("loss_ce", "loss_dkd"),
    "fitnet": ("loss_ce", "loss_fitnet"),
    "rkd": ("loss_ce", "loss_rkd"),
    "crd": ("loss_ce", "loss_crd"),
}


@pytest.mark.parametrize("method", BASELINE_METHODS)
@pytest.mark.slow
def test_each_baseline_trains_with_the_moma_trainer_and_logs_its_terms(method, small_moma, nct_mini_dir, tmp_path):
    # The tiny ViT teacher (48-d) and the timm ResNet student (96-d) differ in feature size on purpose.
    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path, method=method, max_steps=4, save_steps=100)
    model = trainer.distillation_model
    assert isinstance(model, BaselineForDistillation) and model.loss_terms == EXPECTED_TERMS[method]
    assert (model.teacher is None) == (method == "ce")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and all(set(EXPECTED_TERMS[method]) <= h.keys() for h in logs)
    assert all(math.isfinite(h["loss"]) for h in logs)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(n.startswith("student.") for n in moved)
    if method == "fitnet":
        assert any(n.startswith("feature_projection.") for n in moved)
    if method == "crd":  # both embedding heads learn; 4 steps of 16 fill both memories of 32
        assert {n.split(".")[0] for n in moved} >= {"student_embedding", "teacher_embedding"}
        assert model.student_memory.queue_len.item() == model.teacher_memory.queue_len.item() == 32
    if model.teacher is not None:
        assert not any(n.startswith("teacher.") for n in moved)


def test_kd_needs_the_teachers_label_space(small_moma):
    from conftest import tiny_vit

    with pytest.raises(ValueError, match=r"w_kd=1.0 needs a teacher whose labels equal the student's"):
        small_moma(teacher=tiny_vit(names=["a", "b"]), method="kd")
