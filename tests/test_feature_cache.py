"""Teacher-feature cache: cached outputs are the teacher on the student's very crop, and training from the cache
equals training with the teacher running on the same views."""

import pytest
import torch

from conftest import make_trainer, tiny_vit
from moma_hf.networks.backbones import pooled_features
from moma_hf.data.collator import PatchCollator
from moma_hf.data.loading import load_patch_dataset
from moma_hf.data.feature_cache import ROW_KEY, TeacherFeatureCache, add_row_index, attach_feature_cache, build_feature_cache
from moma_hf.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_train_transform

TEACHER_NORM = ([0.5] * 3, [0.5] * 3)  # unlike the student's, so the teacher's input is its own tensor


def _collator(views, cache=None):
    transform = build_train_transform(64, randaugment="rand-n2-m10-mstd0.5", stain_jitter=0.05)
    return PatchCollator(transform, (IMAGENET_MEAN, IMAGENET_STD), TEACHER_NORM, seed=3, views=views,
                         feature_cache=cache)


@pytest.mark.slow
def test_cached_features_are_the_teacher_on_the_student_crop(nct_mini_dir, tmp_path):
    torch.manual_seed(0)
    teacher = tiny_vit().eval()
    dataset = add_row_index(load_patch_dataset(str(nct_mini_dir), "train", streaming=False))
    cache = build_feature_cache(teacher, dataset, _collator(views=2), tmp_path / "cache", {"teacher": "tiny"},
                                batch_size=48, progress=False)
    assert cache.table.num_rows == 2 * len(dataset) and TeacherFeatureCache(tmp_path / "cache").views == 2

    # A training batch of epoch 5 (view 1), in another order and batch than the cache was built with.
    examples = [dataset[i] for i in (100, 7, 64, 7, 128, 0)]
    cached, reference = _collator(2, cache), _collator(2)
    cached.set_epoch(5)
    reference.set_epoch(1)
    batch, recomputed = cached(examples), reference(examples)
    assert "teacher_pixel_values" not in batch
    torch.testing.assert_close(batch["pixel_values"], recomputed["pixel_values"], rtol=0, atol=0)
    torch.testing.assert_close(batch["pixel_values"][1], batch["pixel_values"][3], rtol=0, atol=0)  # same view
    with torch.no_grad():
        features, logits = pooled_features(teacher, recomputed["teacher_pixel_values"])
    torch.testing.assert_close(batch["teacher_features"], features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batch["teacher_logits"], logits, rtol=1e-4, atol=1e-5)
    reference.set_epoch(0)  # another view is another crop
    assert not torch.equal(reference(examples)["pixel_values"], batch["pixel_values"])


def _train(small_moma, nct_mini_dir, out, cached: bool):
    trainer = make_trainer(small_moma, nct_mini_dir, out, max_steps=6, save_strategy="no",
                           cache_teacher_features=cached, cache_views=2)
    trainer.data_collator.views = 2  # the uncached run augments with the same two views
    if cached:
        facts = {"teacher": "tiny", "image_size": 64}
        trainer.train_dataset = attach_feature_cache(trainer.model, trainer.train_dataset, trainer.data_collator,
                                                     trainer.args, facts)
    calls = []
    trainer.model.teacher.register_forward_pre_hook(lambda *_: calls.append(1))
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return losses, len(calls), trainer


@pytest.mark.slow
def test_distilling_from_the_cache_equals_distilling_with_the_teacher(small_moma, nct_mini_dir, tmp_path):
    cached_losses, cached_calls, trainer = _train(small_moma, nct_mini_dir, tmp_path / "cached", cached=True)
    losses, calls, _ = _train(small_moma, nct_mini_dir, tmp_path / "plain", cached=False)
    assert cached_calls == 0 and calls == 6
    assert len(losses) == 6
    torch.testing.assert_close(torch.tensor(cached_losses), torch.tensor(losses), rtol=1e-3, atol=1e-4)
    assert (tmp_path / "cached" / "_teacher-feature-cache" / "cache_info.json").exists()

    # Reuse checks what the cached crops depend on.
    with pytest.raises(ValueError, match="image_size: cache has 64, this run needs 96"):
        attach_feature_cache(trainer.model, trainer.train_dataset.remove_columns(ROW_KEY), trainer.data_collator,
                             trainer.args, {"teacher": "tiny", "image_size": 96})


def test_the_cache_refuses_streams_and_momentum_teachers(small_moma, nct_mini_dir, tmp_path):
    stream = make_trainer(small_moma, nct_mini_dir, tmp_path / "s", streaming=True, cache_teacher_features=True)
    with pytest.raises(ValueError, match="map-style"):
        attach_feature_cache(stream.model, stream.train_dataset, stream.data_collator, stream.args, {})
    momentum = make_trainer(small_moma, nct_mini_dir, tmp_path / "m", teacher="same", cache_teacher_features=True)
    with pytest.raises(ValueError, match="frozen teacher"):
        attach_feature_cache(momentum.model, momentum.train_dataset, momentum.data_collator, momentum.args, {})
