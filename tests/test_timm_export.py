"""A distilled timm student loads with every loader a user has: transformers, the pipeline, and timm's own
`create_model("local-dir:...")` / `create_model("hf-hub:...")` (against the loopback Hub), with one prediction."""

import json

import pytest
import timm
import torch
from conftest import NCT_CLASSES, make_trainer
from huggingface_hub import HfApi
from PIL import Image
from safetensors import safe_open
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline


@pytest.fixture
def exported_student(small_moma, nct_mini_dir, tmp_path):
    """`(output_dir, trainer)` after 2 training steps of a timm student and `trainer.save_model()`."""
    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path / "out", max_steps=2, save_steps=100)
    trainer.train()
    trainer.save_model()
    return tmp_path / "out", trainer


def _patches(nct_mini_dir, n=8):
    files = sorted(nct_mini_dir.glob("*/*.jpg"))
    return [Image.open(files[i * len(files) // n]).convert("RGB") for i in range(n)]


def _timm_logits(model, images):
    """Logits of a timm model on `images`, preprocessed by timm's own eval transform from the model's config."""
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    with torch.no_grad():
        return model.eval()(torch.stack([transform(image) for image in images]))


def test_exported_timm_student_gives_one_prediction_through_every_loader(exported_student, nct_mini_dir, hub):
    out, trainer = exported_student
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"] == {}, "timm's loader calls model_args.get(...): a null fails"
    assert config["architecture"] == "test_resnet" and config["num_classes"] == len(NCT_CLASSES)
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    assert keys and not any(key.startswith("timm_model.") for key in keys), keys[:3]

    images = _patches(nct_mini_dir)
    processor = AutoImageProcessor.from_pretrained(out)
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        trained = trainer.distillation_model.student.eval()(pixel_values=pixels).logits
        reloaded = AutoModelForImageClassification.from_pretrained(out).eval()(pixel_values=pixels).logits
    torch.testing.assert_close(reloaded, trained)

    # timm's own loader and its own preprocessing, from the folder and from the Hub.
    local = timm.create_model(f"local-dir:{out}", pretrained=True)
    torch.testing.assert_close(_timm_logits(local, images), trained, atol=1e-4, rtol=1e-4)
    HfApi().create_repo("user/timm-student")
    HfApi().upload_folder(repo_id="user/timm-student", folder_path=str(out))
    remote = timm.create_model("hf-hub:user/timm-student", pretrained=True)
    torch.testing.assert_close(_timm_logits(remote, images), trained, atol=1e-4, rtol=1e-4)
    assert remote.pretrained_cfg["label_names"] == NCT_CLASSES

    results = pipeline("image-classification", model=str(out))(images, top_k=1)
    expected = [NCT_CLASSES[i] for i in trained.argmax(-1).tolist()]
    assert [r[0]["label"] for r in results] == expected
    scores = trained.softmax(-1).max(-1).values.tolist()
    assert [r[0]["score"] for r in results] == pytest.approx(scores, abs=1e-4)
