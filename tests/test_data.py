"""Tests for moma_hf.data (loading, sources, collator) on real H&E patches (read-only: we write only to tmp_path)."""
import io
import json
import random
import shutil
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, launch_two_processes
from PIL import Image

from moma_hf.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BadImageWarning,
    PatchCollator,
    build_eval_transform,
    build_train_transform,
    label_names,
    load_patch_dataset,
    load_rgb_image,
    shard_for_process,
)
from moma_hf.data import collator as collator_module
from moma_hf.data.sources import looks_like_local_path, with_known_features

NCT_CLASSES = ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
HALF = ((0.5,) * 3, (0.5,) * 3)
IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)


def _nct_files(nct_mini_dir):
    return sorted(nct_mini_dir.glob("*/*.jpg"))


def _by_name(dataset):
    """{file name: label} over a whole dataset."""
    return {Path(ex["image"]["path"]).name: ex["label"] for ex in dataset}


def _eval_pixels(dataset):
    """The eval-transformed pixels ``(N, 3, 64, 64)`` of a dataset, in file-name order."""
    examples = sorted(dataset, key=lambda ex: Path(ex["image"]["path"]).name)
    return PatchCollator(build_eval_transform(64), HALF)(examples)["pixel_values"]


@pytest.fixture(scope="module")
def nct_parquet(nct_mini_dir, tmp_path_factory):
    """nct-crc-mini as one parquet file, written with pyarrow: image bytes in ``img``, class names in ``tissue``."""
    files = _nct_files(nct_mini_dir)
    table = pa.table(
        {
            "img": [{"bytes": f.read_bytes(), "path": f.name} for f in files],
            "tissue": [f.parent.name for f in files],
            "slide": [f"slide-{i % 7}" for i in range(len(files))],
        }
    )
    path = tmp_path_factory.mktemp("parquet") / "nct.parquet"
    pq.write_table(table, path, row_group_size=32)
    return path


