"""Teacher-feature cache: cached outputs are the teacher on the student's very crop, and training from the cache
equals training with the teacher running on the same views."""

from functools import partial

import pytest
import torch
from conftest import make_trainer, tiny_vit

from moma_hf.commands.teacher_cache import cache_teacher_outputs, find_ready_cache
from moma_hf.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BuildSettings,
    EndlessStream,
    PatchCollator,
    TeacherFeatureCache,
    add_row_index,
    build_feature_cache,
    build_train_transform,
    dataset_fingerprint,
    example_key,
    load_patch_dataset,
)
from moma_hf.data.feature_cache import ROW_KEY
from moma_hf.networks.backbones import pooled_features

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
    cache = build_feature_cache(partial(pooled_features, teacher), dataset, _collator(views=2), tmp_path / "cache",
                                {"teacher": "tiny"}, BuildSettings(batch_size=24, shard_size=48, progress=False))
    assert cache.num_rows == len(dataset) and TeacherFeatureCache(tmp_path / "cache").views == 2
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "cache_info.json", "shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]

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
    trainer.data_collator.set_views(2)  # the uncached run augments with the same two views
    if cached:
        facts = {"teacher": "tiny", "image_size": 64}
        trainer.train_dataset = cache_teacher_outputs(trainer.model, trainer.train_dataset, trainer.data_collator,
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
        cache_teacher_outputs(trainer.model, trainer.train_dataset.remove_columns(ROW_KEY), trainer.data_collator,
                              trainer.args, {"teacher": "tiny", "image_size": 96})


def test_the_cache_refuses_momentum_teachers(small_moma, nct_mini_dir, tmp_path):
    momentum = make_trainer(small_moma, nct_mini_dir, tmp_path / "m", teacher="same", cache_teacher_features=True)
    with pytest.raises(ValueError, match="frozen teacher"):
        cache_teacher_outputs(momentum.model, momentum.train_dataset, momentum.data_collator, momentum.args, {})


def test_the_collator_takes_a_cache_only_for_its_own_views(nct_mini_dir, tmp_path):
    """Attaching a cache after construction runs the same check as the constructor: the views must match."""
    dataset = add_row_index(load_patch_dataset(str(nct_mini_dir), "train", streaming=False).select(range(8)))
    teacher = tiny_vit().eval()
    cache = build_feature_cache(partial(pooled_features, teacher), dataset, _collator(views=2), tmp_path / "c", {},
                                BuildSettings(batch_size=8, progress=False))
    for collator in (_collator(views=3), _collator(views=None)):
        with pytest.raises(ValueError, match="The feature cache holds 2 views"):
            collator.use_feature_cache(cache)
        assert collator.feature_cache is None
    with pytest.raises(ValueError, match="The feature cache holds 2 views"):
        _collator(views=3, cache=cache)
    collator = _collator(views=2)
    collator.use_feature_cache(cache)
    with pytest.raises(ValueError, match="The feature cache holds 2 views; the collator was given 4"):
        collator.set_views(4)  # a cache never serves crops of other views
    with pytest.raises(ValueError, match="positive integer"):
        _collator(views=0)
    assert set(collator([dataset[0], dataset[5]])) == {"pixel_values", "teacher_features", "teacher_logits", "labels"}
    with pytest.raises(ValueError, match="fixed views and no cache"):  # built from pixels, never from a cache
        build_feature_cache(partial(pooled_features, teacher), dataset, collator, tmp_path / "d", {})


def test_the_dataset_fingerprint_follows_the_data(nct_mini_dir):
    """Pins `dataset_fingerprint`, the one use of datasets' private `Dataset._fingerprint`: a datasets upgrade that
    changes it fails here. The same data loaded twice has one fingerprint; other rows or columns another."""
    first = load_patch_dataset(str(nct_mini_dir), "train", streaming=False)
    again = load_patch_dataset(str(nct_mini_dir), "train", streaming=False)
    fingerprint = dataset_fingerprint(first)
    assert isinstance(fingerprint, str) and len(fingerprint) >= 16
    assert dataset_fingerprint(again) == fingerprint
    assert dataset_fingerprint(first.select(range(10))) != fingerprint
    assert dataset_fingerprint(add_row_index(first)) != fingerprint


def test_the_data_package_knows_no_model():
    """`moma_hf/data` imports nothing from the networks, modules, models, training or evaluation: the teacher
    reaches the feature cache as a callable."""
    import ast
    from pathlib import Path

    import moma_hf.data

    above = ("networks", "modules", "modeling", "configuration", "training", "trainer", "evaluation", "losses", "hub",
             "commands")
    for path in Path(moma_hf.data.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                top = module.lstrip(".").removeprefix("moma_hf.").split(".")[0]
                assert node.level < 2 and not top.startswith(above), f"{path.name} imports {module}"
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("moma_hf") for alias in node.names), path.name


def _subset_folder(nct_mini_dir, root, count):
    """The first `count` patches of nct-crc-mini in their class folders under `root`."""
    import shutil

    for file in sorted(nct_mini_dir.glob("*/*.jpg"))[:count]:
        (root / file.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, root / file.parent.name / file.name)
    return root


@pytest.mark.slow
def test_half_precision_storage_rounds_the_float32_outputs_and_halves_the_shards(nct_mini_dir, tmp_path):
    torch.manual_seed(0)
    teacher = tiny_vit().eval()
    dataset = add_row_index(load_patch_dataset(str(nct_mini_dir), "train", streaming=False).select(range(24)))
    caches = {dtype: build_feature_cache(partial(pooled_features, teacher), dataset, _collator(views=2),
                                         tmp_path / dtype, {}, BuildSettings(batch_size=8, shard_size=8,
                                                                             storage_dtype=dtype, progress=False))
              for dtype in ("float32", "float16", "bfloat16")}
    rows, views = [i for i in range(24) for _ in range(2)], [v for _ in range(24) for v in range(2)]
    keys = [example_key(dataset[row]["image"]) for row in rows]
    found = {dtype: cache.lookup(views, keys, rows=rows) for dtype, cache in caches.items()}
    exact = found["float32"]
    # Relative rounding error: at most half a unit in the last place (float16 below 2**-14 is subnormal: absolute).
    for dtype, bound in (("float16", 2.0 ** -11), ("bfloat16", 2.0 ** -8)):
        for name, values in found[dtype].items():
            assert values.dtype == torch.float32
            rounded = exact[name].to(getattr(torch, dtype)).float()  # torch's rounding, not the cache's
            torch.testing.assert_close(values, rounded, rtol=0, atol=0)
            assert ((values - exact[name]).abs() <= bound * exact[name].abs() + 2.0 ** -25).all()
    size = {dtype: sum(f.stat().st_size for f in (tmp_path / dtype).glob("shard-*")) for dtype in caches}
    # The outputs take half the bytes; each shard's keys, schema and metadata (about 1 KB here) stay.
    payload = 24 * 2 * (48 + 9) * 4  # rows x views x (features + logits) x 4 bytes
    assert abs(size["float32"] - size["float16"] - payload / 2) <= 3 * 64
    assert abs(size["bfloat16"] - size["float16"]) <= 3 * 64  # its metadata says "bfloat16", its type uint16


def test_a_stream_example_missing_from_the_cache_and_a_cache_of_another_run_raise(small_moma, nct_mini_dir,
                                                                                   tmp_path):
    few = _subset_folder(nct_mini_dir, tmp_path / "few", 12)
    teacher = tiny_vit().eval()
    stream = load_patch_dataset(str(few), "train", streaming=True, seed=0)
    cache = build_feature_cache(partial(pooled_features, teacher), stream, _collator(views=2), tmp_path / "c", {},
                                BuildSettings(batch_size=4, shard_size=5, progress=False))
    assert cache.num_rows == 12 and cache.info["num_shards"] == 3 and cache.info["streaming"]
    collator = _collator(views=2, cache=cache)
    known = next(iter(stream))
    last = sorted(nct_mini_dir.glob("*/*.jpg"))[-1]  # not among the first 12
    other = next(e for e in load_patch_dataset(str(nct_mini_dir), "train", streaming=True)
                 if e["image"]["path"] == str(last))
    assert set(collator([known])) == {"pixel_values", "teacher_features", "teacher_logits", "labels"}
    with pytest.raises(KeyError, match=f"{last.name}.*Delete the folder"):
        collator([known, other])

    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path / "run", streaming=True, cache_teacher_features=True,
                           cache_views=2, teacher_feature_cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="built for another run .*seed: cache has 3, this run needs 0"):
        find_ready_cache(trainer.train_dataset, trainer.data_collator, trainer.args, {})


