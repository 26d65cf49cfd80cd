"""Unlabeled patches (label -1): loss terms on mixed batches, loading and mixing sources, and a full run."""

import importlib.util
import io
import json
import os

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import NCT_CLASSES, REPO
from PIL import Image

from moma_hf.data import UNLABELED, load_unlabeled_patches, mix_labeled_and_unlabeled, shard_for_process
from moma_hf.losses import info_nce, kd_loss, labeled_cross_entropy
from moma_hf.networks.backbones import pooled_features


def test_labeled_cross_entropy_averages_over_the_labeled_examples_only():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, -1, 2, -1])
    # by hand: -log softmax(row 0)[0] and -log softmax(row 2)[2], averaged over those two
    row0 = -(2.0 - torch.log(torch.exp(torch.tensor([2.0, 0.0, -1.0])).sum()))
    row2 = -(1.0 - torch.log(torch.exp(torch.tensor([0.0, 3.0, 1.0])).sum()))
    torch.testing.assert_close(labeled_cross_entropy(logits, labels), (row0 + row2) / 2)
    assert labeled_cross_entropy(logits, torch.full((4,), -1)).item() == 0.0


def test_a_mixed_batch_trains_ce_on_its_labels_and_kd_and_moma_on_every_example(small_moma, nct_tensors):
    model = small_moma().train()
    assert model.config.w_kd == 1  # the tiny ViT teacher has the student's labels
    pixels, labels = nct_tensors
    model.enqueue(model(pixel_values=pixels[:16], labels=labels[:16]).contrastive_keys)
    mixed = labels[16:32].clone()
    mixed[::3] = UNLABELED
    torch.manual_seed(0)
    out = model(pixel_values=pixels[16:32], labels=mixed)
    torch.manual_seed(0)
    reference = model(pixel_values=pixels[16:32], labels=labels[16:32])  # the same batch, fully labeled
    keep = mixed >= 0
    torch.testing.assert_close(out.loss_ce, F.cross_entropy(out.logits[keep], mixed[keep]))
    with torch.no_grad():
        _, teacher_logits = model.teacher_outputs(pixels[16:32])
    torch.testing.assert_close(out.loss_kd, kd_loss(out.logits, teacher_logits, model.config.kd_temperature))
    torch.testing.assert_close(out.loss_kd, reference.loss_kd)
    torch.testing.assert_close(out.loss_moma, reference.loss_moma)  # labels never enter the contrastive term
    with torch.no_grad():  # InfoNCE over all 16 queries, recomputed from the student's features
        features, _ = pooled_features(model.student, pixels[16:32])
        query = model.query_attention(model.query_head(features))
        expected = info_nce(query, out.contrastive_keys, model.key_queue.queue, model.config.contrastive_temperature,
                            model.key_queue.valid_mask())
    torch.testing.assert_close(out.loss_moma, expected)


def test_a_batch_without_labels_has_finite_losses_and_gradients(small_moma, nct_tensors):
    model = small_moma().train()
    pixels, _ = nct_tensors
    model.enqueue(model(pixel_values=pixels[:16], labels=torch.zeros(16, dtype=torch.long)).contrastive_keys)
    out = model(pixel_values=pixels[16:32], labels=torch.full((16,), UNLABELED))
    assert out.loss_ce.item() == 0.0 and out.loss_moma > 0 and out.loss_kd > 0
    out.loss.backward()
    for module in (model.student, model.query_head, model.query_attention):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in (p.grad for p in model.query_head.parameters()))


@pytest.fixture
def flat_folder(nct_mini_dir, tmp_path):
    """The 129 nct-crc-mini patches, linked into one folder without class sub-folders."""
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    for number, path in enumerate(sorted(nct_mini_dir.glob("*/*.jpg"))):
        os.symlink(path, folder / f"{number:04d}.jpg")
    return folder


def test_an_unlabeled_folder_streams_and_splits_across_two_processes(flat_folder):
    stream = load_unlabeled_patches(str(flat_folder), NCT_CLASSES, streaming=True, seed=0)
    assert stream.features["label"].names == NCT_CLASSES
    examples = list(stream)
    assert len(examples) == 129 and {e["label"] for e in examples} == {UNLABELED}
    parts = [[e["image"]["path"] for e in shard_for_process(stream, rank, 2)] for rank in (0, 1)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(e["image"]["path"] for e in examples)
    assert abs(len(parts[0]) - len(parts[1])) <= 1


def test_parquet_without_labels_loads_as_unlabeled(nct_mini_dir, tmp_path):
    files = sorted(nct_mini_dir.glob("*/*.jpg"))[:6]
    table = datasets.Dataset.from_dict({"img": [{"bytes": f.read_bytes(), "path": None} for f in files]},
                                       features=datasets.Features({"img": datasets.Image()}))
    table.to_parquet(str(tmp_path / "patches.parquet"))
    data = load_unlabeled_patches(str(tmp_path / "patches.parquet"), NCT_CLASSES, streaming=False,
                                   image_column="img")
    assert data["label"] == [UNLABELED] * 6
    assert Image.open(io.BytesIO(data[0]["image"]["bytes"])).size == (224, 224)


def test_mixing_in_natural_proportions_or_at_a_labeled_fraction(nct_mini_dir, flat_folder):
    from moma_hf.data import load_patch_dataset

    labeled = load_patch_dataset(str(nct_mini_dir), streaming=False)
    unlabeled = load_unlabeled_patches(str(flat_folder), NCT_CLASSES, streaming=False)
    natural = mix_labeled_and_unlabeled(labeled, unlabeled)
    assert len(natural) == 258 and natural["label"].count(UNLABELED) == 129
    with pytest.raises(ValueError, match="--labeled_fraction"):
        mix_labeled_and_unlabeled(load_patch_dataset(str(nct_mini_dir)), unlabeled)
    stream = mix_labeled_and_unlabeled(load_patch_dataset(str(nct_mini_dir)),
                                       load_unlabeled_patches(str(flat_folder), NCT_CLASSES), 0.25, seed=0)
    first = [e["label"] for e in stream.take(400)]
    assert 0.15 < sum(label >= 0 for label in first) / len(first) < 0.35


def test_distill_runs_on_labeled_and_unlabeled_patches_and_logs_the_labeled_fraction(flat_folder, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.chdir(REPO)  # the demo config names its teacher and data relative to the repository
    spec = importlib.util.spec_from_file_location("distill", REPO / "examples" / "distill.py")
    distill = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(distill)
    out = tmp_path / "run"
    assert distill.main(["--max_steps", "6", "--logging_steps", "2", "--save_strategy", "no", "--report_to", "none",
                         "--per_device_train_batch_size", "8", "--disable_tqdm", "true", "--output_dir", str(out),
                         "--unlabeled_dir", str(flat_folder), "--labeled_fraction", "0.5"]) == 0
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(logs) == 3 and all(0 < h["labeled_fraction"] < 1 for h in logs)
    assert all(h["loss_moma"] > 0 and h["loss_kd"] > 0 for h in logs[1:])