@pytest.fixture(scope="module")
def nct_tar(nct_mini_dir, tmp_path_factory):
    """nct-crc-mini as a webdataset tar: ``<key>.jpg`` + ``<key>.cls`` (the class index as text)."""
    path = tmp_path_factory.mktemp("wds") / "nct-000000.tar"
    with tarfile.open(path, "w") as tar:
        for f in _nct_files(nct_mini_dir):
            for ext, payload in (("jpg", f.read_bytes()), ("cls", str(NCT_CLASSES.index(f.parent.name)).encode())):
                info = tarfile.TarInfo(f"{f.stem}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


# ---- loading ----------------------------------------------------------------------------------------
def test_imagefolder_streaming_crc_polyp(crc_polyp_dir):
    dataset = load_patch_dataset(str(crc_polyp_dir), "train")
    assert isinstance(dataset, datasets.IterableDataset)
    assert dataset.column_names == ["image", "label"]
    assert label_names(dataset) == ["AC", "H", "S", "T", "V"]
    assert dataset.num_shards >= 2  # DataLoader workers each get shards
    examples = list(dataset.take(300))
    labels = Counter(ex["label"] for ex in examples)
    assert set(labels) == set(range(5))  # shuffled across classes, not class by class
    assert all(Path(ex["image"]["path"]).parent.parent == crc_polyp_dir / "train" for ex in examples)
    assert all(Path(ex["image"]["path"]).parent.name == "AC H S T V".split()[ex["label"]] for ex in examples)
    batch = PatchCollator(build_train_transform(96), IMAGENET, HALF, num_labels=5)(examples[:16])
    assert batch["pixel_values"].shape == batch["teacher_pixel_values"].shape == (16, 3, 96, 96)
    assert batch["labels"].dtype == torch.int64 and batch["labels"].tolist() == [ex["label"] for ex in examples[:16]]


def test_imagefolder_nct_mini_map_and_streaming(nct_mini_dir):
    mapped = load_patch_dataset(str(nct_mini_dir), streaming=False)
    streamed = load_patch_dataset(str(nct_mini_dir), "train")
    assert isinstance(mapped, datasets.Dataset) and len(mapped) == 129
    assert label_names(mapped) == label_names(streamed) == NCT_CLASSES
    assert mapped.features["image"] == datasets.Image(decode=False)
    assert _by_name(mapped) == _by_name(streamed)
    assert Counter(_by_name(mapped).values())[NCT_CLASSES.index("BACK")] == 3


def test_streaming_shuffles_train_per_epoch_only(nct_mini_dir, crc_polyp_dir):
    train = load_patch_dataset(str(nct_mini_dir), "train")
    first = [ex["image"]["path"] for ex in train]
    train.set_epoch(1)
    second = [ex["image"]["path"] for ex in train]
    assert first != second and sorted(first) == sorted(second)
    test = load_patch_dataset(str(crc_polyp_dir), "test")
    paths = [ex["image"]["path"] for ex in test.take(50)]
    assert paths == sorted(paths) == [ex["image"]["path"] for ex in test.take(50)]


@pytest.mark.parametrize("streaming", [True, False])
def test_parquet_and_webdataset_match_imagefolder(nct_mini_dir, nct_parquet, nct_tar, streaming, monkeypatch):
    # datasets sleeps 5 s after each pass over a shuffled parquet stream (an Arrow shutdown workaround).
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    folder = load_patch_dataset(str(nct_mini_dir), streaming=streaming)
    parquet = load_patch_dataset(str(nct_parquet), streaming=streaming, image_column="img", label_column="tissue")
    tar = load_patch_dataset(str(nct_tar), streaming=streaming)  # image/label columns found: jpg, cls
    for dataset in (parquet, tar):
        assert dataset.column_names == ["image", "label"]
        assert isinstance(dataset.features["label"], datasets.ClassLabel)
    assert label_names(parquet) == NCT_CLASSES  # names inferred from the string values, sorted
    assert label_names(tar) == [str(i) for i in range(9)]  # integer values: their sorted string forms
    expected = _by_name(folder)
    assert _by_name(parquet) == _by_name(tar) == expected  # webdataset paths are "<key>.jpg"
    reference = _eval_pixels(folder)
    assert torch.equal(_eval_pixels(parquet), reference) and torch.equal(_eval_pixels(tar), reference)


def test_parquet_integer_labels_are_reindexed(nct_mini_dir, tmp_path):
    files = _nct_files(nct_mini_dir)[:6]
    table = pa.table({"image": [f.read_bytes() for f in files], "label": [30, 10, 20, 10, 30, 20]})
    pq.write_table(table, tmp_path / "a.parquet")
    for streaming in (True, False):
        dataset = load_patch_dataset(str(tmp_path / "a.parquet"), "test", streaming=streaming)
        assert label_names(dataset) == ["10", "20", "30"]
        assert [ex["label"] for ex in dataset] == [2, 0, 1, 0, 2, 1]


def test_split_dataset_by_node_is_disjoint_and_complete(nct_mini_dir):
    for dataset in (load_patch_dataset(str(nct_mini_dir)), load_patch_dataset(str(nct_mini_dir), streaming=False)):
        parts = [[ex["image"]["path"] for ex in shard_for_process(dataset, rank, 2)] for rank in (0, 1)]
        assert not set(parts[0]) & set(parts[1])
        assert sorted(parts[0] + parts[1]) == sorted(str(f) for f in _nct_files(nct_mini_dir))
        assert abs(len(parts[0]) - len(parts[1])) <= 1


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.slow
def test_two_process_launch_dispatches_disjoint_batches(nct_mini_dir, tmp_path):
    even = tmp_path / "even"  # 128 images: 16 full global batches of 2 x 4
    shutil.copytree(nct_mini_dir, even, ignore=shutil.ignore_patterns("*.csv"))
    _nct_files(even)[-1].unlink()
    out = tmp_path / "out"
    out.mkdir()
    launch_two_processes(REPO / "tests" / "_data_launch_worker.py", "--data", even, nct_mini_dir, "--out", out)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["num_processes"] for r in ranks] == [2, 2] and "MULTI_CPU" in ranks[0]["distributed_type"]
    (even0, full0), (even1, full1) = ranks[0]["datasets"], ranks[1]["datasets"]
    # 128 images: every step gives both ranks 4 images; together they see each image exactly once.
    assert even0["sizes"] == even1["sizes"] == [4] * 16
    assert not set(even0["ids"]) & set(even1["ids"])
    assert sorted(even0["ids"] + even1["ids"]) == list(range(128))
    # 129 images: the stream ends on both ranks at the same step, with equal batches; Accelerate pads the
    # odd last global batch with a sample from the first one.
    assert full0["sizes"] == full1["sizes"] == [4] * 16 + [1]
    assert set(full0["ids"]) | set(full1["ids"]) == set(range(129))