def test_a_map_style_row_holding_another_example_raises(nct_mini_dir, tmp_path):
    dataset = add_row_index(load_patch_dataset(str(nct_mini_dir), "train", streaming=False).select(range(6)))
    cache = build_feature_cache(partial(pooled_features, tiny_vit().eval()), dataset, _collator(views=1),
                                tmp_path / "c", {}, BuildSettings(batch_size=6, progress=False))
    collator = _collator(views=1, cache=cache)
    moved = {**dataset[4], ROW_KEY: 3}  # an example that lands on another example's row
    with pytest.raises(ValueError, match="holds other examples at the rows of .*the training set changed"):
        collator([dataset[0], moved])


def _stream_run(small_moma, nct_mini_dir, out, cache_dir, crash_at=None, resume=False, cached=True):
    from test_resume import _Crash

    trainer = make_trainer(small_moma, nct_mini_dir, out, streaming=True, max_steps=12, save_steps=6,
                           cache_teacher_features=cached, cache_views=2, cache_shard_size=40,
                           teacher_feature_cache_dir=str(cache_dir))
    trainer.data_collator.set_views(2)  # an uncached run augments with the same two views
    if cached:
        stream = cache_teacher_outputs(trainer.model, trainer.train_dataset.dataset, trainer.data_collator,
                                       trainer.args, {"teacher": "tiny"})
        trainer.train_dataset = EndlessStream(stream)  # as the trainer wraps a stream given to it (main's order)
    calls = []
    trainer.model.teacher.register_forward_pre_hook(lambda *_: calls.append(1))
    if crash_at:
        trainer.add_callback(_Crash(at_step=crash_at))
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
        return trainer, calls
    trainer.train(resume_from_checkpoint=resume or None)
    return trainer, calls


