"""Labeled patch datasets for distillation: load them, stream them and share them across processes.

Loading
    :func:`load_patch_dataset` reads a Hub dataset id, a local ``imagefolder`` directory, local parquet
    files or webdataset tars into a ``datasets`` :class:`~datasets.IterableDataset` (``streaming=True``)
    or :class:`~datasets.Dataset` whose columns are exactly ``image`` (``datasets.Image(decode=False)``:
    ``{"bytes", "path"}`` dicts, decoded later by :class:`~moma_hf.data.collator.PatchCollator`, so one corrupt
    file cannot crash the ``datasets`` iterator) and ``label`` (a ``ClassLabel``).

    How each kind of source is read is in :mod:`moma_hf.data.sources`.

Distribution
    Under the :class:`~transformers.Trainer` (and any ``accelerator.prepare``\\ d DataLoader), a streaming
    dataset is distributed by **Accelerate's batch dispatching**, the default for iterable datasets:
    process 0 reads the stream, collates ``num_processes`` batches and broadcasts each process its
    slice. We rely on it, not on ``split_dataset_by_node``, because

    * every process gets a batch of the same size at every step, which the gathered MoMA queue needs
      (``split_dataset_by_node`` can leave ranks with different numbers of examples);
    * the stream ends on all processes at the same step, so a rank that runs out cannot leave the
      others hanging in a collective;
    * the order is global: rank 0's slice comes first.

    The cost is that process 0 (with its DataLoader workers) decodes for everyone; the other ranks'
    DataLoader iterators are created but not consumed. Use ``dataloader_drop_last=True`` (the Trainer)
    or ``drop_last=True`` so the last step is not smaller than the others; without it the last step's
    batch is smaller (still equal on all ranks: Accelerate completes an odd remainder with samples of
    the first batch).

    For a hand-written loop without Accelerate's dispatching, :func:`shard_for_process` wraps
    ``datasets.distributed.split_dataset_by_node``. Ranks may then get different numbers of examples:
    cycle the stream (``dataset.repeat(None)``) and stop every rank after the same ``max_steps``.

Bad input
    :class:`~moma_hf.data.collator.PatchCollator` skips undecodable images with a ``BadImageWarning`` naming the
    file, counts them, keeps the batch size constant by re-augmenting a good image of the same batch (in
    evaluation, ``skip_bad_images``: by marking the slot ``UNREADABLE`` so metrics leave it out), and
    raises once the bad fraction passes ``max_bad_fraction``. Local-data flags are checked with
    :func:`check_local_source`, so a missing folder never becomes a Hub dataset id.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import datasets

from .sources import find_column, is_image_feature, read_source, with_known_features

__all__ = ["check_local_source", "label_names", "load_patch_dataset", "shard_for_process"]

logger = logging.getLogger(__name__)

# A stream with fewer shards than DataLoader workers leaves workers idle; parquet can be re-split
# per row group (``IterableDataset.reshard``), which is cheap below this many files.
_MIN_STREAM_SHARDS = 64


def load_patch_dataset(
    source: str,
    split: str = "train",
    *,
    streaming: bool = True,
    name: str | None = None,
    revision: str | None = None,
    data_files=None,
    image_column: str = "image",
    label_column: str = "label",
    token: str | bool | None = None,
    shuffle_buffer_size: int = 1000,
    seed: int = 42,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load a labeled patch dataset with exactly the columns ``image`` and ``label``.

    Args:
        source: a Hub dataset id (with ``name``, ``revision``, ``data_files``, ``token``); a local image
            folder (``<source>/<class>/*.jpg``, or ``<source>/<split>/<class>/*.jpg``); local parquet
            (a ``.parquet`` file, a directory of them or a glob); or webdataset tars (a ``.tar`` file,
            a directory of them or a glob). In a directory of parquet/tar files, datasets finds the
            splits from folder or file names (``train/``, ``test-00000.parquet``).
        split: the split to read. An image folder without split sub-folders is read whole, whatever the
            split (so a separate evaluation folder works with any split name).
        streaming: return an :class:`~datasets.IterableDataset` (nothing loaded into memory) instead of
            a map-style :class:`~datasets.Dataset`.
        image_column, label_column: the source's column names (``--image_column_name`` and
            ``--label_column_name`` in the scripts). Left at their defaults and absent, the single
            ``Image`` column, and the single ``ClassLabel`` column or webdataset's ``cls``, are used.
        shuffle_buffer_size, seed: shuffling of the streamed ``train`` split (shard order, then a buffer
            of this many examples; ``set_epoch`` re-shuffles each epoch). Map-style datasets and other
            splits are not shuffled: the Trainer's sampler shuffles map-style data.

    Returns:
        A dataset whose ``image`` column is ``datasets.Image(decode=False)`` (``{"bytes", "path"}``
        dicts) and whose ``label`` column is a ``ClassLabel``. Label names come from the source's
        ``ClassLabel`` or folder names; otherwise they are the sorted distinct label values (as
        strings), found with one pass over the label column, and label ids are positions in that
        sorted list.

    Raises:
        ValueError: a missing path, a missing image or label column, or an empty split.
    """
    dataset, input_shards = read_source(source, split, streaming, name, revision, data_files, token)
    dataset = _standardise_columns(dataset, image_column, label_column, source)
    _check_not_empty(dataset, source, split)
    if streaming:
        if dataset.num_shards < _MIN_STREAM_SHARDS:
            dataset = dataset.reshard()
        if split == "train":
            dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size, max_buffer_input_shards=input_shards)
    return dataset