# ---- errors -----------------------------------------------------------------------------------------
def test_missing_columns_name_the_column_and_the_flag(nct_parquet):
    with pytest.raises(ValueError, match=r"image column 'image'.*'img', 'tissue', 'slide'.*--image_column_name"):
        load_patch_dataset(str(nct_parquet))
    with pytest.raises(ValueError, match=r"label column 'label'.*'tissue'.*--label_column_name"):
        load_patch_dataset(str(nct_parquet), image_column="img", streaming=False)
    with pytest.raises(ValueError, match=r"image column 'pixels'"):
        load_patch_dataset(str(nct_parquet), image_column="pixels", label_column="tissue")


def test_missing_path_and_empty_split_errors(tmp_path, crc_polyp_dir):
    with pytest.raises(ValueError, match="does not exist"):
        load_patch_dataset(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"no 'validation' split.*\['test', 'train'\]"):
        load_patch_dataset(str(crc_polyp_dir), "validation")
    for tissue in ("TUM", "STR"):
        (tmp_path / "patches" / "train" / tissue).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"'.*patches/train' is empty"):
        load_patch_dataset(str(tmp_path / "patches"))
    empty = pa.table({"image": pa.array([], pa.binary()), "label": pa.array([], pa.string())})
    pq.write_table(empty, tmp_path / "e.parquet")
    with pytest.raises(ValueError, match=r"'.*e\.parquet' has no rows"):
        load_patch_dataset(str(tmp_path / "e.parquet"))


def test_bad_label_names_the_label_and_range(nct_mini_dir):
    example = {"image": {"path": str(_nct_files(nct_mini_dir)[0]), "bytes": None}}
    collator = PatchCollator(build_eval_transform(32), HALF, num_labels=5)
    with pytest.raises(ValueError, match=r"label 7 of .*ADI.* range\(0, 5\).*--label_column_name"):
        collator([{**example, "label": 7}])
    with pytest.raises(ValueError, match=r"None.*--label_column_name"):
        collator([{**example, "label": None}])


# ---- bad images -------------------------------------------------------------------------------------
@pytest.fixture
def messy_folder(nct_mini_dir, tmp_path):
    """Real patches of two classes, plus a truncated JPEG, an RGBA PNG and a 1x1 PNG made from real patches."""
    root = tmp_path / "messy"
    for tissue in ("LYM", "TUM"):
        (root / tissue).mkdir(parents=True)
        for f in sorted((nct_mini_dir / tissue).glob("*.jpg"))[:5]:
            shutil.copy(f, root / tissue / f.name)
    source = sorted((nct_mini_dir / "TUM").glob("*.jpg"))[-1]
    data = source.read_bytes()
    (root / "TUM" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    rgba = Image.open(source).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))  # alpha 0 at the top row
    rgba.save(root / "LYM" / "alpha.png")
    Image.open(source).resize((1, 1)).save(root / "LYM" / "tiny.png")
    return root


def test_collator_skips_corrupt_image_and_converts_odd_ones(messy_folder):
    dataset = load_patch_dataset(str(messy_folder), streaming=False)
    assert len(dataset) == 13
    collator = PatchCollator(build_train_transform(64), IMAGENET, HALF, num_labels=2)
    with pytest.warns(BadImageWarning, match=r"truncated\.jpg") as caught:
        batches = [collator([dataset[i] for i in range(start, start + 5)]) for start in (0, 5)] + [
            collator([dataset[i] for i in range(10, 13)])
        ]
    assert len([w for w in caught if issubclass(w.category, BadImageWarning)]) == 1
    assert [len(b["labels"]) for b in batches] == [5, 5, 3]  # the batch size is kept
    assert all(torch.isfinite(b["pixel_values"]).all() for b in batches)
    assert all(b["teacher_pixel_values"].shape == b["pixel_values"].shape for b in batches)
    assert (collator.num_seen, collator.num_bad) == (13, 1)
    assert collator.bad_files == [str(messy_folder / "TUM" / "truncated.jpg")]
    alpha = load_rgb_image(str(messy_folder / "LYM" / "alpha.png"))
    tiny = load_rgb_image(str(messy_folder / "LYM" / "tiny.png"))
    assert alpha.mode == tiny.mode == "RGB" and alpha.getpixel((100, 0)) == (255, 255, 255)  # transparent -> white
    assert build_train_transform(64)(tiny).shape == (3, 64, 64)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_load_rgb_image_converts_modes(nct_mini_dir, mode):
    image = Image.open(_nct_files(nct_mini_dir)[0])
    if mode == "I;16":  # a full-range 16-bit scan
        converted = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
    else:
        converted = image.convert("L").convert(mode) if mode in ("I", "F") else image.convert(mode)
    buffer = io.BytesIO()
    converted.save(buffer, format="TIFF" if mode in ("CMYK", "I;16", "I", "F") else "PNG")
    rgb = load_rgb_image({"bytes": buffer.getvalue(), "path": None})
    assert rgb.mode == "RGB" and rgb.size == image.size
    gray = np.asarray(rgb.convert("L"), dtype=np.float64)
    reference = np.asarray(image.convert("L"), dtype=np.float64)
    assert abs(gray.mean() - reference.mean()) < (60 if mode == "1" else 8)  # same brightness, not black or white


