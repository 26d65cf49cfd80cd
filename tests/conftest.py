"""Shared pytest fixtures."""
import shutil
from pathlib import Path

import pytest

# ---- data fixtures (issue 3: moma_hf/data/) ---------------------------------------------------------
# The bundled demo patches (examples/demo_data: nct-crc-mini's 129 real patches, split into train/ and
# validation/) serve every test that needs only them; the larger sets live beside the repository, read-only
# in CI (see ../shared/data/README.md), and the tests that need them skip where they are absent.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEMO_DATA = Path(__file__).resolve().parents[1] / "examples" / "demo_data"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("multiprocess"):  # every launch of several processes is slow
            item.add_marker(pytest.mark.slow)


def demo_patch_files() -> list[Path]:
    """The 129 demo patches in nct-crc-mini's order: by class folder, then file name (splits ignored)."""
    return sorted(DEMO_DATA.glob("*/*/*.jpg"), key=lambda f: (f.parent.name, f.name))


@pytest.fixture(scope="session")
def nct_mini_dir(tmp_path_factory) -> Path:
    """nct-crc-mini: 129 real 224x224 patches, 9 classes, class folders only (no split folders), copied from
    the bundled examples/demo_data."""
    root = tmp_path_factory.mktemp("nct-crc-mini")
    for file in demo_patch_files():
        (root / file.parent.name).mkdir(exist_ok=True)
        shutil.copyfile(file, root / file.parent.name / file.name)
    return root


@pytest.fixture(scope="session")
def crc_polyp_dir() -> Path:
    """crc-polyp-96: 16,500 real 96x96 patches, 5 classes, train/ and test/ split folders (../shared/data)."""
    return shared_data("crc-polyp-96")


def shared_data(name: str) -> Path:
    """`../shared/data/<name>`, or skip the test with the reason when this checkout has no such folder."""
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent: this test needs the shared data set {name} beside the repository "
                    "(see ../shared/data/README.md)")
    return folder


# ---- end of data fixtures ---------------------------------------------------------------------------

# ---- model fixtures (issue 2: the MoMA core) ---------------------------------------------------------
NCT_CLASSES = ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]


@pytest.fixture(scope="session")
def nct_tensors(nct_mini_dir):
    """All 129 nct-crc-mini patches at 64 px, ImageNet-normalised: `(pixel_values (129,3,64,64), labels (129,))`."""
    import torch

    from moma_hf.data import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, load_rgb_image

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
    """Factory: the distillation model of `method` (default MoMA) with small D and K around student and teacher."""
    from moma_hf.modeling_auto import distillation_model_class
    from moma_hf.networks.backbones import classifier_head

    def build(student=None, teacher=None, **config):
        student = student or timm_classifier()
        teacher = teacher or tiny_vit()
        teacher_labels = dict(teacher.config.id2label) if classifier_head(teacher) else None
        config = {"projection_dim": 32, "num_attention_heads": 4, "queue_size": 64, **config}
        method = config.get("method", "moma")
        return distillation_model_class(method).from_student_and_teacher(
            student, None if method == "ce" else teacher, teacher_labels, **config
        )

    return build
def make_trainer(small_moma, nct_mini_dir, output_dir, streaming=False, teacher="vit", **overrides):
    """A DistillationTrainer for 30 steps of a tiny timm student and ViT teacher on nct-crc-mini at 64 px.

    `streaming` streams the folder instead; `teacher="same"` gives a teacher with the student's architecture and
    weights (so the key pathway is a momentum copy, BN statistics included) instead of the frozen ViT.
    """
    import copy

    from transformers import set_seed

    from moma_hf import DistillationTrainer, DistillationTrainingArguments
    from moma_hf.data.arguments import DataArguments, build_collators
    from moma_hf.data.loading import label_names, load_patch_dataset
    from moma_hf.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from moma_hf.networks.students import build_student

    dataset = load_patch_dataset(str(nct_mini_dir), "train", streaming=streaming, seed=0)
    names = label_names(dataset)
    settings = dict(
        output_dir=str(output_dir), max_steps=30, per_device_train_batch_size=16, learning_rate=2e-3,
        lr_scheduler_type="constant", logging_steps=1, save_steps=15,
        report_to="none", use_cpu=True, seed=0, queue_size=32, projection_dim=32,
    )
    args = DistillationTrainingArguments(**{**settings, **overrides})
    set_seed(args.seed)  # as examples/distill.py does: the same seed builds the same models
    student, processor = build_student("test_resnet", dict(enumerate(names)), image_size=64)
    teacher = copy.deepcopy(student) if teacher == "same" else tiny_vit(names=names)
    model = small_moma(student, teacher, **args.distillation_config_kwargs())
    data_args = DataArguments(train_dir=str(nct_mini_dir), randaugment="", stain_jitter=0.0)
    train_collator, eval_collator = build_collators(data_args, 64, len(names), (IMAGENET_MEAN, IMAGENET_STD),
                                                    ([0.5] * 3, [0.5] * 3))
    return DistillationTrainer(model=model, args=args, train_dataset=dataset, data_collator=train_collator,
                       eval_data_collator=eval_collator, processing_class=processor)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A started loopback Hub with huggingface_hub/transformers pointed at it and a tmp HF_HOME."""
    from hub_server import LoopbackHub, hub_env

    with LoopbackHub(tmp_path / "hub") as server:
        hub_env(monkeypatch, server, tmp_path / "hf_home")
        yield server
# ---- end of model fixtures ----------------------------------------------------------------------------


# ---- multi-process launches (issue 5) ------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free TCP port on the loopback interface, for the launcher's rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env() -> dict:
    """The environment of launched workers: gloo on CPU, one thread each, the repository importable."""
    import os

    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def launch_command(script, *args) -> list[str]:
    """`accelerate launch --multi_gpu --num_processes 2 script args` as 2 gloo CPU processes (with `launch_env`)."""
    import sys

    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(script), *map(str, args),
    ]


def launch_two_processes(script, *args, timeout=280):
    """Run `launch_command(script, *args)`; returns the CompletedProcess after asserting it exited 0."""
    import subprocess

    result = subprocess.run(launch_command(script, *args), env=launch_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result
