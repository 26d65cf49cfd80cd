"""Pooled features across transformers families and the three kinds of student."""

import pytest
import torch
from conftest import NCT_CLASSES, id2label, timm_classifier
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    ConvNextConfig,
    Dinov2Config,
    EfficientNetConfig,
    ResNetConfig,
    SwinConfig,
    ViTConfig,
)

from moma_hf.networks.backbones import backbone_tensors, feature_dim, pooled_features
from moma_hf.networks.students import build_student, save_student
from moma_hf.networks.teachers import load_teacher

TINY_CONFIGS = {
    "vit": ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=64),
    "dinov2": Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=16),
    "resnet": ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
    "convnext": ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
    "swin": SwinConfig(image_size=64, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4),
    "efficientnet": EfficientNetConfig(image_size=64, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128),
}


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_pooled_features_of_backbones_and_classifiers(family, nct_tensors):
    pixels = nct_tensors[0][:3]
    config = TINY_CONFIGS[family]
    config.id2label, config.label2id = id2label(), {v: k for k, v in id2label().items()}
    for model in (AutoModel.from_config(config).eval(), AutoModelForImageClassification.from_config(config).eval()):
        features, logits = pooled_features(model, pixels)
        assert features.shape == (3, feature_dim(model)) and torch.isfinite(features).all()
        assert (logits is None) == (model.__class__.__name__.endswith("Model"))
        if logits is not None:
            # the captured feature is what the head sees: the head reproduces the logits from it
            head = model.classifier
            torch.testing.assert_close(head(features.view(3, -1, *([1] * (logits.ndim - 2)))
                                            if family == "resnet" else features), logits)


def test_timm_student_from_scratch_records_its_training_size():
    student, processor = build_student("resnet18", id2label(), image_size=96)
    assert student.config.architecture == "resnet18" and student.config.num_labels == len(NCT_CLASSES)
    assert processor.data_config["input_size"] == (3, 96, 96)
    assert "hf_hub_id" not in student.config.pretrained_cfg  # it claims no pretrained weights


def test_same_as_teacher_student_starts_from_the_teachers_backbone(tmp_path):
    teacher_model = AutoModelForImageClassification.from_config(TINY_CONFIGS["resnet"])
    teacher_model.save_pretrained(tmp_path)
    teacher = load_teacher(str(tmp_path))
    student, _ = build_student("same-as-teacher", id2label(["tumour", "normal"]), teacher=teacher)
    assert student.config.id2label == {0: "tumour", 1: "normal"}
    for s, t in zip(backbone_tensors(student), backbone_tensors(teacher.model)):
        assert torch.equal(s, t)
    with pytest.raises(ValueError, match="needs a teacher"):
        build_student("same-as-teacher", id2label())


def test_a_same_as_teacher_student_of_a_timm_teacher_keeps_its_own_class_names(tmp_path):
    # timm's config stores `label_names`, which would otherwise carry the teacher's 9 classes into a 3-class student.
    timm_classifier().save_pretrained(tmp_path / "teacher")
    labels = id2label(["AC", "ADENOMA", "H"])
    student, _ = build_student("same-as-teacher", labels, teacher=load_teacher(str(tmp_path / "teacher")))
    assert student.config.id2label == labels and student.config.num_labels == 3
    save_student(student, str(tmp_path / "student"))
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "student")
    assert reloaded.config.id2label == labels
    assert reloaded(pixel_values=torch.zeros(1, 3, 64, 64)).logits.shape == (1, 3)