def test_bad_fraction_threshold_error(nct_mini_dir):
    files = _nct_files(nct_mini_dir)[:10]
    good = [{"image": {"path": str(f), "bytes": None}, "label": 0} for f in files]
    broken = [{"image": {"path": f"slide{i}.jpg", "bytes": f.read_bytes()[:300]}, "label": 0}
              for i, f in enumerate(files[:2])]
    lenient = PatchCollator(build_eval_transform(32), HALF, max_bad_fraction=0.1, min_samples_for_threshold=5)
    with pytest.warns(BadImageWarning):
        lenient(broken[:1] + good[1:])  # 1 of 10 = 10%: allowed
    strict = PatchCollator(build_eval_transform(32), HALF, max_bad_fraction=0.1, min_samples_for_threshold=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        expected = r"2 of 10 images \(20\.00%\).*10\.00%.*slide0\.jpg.*--max_bad_image_fraction"
        with pytest.raises(ValueError, match=expected):
            strict(broken + good[2:])
        with pytest.raises(ValueError, match=r"Every image of a batch of 2.*slide0\.jpg.*slide1\.jpg"):
            PatchCollator(build_eval_transform(32), HALF)(broken)


def test_collator_normalises_the_same_crop_twice(nct_mini_dir):
    examples = [{"image": {"path": str(f), "bytes": None}, "label": 3} for f in _nct_files(nct_mini_dir)[:4]]
    batch = PatchCollator(build_train_transform(48), IMAGENET, HALF)(examples)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
    assert torch.allclose(batch["pixel_values"] * std + mean, batch["teacher_pixel_values"] * 0.5 + 0.5, atol=1e-5)
    student_only = PatchCollator(build_eval_transform(48), IMAGENET)(examples)
    assert set(student_only) == {"pixel_values", "labels"} and student_only["labels"].tolist() == [3] * 4


def test_per_image_seeding_draws_what_torch_manual_seed_drew(nct_mini_dir, monkeypatch):
    """The collator seeds torch's CPU generator alone (cheaper, GPUs untouched); the crops stay those that the
    global `torch.manual_seed` gave, with RandAugment and stain jitter drawing on all three generators."""
    examples = [{"image": {"path": str(f), "bytes": None}, "label": 1} for f in _nct_files(nct_mini_dir)[:12]]
    transform = build_train_transform(48, randaugment="rand-n2-m10-mstd0.5", stain_jitter=0.05)
    batch = PatchCollator(transform, IMAGENET, seed=7)(examples)

    def global_seeding(seed):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)

    monkeypatch.setattr(collator_module, "_seed_everything", global_seeding)
    reference = PatchCollator(transform, IMAGENET, seed=7)(examples)
    assert torch.equal(batch["pixel_values"], reference["pixel_values"])
    assert len({crop.sum().item() for crop in batch["pixel_values"]}) == len(examples)  # real, distinct draws


def test_a_stream_that_declares_no_columns_gets_them_from_its_first_examples(nct_mini_dir):
    """`with_known_features` replaces datasets' private `IterableDataset._resolve_features` with public calls."""
    files = _nct_files(nct_mini_dir)[:3]

    def examples():
        for file in files:
            yield {"image": {"bytes": file.read_bytes(), "path": file.name}, "label": file.parent.name}

    stream = datasets.IterableDataset.from_generator(examples)
    assert stream.features is None
    typed = with_known_features(stream, "the stream")
    assert typed.features == datasets.Features({"image": {"bytes": datasets.Value("binary"),
                                                          "path": datasets.Value("string")},
                                                "label": datasets.Value("string")})
    assert [e["image"]["path"] for e in typed] == [f.name for f in files]
    assert with_known_features(typed, "the stream") is typed
    with pytest.raises(ValueError, match="the empty stream yielded no example"):
        with_known_features(datasets.IterableDataset.from_generator(lambda: iter(())), "the empty stream")


@pytest.mark.parametrize("name, local", [("org/name", False), ("name", False), ("./name", True), ("a/b/c", True),
                                         ("~/data", True), ("/abs/path", True)])
def test_a_local_path_is_told_from_a_hub_id(name, local):
    assert looks_like_local_path(name) is local
