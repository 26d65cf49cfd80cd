"""The Hub round-trip against a loopback server: push a distilled student, reload it, load teachers by id."""

import pytest
import torch
from conftest import NCT_CLASSES, make_trainer, timm_classifier, tiny_vit
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoModelForImageClassification, ViTImageProcessor, pipeline

from moma_hf.evaluation.metrics import evaluate_and_save
from moma_hf.evaluation.model_card import DistillationModelCardData
from moma_hf.networks.teachers import TeacherLoadError, load_teacher

TOKEN = "hf_moma_secret_write_token_123"


def _push_teacher(repo_id, model, processor=None):
    model.push_to_hub(repo_id)
    if processor is not None:
        processor.push_to_hub(repo_id)


def test_distilled_student_pushes_and_reloads_with_the_same_predictions(hub, small_moma, nct_mini_dir, tmp_path):
    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path / "out", max_steps=4, push_to_hub=True,
                           hub_model_id="user/moma-student", hub_token=TOKEN,
                           teacher_model_name_or_path="org/vit-teacher")
    trainer.model_card_data = DistillationModelCardData(dataset_name="nct-crc-mini", license="cc-by-4.0", image_size=64)
    trainer.train()
    evaluate_and_save(trainer, trainer.train_dataset, NCT_CLASSES)
    trainer.save_model()  # with push_to_hub, the Trainer pushes the exported student and its card

    files = hub.read("user/moma-student", "config.json")
    assert b"timm_wrapper" in files
    student = trainer.distillation_model.student.eval()
    reloaded = AutoModelForImageClassification.from_pretrained("user/moma-student").eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixels).logits, student(pixel_values=pixels).logits)

    images = [Image.open(path).convert("RGB") for path in sorted(nct_mini_dir.glob("*/*_00*.jpg"))[:6]]
    remote = pipeline("image-classification", model="user/moma-student")(images, top_k=1)
    local = pipeline("image-classification", model=str(tmp_path / "out"))(images, top_k=1)
    assert [r[0]["label"] for r in remote] == [r[0]["label"] for r in local]
    assert all(r[0]["label"] in NCT_CLASSES for r in remote)

    card = ModelCard.load("user/moma-student")
    assert card.data.base_model == "org/vit-teacher" and card.data.base_model_relation == "distillation"
    assert card.data.to_dict()["model-index"][0]["results"]
    assert {"histopathology", "knowledge-distillation", "moma", "image-classification"} <= set(card.data.tags)
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".txt"):
            assert TOKEN not in path.read_text(errors="ignore"), path
    assert all(TOKEN.encode() not in p.read_bytes() for p in (tmp_path / "hub").rglob("*") if p.is_file())


def test_teachers_load_by_hub_id_transformers_and_timm(hub):
    vit = tiny_vit()
    processor = ViTImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.7, 0.6, 0.7],
                                  image_std=[0.2, 0.2, 0.2])
    _push_teacher("org/vit-teacher", vit, processor)
    teacher = load_teacher("org/vit-teacher")
    assert teacher.feature_dim == 48 and teacher.input_size == 64
    assert teacher.mean == pytest.approx([0.7, 0.6, 0.7]) and teacher.id2label == dict(enumerate(NCT_CLASSES))
    assert not any(p.requires_grad for p in teacher.model.parameters())

    timm_model = timm_classifier()
    timm_model.push_to_hub("org/timm-teacher")
    timm_teacher = load_teacher("hf-hub:org/timm-teacher", model_init_kwargs={"drop_rate": 0.0})
    assert timm_teacher.feature_dim == 96 and timm_teacher.model.config.model_args == {"drop_rate": 0.0}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(timm_teacher.model(pixel_values=x).logits, timm_model.eval()(pixel_values=x).logits)


def test_missing_and_gated_teachers_say_what_to_do(hub):
    with pytest.raises(TeacherLoadError, match="does not exist"):
        load_teacher("org/no-such-teacher")
    _push_teacher("org/gated-teacher", tiny_vit())
    hub.gate("org/gated-teacher", TOKEN)
    with pytest.raises(TeacherLoadError, match="gated.*hf auth login"):
        load_teacher("org/gated-teacher")
    assert load_teacher("org/gated-teacher", token=TOKEN).feature_dim == 48
    with pytest.raises(TeacherLoadError, match="no revision"):
        load_teacher("org/gated-teacher", revision="v9", token=TOKEN)
