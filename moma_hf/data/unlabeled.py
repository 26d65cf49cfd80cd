"""Unlabeled patches: load a source that has no labels, and mix it with the labeled training set.

An unlabeled example carries the label `UNLABELED` (-1), the value `datasets.ClassLabel` reserves for "no
label", so labeled and unlabeled examples share one schema and flow through the same collator, trainer
and distributed path. The cross-entropy term skips them (`losses.labeled_cross_entropy`); the teacher's
soft labels and the contrastive term need no ground truth and use every example.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from .sources import find_column, folder_dataset, is_image_feature, is_image_file, read_source, with_known_features

UNLABELED = -1


def _without_label(_example: dict) -> dict:
    return {"label": UNLABELED}


def load_unlabeled_patches(
    source: str,
    label_names: list[str],
    split: str = "train",
    *,
    streaming: bool = True,
    name: str | None = None,
    revision: str | None = None,
    data_files=None,
    image_column: str = "image",
    token: str | bool | None = None,
    shuffle_buffer_size: int = 1000,
    seed: int = 42,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load unlabeled patches with the columns `image` and `label` (-1 everywhere).

    Args:
        source: a local folder of images (any layout: flat, or nested folders whose names are ignored), a Hub
            dataset id, or local parquet/tar files; a label column, if any, is ignored.
        label_names: the labeled set's class names, so both share one `ClassLabel` and can be mixed.
        split, streaming, name, revision, data_files, image_column, token, shuffle_buffer_size, seed: as for
            `load_patch_dataset`.
    """
    label = datasets.ClassLabel(names=label_names)
    features = datasets.Features({"image": datasets.Image(decode=False), "label": label})
    path = Path(source).expanduser()
    if path.is_dir() and not any(_is_container(p) for p in path.rglob("*")):
        paths = sorted(os.path.join(folder, f) for folder, _, files in os.walk(path) for f in files if is_image_file(f))
        if not paths:
            raise ValueError(f"No image files under the unlabeled folder '{source}' (extensions such as .jpg, .png).")
        dataset = folder_dataset(paths, [UNLABELED] * len(paths), features, streaming)
    else:
        raw, _ = read_source(source, split, streaming, name, revision, data_files, token)
        raw = with_known_features(raw, source)
        column = find_column(raw.features, image_column, "image", is_image_feature, source)
        raw = raw.cast_column(column, datasets.Image(decode=False)).select_columns([column])
        if column != "image":
            raw = raw.rename_column(column, "image")
        dataset = raw.map(_without_label, features=features)
    if streaming and split == "train":
        dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    return dataset


def _is_container(path: Path) -> bool:
    return path.suffix in (".parquet", ".tar") or path.name.startswith("metadata.")


def mix_labeled_and_unlabeled(labeled, unlabeled, labeled_fraction: float | None = None, seed: int = 42):
    """One training set from both: in natural proportions, or with `labeled_fraction` of the examples labeled.

    Natural proportions concatenate two map-style sets (the Trainer's sampler shuffles them). A fraction
    interleaves them at random with these probabilities until both are exhausted, so the smaller set is
    repeated. Streams have no known size, so they need a fraction.
    """
    if labeled_fraction is None:
        if isinstance(labeled, datasets.Dataset) and isinstance(unlabeled, datasets.Dataset):
            return datasets.concatenate_datasets([labeled, unlabeled])
        raise ValueError(
            "Streams have no known size, so their natural proportions are unknown: give --labeled_fraction, "
            "the share of labeled examples in each batch (e.g. 0.5)."
        )
    if not 0.0 < labeled_fraction < 1.0:
        raise ValueError(f"--labeled_fraction {labeled_fraction} must lie strictly between 0 and 1.")
    return datasets.interleave_datasets([labeled, unlabeled], probabilities=[labeled_fraction, 1 - labeled_fraction],
                                        seed=seed, stopping_strategy="all_exhausted")