@pytest.mark.slow
def test_a_stream_distils_from_its_cache_and_resumes_exactly(small_moma, nct_mini_dir, tmp_path):
    from test_resume import _assert_bit_identical, _state

    cache_dir = tmp_path / "cache"
    straight, calls = _stream_run(small_moma, nct_mini_dir, tmp_path / "straight", cache_dir)
    assert not calls and straight.state.global_step == 12  # 12 steps of 16 cross the 129-patch epoch: both views
    built = {f.name: f.stat().st_mtime_ns for f in cache_dir.iterdir()}
    plain, plain_calls = _stream_run(small_moma, nct_mini_dir, tmp_path / "plain", cache_dir, cached=False)
    assert len(plain_calls) == 12

    def losses(trainer, after=0):
        return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > after])

    torch.testing.assert_close(losses(straight), losses(plain), rtol=1e-3, atol=1e-4)

    _stream_run(small_moma, nct_mini_dir, tmp_path / "resumed", cache_dir, crash_at=6)
    resumed, calls = _stream_run(small_moma, nct_mini_dir, tmp_path / "resumed", cache_dir, resume=True)
    assert not calls and resumed.state.global_step == 12
    _assert_bit_identical(_state(resumed), _state(straight))
    torch.testing.assert_close(losses(resumed, 6), losses(straight, 6), rtol=0, atol=0)
    assert {f.name: f.stat().st_mtime_ns for f in cache_dir.iterdir()} == built  # reused, never rebuilt
