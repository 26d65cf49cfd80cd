"""Unlabelled patches: load a source that has no labels, and mix it with the labelled training set.

An unlabelled example carries the label `UNLABELLED` (-1), the value `datasets.ClassLabel` reserves for "no
label", so labelled and unlabelled examples share one schema and flow through the same collator, trainer
and distributed path. The cross-entropy term skips them (`losses.labelled_cross_entropy`); the teacher's
soft labels and the contrastive term need no ground truth and use every example.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from .loading import _folder_dataset, _is_image, _load_raw, _resolve_column

UNLABELLED = -1


def _without_label(_example: dict) -> dict:
    return {"label": UNLABELLED}


def load_unlabelled_patches(
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
    """Load unlabelled patches with the columns `image` and `label` (-1 everywhere).

    Args:
        source: a local folder of images (any layout: flat, or nested folders whose names are ignored), a Hub
            dataset id, or local parquet/tar files; a label column, if any, is ignored.
        label_names: the labelled set's class names, so both share one `ClassLabel` and can be mixed.
        split, streaming, name, revision, data_files, image_column, token, shuffle_buffer_size, seed: as for
            `load_patch_dataset`.
    """
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=label_names)})
    path = Path(source).expanduser()
    if path.is_dir() and not any(_is_container(p) for p in path.rglob("*")):
        paths = sorted(os.path.join(directory, f) for directory, _, files in os.walk(path) for f in files if _is_image(f))
        if not paths:
            raise ValueError(f"No image files under the unlabelled folder '{source}' (extensions such as .jpg, .png).")
        dataset = _folder_dataset(paths, [UNLABELLED] * len(paths), features, streaming)
    else:
        raw, _ = _load_raw(source, split, streaming, name, revision, data_files, token)
        if raw.features is None:
            raw = raw._resolve_features()
        column = _resolve_column(raw.features, image_column, "image", lambda _, f: isinstance(f, datasets.Image), source)
        raw = raw.cast_column(column, datasets.Image(decode=False)).select_columns([column])
        if column != "image":
            raw = raw.rename_column(column, "image")
        dataset = raw.map(_without_label, features=features)
    if streaming and split == "train":
        dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    return dataset


def _is_container(path: Path) -> bool:
    return path.suffix in (".parquet", ".tar") or path.name.startswith("metadata.")


def mix_labelled_and_unlabelled(labelled, unlabelled, labelled_fraction: float | None = None, seed: int = 42):
    """One training set from both: in natural proportions, or with `labelled_fraction` of the examples labelled.

    Natural proportions concatenate two map-style sets (the Trainer's sampler shuffles them). A fraction
    interleaves them at random with these probabilities until both are exhausted, so the smaller set is
    repeated. Streams have no known size, so they need a fraction.
    """
    if labelled_fraction is None:
        if isinstance(labelled, datasets.Dataset) and isinstance(unlabelled, datasets.Dataset):
            return datasets.concatenate_datasets([labelled, unlabelled])
        raise ValueError(
            "Streams have no known size, so their natural proportions are unknown: give --labeled_fraction, "
            "the share of labelled examples in each batch (e.g. 0.5)."
        )
    if not 0.0 < labelled_fraction < 1.0:
        raise ValueError(f"--labeled_fraction {labelled_fraction} must lie strictly between 0 and 1.")
    return datasets.interleave_datasets([labelled, unlabelled], probabilities=[labelled_fraction, 1 - labelled_fraction],
                                        seed=seed, stopping_strategy="all_exhausted")
