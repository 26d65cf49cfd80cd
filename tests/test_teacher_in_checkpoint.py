"""A frozen teacher is named in checkpoints (id, revision, weights hash), not stored; cached training holds none.

Every run here is `moma-distill` (its `main`) on nct-crc-mini at 64 px with a tiny timm student and a tiny ViT
teacher saved to a local folder, so "the teacher's name" is that folder: changing its weights file is what a
moved Hub revision would do.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_vit
from safetensors import safe_open
from safetensors.torch import load_file

from moma_hf import MoMAForDistillation
from moma_hf.commands import distill
from moma_hf.modeling_distillation import TeacherMismatchError
from moma_hf.networks import teachers
from moma_hf.networks.teachers import load_teacher, weights_sha256


@pytest.fixture
def teacher_dir(tmp_path):
    """A tiny ViT classifier of nct-crc-mini's labels, saved as a local teacher folder."""
    torch.manual_seed(0)
    path = tmp_path / "teacher"
    tiny_vit().save_pretrained(path)
    return path


def _flags(data, teacher, out, *extra, steps=8):
    return ["--train_dir", str(data), "--teacher_model_name_or_path", str(teacher), "--student_model_name_or_path",
            "test_resnet", "--image_size", "64", "--max_steps", str(steps), "--save_steps", "4",
            "--per_device_train_batch_size", "8", "--queue_size", "32", "--projection_dim", "32",
            "--teacher_update", "frozen", "--lr_scheduler_type", "constant", "--use_cpu", "true", "--report_to",
            "none", "--disable_tqdm", "true", "--randaugment", "", "--stain_jitter", "0", "--dataloader_num_workers",
            "0", "--output_dir", str(out), *extra]


def _keys(folder):
    with safe_open(folder / "model.safetensors", "pt") as f:
        return list(f.keys())