def check_local_source(source: str | None, flag: str) -> None:
    """Raise at once when the local-data flag ``flag`` names a path that does not exist.

    :func:`load_patch_dataset` would read a missing ``data/patches`` as a Hub dataset id and wait on the Hub;
    a flag meant for local data (``--train_dir``) never falls back to it. Glob patterns are checked when loading.
    """
    if source and not any(char in source for char in "*?[") and not Path(source).expanduser().exists():
        raise ValueError(f"{flag} {source!r} does not exist (relative to {os.getcwd()}). Check the path; for a "
                         "dataset on the Hub, use --dataset_name.")


def _standardise_columns(dataset, image_column: str, label_column: str, source: str):
    """Keep only the image and label columns, named ``image``/``label``, typed Image(decode=False)/ClassLabel."""
    dataset = with_known_features(dataset, source)  # a stream may only know its columns from its first examples
    image_col = find_column(dataset.features, image_column, "image", is_image_feature, source)
    label_col = find_column(dataset.features, label_column, "label", _is_label_feature, source)
    # Cast first: renaming a stream re-encodes its decoded images, which would decode every image here.
    dataset = dataset.cast_column(image_col, datasets.Image(decode=False))
    dataset = dataset.select_columns([image_col, label_col])
    renames = {old: new for old, new in ((image_col, "image"), (label_col, "label")) if old != new}
    dataset = dataset.rename_columns(renames)
    if not isinstance(dataset.features["label"], datasets.ClassLabel):
        dataset = _encode_labels(dataset, source, label_col)
    return dataset


def _is_label_feature(column: str, feature) -> bool:
    """A `find_column` match for the label: a ``ClassLabel`` column, or webdataset's ``cls``."""
    return isinstance(feature, datasets.ClassLabel) or column == "cls"


class _LabelIndex:
    """Maps raw label values to ClassLabel ids (a picklable callable for ``Dataset.map``)."""

    def __init__(self, values: list):
        self.index = {value: i for i, value in enumerate(values)}

    def __call__(self, label):
        return {"label": self.index[label]}


def _encode_labels(dataset, source: str, label_col: str):
    """Turn a plain label column into a ClassLabel whose names are the sorted distinct values."""
    if isinstance(dataset, datasets.Dataset):
        values = dataset.unique("label")
    else:
        logger.info("Reading the label column of %s once to find its label set.", source)
        values = list({example["label"] for example in dataset.select_columns(["label"])})
    if any(value is None for value in values):
        raise ValueError(f"The label column '{label_col}' of {source} has missing values; every patch needs a label.")
    try:
        values = sorted(values)
    except TypeError as err:
        raise ValueError(f"The label column '{label_col}' of {source} mixes types: {values[:10]}.") from err
    class_label = datasets.ClassLabel(names=[str(value) for value in values])
    if all(isinstance(value, str) for value in values) or values == list(range(len(values))):
        return dataset.cast_column("label", class_label)  # ClassLabel encodes names and in-range ids itself
    new_features = datasets.Features({"image": dataset.features["image"], "label": class_label})
    return dataset.map(_LabelIndex(values), input_columns="label", features=new_features)


def _check_not_empty(dataset, source: str, split: str) -> None:
    empty = len(dataset) == 0 if isinstance(dataset, datasets.Dataset) else next(iter(dataset.take(1)), None) is None
    if empty:
        raise ValueError(f"The split '{split}' of {source} is empty. Check the split name, the path and the filters.")


def label_names(dataset) -> list[str]:
    """The ``ClassLabel`` names of the ``label`` column of a dataset from :func:`load_patch_dataset`."""
    feature = (dataset.features or {}).get("label")
    if not isinstance(feature, datasets.ClassLabel):
        raise ValueError(
            f"The dataset has no ClassLabel 'label' column (features: {dataset.features}); load it with "
            "load_patch_dataset()."
        )
    return list(feature.names)


def shard_for_process(dataset, rank: int, world_size: int):
    """This process's part of ``dataset`` (``datasets.distributed.split_dataset_by_node``), for custom loops.

    Not needed under the Trainer or an ``accelerator.prepare``\\ d DataLoader, where Accelerate dispatches
    batches (see the module docstring). Parts may differ in size by up to a shard (or an example): cycle
    the stream with ``dataset.repeat(None)`` and stop every rank after the same number of steps, or the
    longer ranks will wait forever for the shorter one in the next collective.
    """
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)

