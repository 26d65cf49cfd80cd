"""Shared pytest fixtures."""
from pathlib import Path

import pytest

# ---- data fixtures (issue 3: moma_hf/data.py, moma_hf/transforms.py) ------------------------------
# The real H&E patches live beside the repository, read-only in CI (see ../shared/data/README.md).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "multiprocess: launches several processes with `accelerate launch` (slow)")


@pytest.fixture(scope="session")
def nct_mini_dir() -> Path:
    """nct-crc-mini: 129 real 224x224 patches, 9 classes, class folders only (no split folders)."""
    return SHARED_DATA / "nct-crc-mini"


@pytest.fixture(scope="session")
def crc_polyp_dir() -> Path:
    """crc-polyp-96: 16,500 real 96x96 patches, 5 classes, train/ and test/ split folders."""
    return SHARED_DATA / "crc-polyp-96"


# ---- end of data fixtures ---------------------------------------------------------------------------

# ---- model fixtures (issue 2: the MoMA core) ---------------------------------------------------------
NCT_CLASSES = ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]


@pytest.fixture(scope="session")
def nct_tensors(nct_mini_dir):
    """All 129 nct-crc-mini patches at 64 px, ImageNet-normalised: `(pixel_values (129,3,64,64), labels (129,))`."""
    import torch
    from moma_hf.data import load_rgb_image
    from moma_hf.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform

    transform = build_eval_transform(64)
    files = sorted(nct_mini_dir.glob("*/*.jpg"))
    images = torch.stack([transform(load_rgb_image(str(f))) for f in files])
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    labels = torch.tensor([NCT_CLASSES.index(f.parent.name) for f in files])
    return (images - mean) / std, labels


def id2label(names=NCT_CLASSES):
    return dict(enumerate(names))


def timm_classifier(architecture="test_resnet", names=NCT_CLASSES):
    """A small real timm network wrapped as a transformers image classifier (random init, no download)."""
    from transformers import AutoModelForImageClassification, TimmWrapperConfig

    labels = id2label(names)
    config = TimmWrapperConfig(architecture=architecture, num_labels=len(labels), id2label=labels,
                               label2id={v: k for k, v in labels.items()})
    return AutoModelForImageClassification.from_config(config)


def tiny_vit(names=NCT_CLASSES, classifier=True):
    """A 2-layer transformers ViT at 64 px (a classifier with `names`, or a backbone)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    labels = id2label(names)
    config = ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                       image_size=64, patch_size=16, id2label=labels, label2id={v: k for k, v in labels.items()})
    return ViTForImageClassification(config) if classifier else ViTModel(config, add_pooling_layer=False)


@pytest.fixture
def small_moma():
    """Factory: a MoMA model with small D and K around the given student and teacher."""
    from moma_hf import MoMAForDistillation
    from moma_hf.backbones import classifier_head

    def build(student=None, teacher=None, **config):
        student = student or timm_classifier()
        teacher = teacher or tiny_vit()
        teacher_labels = dict(teacher.config.id2label) if classifier_head(teacher) else None
        config = {"projection_dim": 32, "num_attention_heads": 4, "queue_size": 64, **config}
        return MoMAForDistillation.from_student_and_teacher(student, teacher, teacher_labels, **config)

    return build
# ---- end of model fixtures ----------------------------------------------------------------------------