def test_the_hash_covers_names_dtypes_shapes_and_bytes():
    import hashlib

    model = torch.nn.Linear(3, 2)
    digest = hashlib.sha256()  # the documented recipe, computed independently
    for name in ("bias", "weight"):
        tensor = model.state_dict()[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    assert weights_sha256(model) == digest.hexdigest()
    before = weights_sha256(model)
    with torch.no_grad():
        model.weight[0, 0] += 1e-6
    assert weights_sha256(model) != before
    assert weights_sha256(model.to(torch.bfloat16)) != weights_sha256(model.float())


def test_a_teacher_loaded_without_weights_has_its_facts_and_no_memory(teacher_dir):
    full, bare = load_teacher(str(teacher_dir)), load_teacher(str(teacher_dir), weights=False)
    assert (bare.feature_dim, bare.input_size, bare.id2label, bare.mean) == (
        full.feature_dim, full.input_size, full.id2label, full.mean)
    assert all(p.is_meta for p in bare.model.parameters()) and bare.weights_sha256 is None
    assert full.weights_sha256 == weights_sha256(full.model)


@pytest.mark.slow
def test_resume_reloads_the_named_teacher_bit_exactly_and_refuses_other_weights(nct_mini_dir, teacher_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert distill.main(_flags(nct_mini_dir, teacher_dir, straight)) == 0
    checkpoint = straight / "checkpoint-4"
    assert not [k for k in _keys(checkpoint) if k.startswith("teacher.")]  # named, not stored
    assert [k for k in _keys(checkpoint) if k.startswith("key_head.")]  # g_T is part of the state
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["teacher_name_or_path"] == str(teacher_dir) and config["teacher_revision"] == "main"
    assert config["teacher_weights_sha256"] == weights_sha256(load_teacher(str(teacher_dir)).model)

    shutil.copytree(checkpoint, resumed / "checkpoint-4")
    assert distill.main(_flags(nct_mini_dir, teacher_dir, resumed, "--resume_from_checkpoint",
                               str(resumed / "checkpoint-4"))) == 0
    expected, got = load_file(straight / "checkpoint-8" / "model.safetensors"), load_file(
        resumed / "checkpoint-8" / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)

    # from_pretrained gets the teacher back by name: the very weights of the folder.
    model = MoMAForDistillation.from_pretrained(checkpoint)
    reference = load_teacher(str(teacher_dir)).model.state_dict()
    assert all(torch.equal(model.teacher.state_dict()[name], reference[name]) for name in reference)

    # Other weights under the same name: resume and from_pretrained refuse, naming teacher, revision, hashes, fix.
    torch.manual_seed(1)
    tiny_vit().save_pretrained(teacher_dir)
    again = tmp_path / "again"
    shutil.copytree(checkpoint, again / "checkpoint-4")
    with pytest.raises(TeacherMismatchError) as error:
        distill.main(_flags(nct_mini_dir, teacher_dir, again, "--resume_from_checkpoint", str(again / "checkpoint-4")))
    message = str(error.value)
    for part in (str(teacher_dir), "revision main", config["teacher_weights_sha256"], "--teacher_model_revision"):
        assert part in message
    with pytest.raises(TeacherMismatchError):
        MoMAForDistillation.from_pretrained(checkpoint)


@pytest.mark.slow
def test_a_momentum_checkpoint_still_holds_its_teacher(nct_mini_dir, tmp_path):
    flags = _flags(nct_mini_dir, "unused", tmp_path / "m", "--student_model_name_or_path", "same-as-teacher",
                   "--teacher_update", "momentum", steps=4)
    student_dir = tmp_path / "student"
    from transformers import AutoModelForImageClassification, TimmWrapperConfig

    labels = dict(enumerate(sorted(p.name for p in nct_mini_dir.iterdir())))
    AutoModelForImageClassification.from_config(TimmWrapperConfig(
        architecture="test_resnet", num_labels=len(labels), id2label=labels)).save_pretrained(student_dir)
    flags[flags.index("unused")] = str(student_dir)
    assert distill.main(flags) == 0
    teacher_keys = [k for k in _keys(tmp_path / "m" / "checkpoint-4") if k.startswith("teacher.")]
    assert teacher_keys  # an EMA of the student: it changes every step, so it is stored


@pytest.mark.slow
def test_cached_training_never_reads_the_teachers_weights(nct_mini_dir, teacher_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cached = ["--cache_teacher_features", "true", "--cache_views", "2", "--teacher_feature_cache_dir", str(cache)]
    released = []
    original_release = MoMAForDistillation.release_teacher

    def release(model):
        released.append(model.teacher is not None and not next(model.teacher.parameters()).is_meta)
        original_release(model)

    monkeypatch.setattr(MoMAForDistillation, "release_teacher", release)
    # First run: the cache is built with the teacher, which is released before training.
    assert distill.main(_flags(nct_mini_dir, teacher_dir, tmp_path / "build", *cached)) == 0
    assert released == [True]  # the teacher that built the cache was released before training

    # Second run: the cache serves; the teacher's weights file is gone, and no weight loader is called.
    (teacher_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    loads = []
    original_load = teachers.load_teacher

    def counting_load(*args, **kwargs):
        loads.append(kwargs.get("weights", True))
        return original_load(*args, **kwargs)

    monkeypatch.setattr(distill, "load_teacher", counting_load)
    seen = []
    original_forward = MoMAForDistillation.forward

    def forward(model, *args, **kwargs):
        seen.append((model.teacher, kwargs.get("teacher_features") is not None))
        return original_forward(model, *args, **kwargs)

    monkeypatch.setattr(MoMAForDistillation, "forward", forward)
    out = tmp_path / "served"
    assert distill.main(_flags(nct_mini_dir, teacher_dir, out, *cached)) == 0
    assert loads == [False]
    assert seen and all(teacher is None and has_features for teacher, has_features in seen)
    assert not [k for k in _keys(out / "checkpoint-8") if k.startswith("teacher.")]
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()  # export and card
    exported = json.loads((out / "config.json").read_text())
    assert exported["distilled_from"]["teacher"] == str(teacher_dir)
    # The served run read no weights, yet its checkpoint names the hash of the teacher that built the cache.
    built = json.loads((tmp_path / "build" / "checkpoint-8" / "config.json").read_text())["teacher_weights_sha256"]
    assert built and json.loads((out / "checkpoint-8" / "config.json").read_text())["teacher_weights_sha256"] == built
    assert json.loads((cache / "cache_info.json").read_text())["teacher_weights_sha256"] == built
    # from_pretrained cannot reload the named teacher (its weights are gone): it fails, naming it, never random.
    with pytest.raises(TeacherMismatchError, match="names .*could not be reloaded"):
        MoMAForDistillation.from_pretrained(out / "checkpoint-8")
    # Other weights under the name, readable: the recorded hash refuses them.
    torch.manual_seed(1)
    tiny_vit().save_pretrained(teacher_dir)
    with pytest.raises(TeacherMismatchError, match=built):
        MoMAForDistillation.from_pretrained(out / "checkpoint-8")


def test_a_model_without_teacher_refuses_a_batch_without_cached_features(small_moma):
    model = small_moma(teacher_update="frozen")
    model.release_teacher()
    assert model.teacher is None and model.config.teacher_config is not None
    images = torch.randn(4, 3, 64, 64)
    with pytest.raises(ValueError, match="no cached teacher_features"):
        model.train()(images, labels=torch.zeros(4, dtype=torch.long))
    features, logits = torch.randn(4, 48), torch.randn(4, 9)
    out = model(images, labels=torch.zeros(4, dtype=torch.long), teacher_features=features, teacher_logits=logits)
    assert torch.isfinite(out.loss)
    kd = small_moma(method="kd")  # the baselines too
    kd.release_teacher()
    kd.train()
    assert kd.teacher is None and kd.teacher_update == "frozen"
    assert torch.isfinite(kd(images, labels=torch.zeros(4, dtype=torch.long), teacher_features=features,
                             teacher_logits=logits).loss)
    with pytest.raises(ValueError, match="no cached teacher_features"):
        kd(images, labels=torch.zeros(4, dtype=torch.long))
    momentum = small_moma(teacher_update="frozen")
    momentum.teacher_update = "momentum"
    with pytest.raises(ValueError, match="momentum teacher"):
        momentum.release_teacher()
