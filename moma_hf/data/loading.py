"""Patch datasets for MoMA distillation: load, stream, distribute, decode and collate.

Loading
    :func:`load_patch_dataset` reads a Hub dataset id, a local ``imagefolder`` directory, local parquet
    files or webdataset tars into a ``datasets`` :class:`~datasets.IterableDataset` (``streaming=True``)
    or :class:`~datasets.Dataset` whose columns are exactly ``image`` (``datasets.Image(decode=False)``:
    ``{"bytes", "path"}`` dicts, decoded later by :class:`PatchCollator`, so one corrupt file cannot
    crash the ``datasets`` iterator) and ``label`` (a ``ClassLabel``).

    A local image folder is listed by this module, not by ``datasets``' ``imagefolder`` builder, which
    streams a whole folder as one shard (so only one DataLoader worker would read it) and took ~25 s
    to resolve the 13k files of crc-polyp-96 here. The files are split into up to 1024 shards of
    consecutive files: shuffling permutes the shards and a buffer mixes them, and the image bytes are
    read by the collator inside the DataLoader workers. A folder with ``metadata.csv``/``.jsonl``/
    ``.parquet`` still goes through ``datasets``' builder, which understands the metadata.

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
    :class:`PatchCollator` skips undecodable images with a :class:`BadImageWarning` that names the file,
    counts them, keeps the batch size constant by re-augmenting a good image of the same batch (in
    evaluation, ``skip_bad_images``: by marking the slot ``UNREADABLE`` so metrics leave it out), and
    raises once the bad fraction passes ``max_bad_fraction``. Local-data flags are checked with
    :func:`check_local_source`, so a missing folder never becomes a Hub dataset id.
"""
from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import Iterator

import datasets

from .collator import BadImageWarning, PatchCollator  # noqa: F401 - part of this module's API
from ..networks.model_names import looks_like_local_path
from .transforms import load_rgb_image

__all__ = [
    "BadImageWarning",
    "PatchCollator",
    "check_local_source",
    "label_names",
    "load_patch_dataset",
    "load_rgb_image",
    "shard_for_process",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    ext.lower() for ext in datasets.packaged_modules.imagefolder.ImageFolder.EXTENSIONS
)
_METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
# A stream with fewer shards than DataLoader workers leaves workers idle; parquet can be re-split
# per row group (``IterableDataset.reshard``), which is cheap below this many files.
_MIN_STREAM_SHARDS = 64
_FOLDER_SHARDS = 1024
# Shards the shuffle buffer reads at once for files that are few and large (datasets' default).
_INPUT_SHARDS = 10
_SPLIT_NAMES = frozenset({"train", "training", "test", "testing", "validation", "valid", "val", "dev", "eval"})


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
    """Load a labelled patch dataset with exactly the columns ``image`` and ``label``.

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
    dataset, input_shards = _load_raw(source, split, streaming, name, revision, data_files, token)
    dataset = _standardise_columns(dataset, image_column, label_column, source)
    _check_not_empty(dataset, source, split)
    if streaming:
        if dataset.num_shards < _MIN_STREAM_SHARDS:
            dataset = dataset.reshard()
        if split == "train":
            dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size, max_buffer_input_shards=input_shards)
    return dataset


def _load_raw(source, split, streaming, name, revision, data_files, token):
    """``(dataset with its original columns, how many shards the shuffle buffer should read at once)``."""
    path = Path(source).expanduser()
    if any(char in source for char in "*?["):
        files = sorted(glob.glob(str(path), recursive=True))
        if not files:
            raise ValueError(f"No file matches the pattern '{source}'. Check the path and the glob.")
    elif not path.exists():
        if looks_like_local_path(source) or path.suffix in (".parquet", ".tar"):
            raise ValueError(f"The data path '{source}' does not exist. Check the path (relative to {os.getcwd()}).")
        return _load_hub(source, split, streaming, name, revision, data_files, token), _INPUT_SHARDS
    elif path.is_file():
        files = [str(path)]
    elif next(path.rglob("*.parquet"), None) or next(path.rglob("*.tar"), None):
        _check_parquet_rows(sorted(path.rglob("*.parquet")))
        # datasets infers the format, and the splits from folder or file names (train/, test-00000.parquet, ...).
        return datasets.load_dataset(str(path), split=split, streaming=streaming), _INPUT_SHARDS
    else:
        root = _split_folder(path, split)
        if any((root / metadata).exists() for metadata in _METADATA_FILES):
            return datasets.load_dataset("imagefolder", data_dir=str(root), split="train", streaming=streaming), 1
        # Its shards are a few files each, so permuting them already mixes the stream; reading several
        # at once would only add datasets' prefetch threads, which cost ~10% throughput here.
        return _imagefolder_dataset(root, streaming), 1
    kind = _kind_of_files(files, source)
    if kind == "parquet":
        _check_parquet_rows(files)
    return datasets.load_dataset(kind, data_files={split: files}, split=split, streaming=streaming), _INPUT_SHARDS


def check_local_source(source: str | None, flag: str) -> None:
    """Raise at once when the local-data flag ``flag`` names a path that does not exist.

    :func:`load_patch_dataset` would read a missing ``data/patches`` as a Hub dataset id and wait on the Hub;
    a flag meant for local data (``--train_dir``) never falls back to it. Glob patterns are checked when loading.
    """
    if source and not any(char in source for char in "*?[") and not Path(source).expanduser().exists():
        raise ValueError(f"{flag} {source!r} does not exist (relative to {os.getcwd()}). Check the path; for a "
                         "dataset on the Hub, use --dataset_name.")


def _check_parquet_rows(files) -> None:
    """Fail clearly on a parquet file without rows (datasets' reader fails on one with an Arrow error)."""
    import pyarrow.parquet as pq

    for file in files:
        if pq.ParquetFile(file).metadata.num_rows == 0:
            raise ValueError(f"The parquet file '{file}' has no rows, so its split is empty. Remove it or refill it.")


def _split_folder(path: Path, split: str) -> Path:
    """The class-folder root of ``split``: ``<path>/<split>``, or ``path`` when it has no split folders."""
    if (path / split).is_dir():
        return path / split
    subfolders = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
    if set(subfolders) & _SPLIT_NAMES:
        raise ValueError(f"The image folder '{path}' has no '{split}' split; its split folders are {subfolders}.")
    if split != "train":
        logger.info("'%s' has class folders and no split folders: all of it is the '%s' split.", path, split)
    return path


def _kind_of_files(files: list[str], source: str) -> str:
    suffixes = {Path(f).suffix.lower() for f in files}
    if suffixes == {".parquet"}:
        return "parquet"
    if suffixes == {".tar"}:
        return "webdataset"
    raise ValueError(
        f"'{source}' must point to .parquet files or webdataset .tar files (or an image folder); "
        f"found files ending in {sorted(suffixes)}."
    )


def _load_hub(source, split, streaming, name, revision, data_files, token):
    try:
        return datasets.load_dataset(
            source, name, revision=revision, data_files=data_files, split=split, streaming=streaming, token=token
        )
    except FileNotFoundError as err:  # includes datasets' DatasetNotFoundError
        raise ValueError(
            f"'{source}' is neither an existing local path nor a dataset found on the Hub ({err}). "
            "Check the path or the dataset id, the revision and your token."
        ) from err


def _list_imagefolder(root: Path) -> tuple[list[str], list[int], list[str]]:
    """Sorted image paths, their label ids and the class names (the sub-folders of ``root``, sorted)."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    loose = [entry.name for entry in os.scandir(root) if entry.is_file() and _is_image(entry.name)]
    if loose:
        logger.warning("Ignoring %d images directly in %s (not in a class folder), e.g. %s", len(loose), root, loose[0])
    if not classes:
        raise ValueError(
            f"No class folders in '{root}'. An image folder must hold one sub-folder per class "
            "(<root>/<class>/<image>) or per split (<root>/<split>/<class>/<image>)."
        )
    paths, labels = [], []
    for label, class_name in enumerate(classes):
        for directory, subdirs, files in os.walk(root / class_name):
            subdirs.sort()
            paths.extend(os.path.join(directory, f) for f in sorted(files) if _is_image(f))
            labels.extend([label] * (len(paths) - len(labels)))
    if not paths:
        raise ValueError(
            f"The split folder '{root}' is empty: its class folders {classes} hold no image files "
            f"(extensions such as .jpg, .png, .tif). Check the path and the split name."
        )
    return paths, labels, classes


def _is_image(file_name: str) -> bool:
    return os.path.splitext(file_name)[1].lower() in IMAGE_EXTENSIONS


def _folder_examples(shards: list[list[tuple[str, int]]]) -> Iterator[dict]:
    for shard in shards:
        for path, label in shard:
            yield {"image": {"path": path, "bytes": None}, "label": label}


def _imagefolder_dataset(root: Path, streaming: bool):
    paths, labels, classes = _list_imagefolder(root)
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=classes)})
    return _folder_dataset(paths, labels, features, streaming)


def _folder_dataset(paths: list[str], labels: list[int], features: datasets.Features, streaming: bool):
    """A dataset of image files (`paths`, read later by the collator) and their `labels`."""
    if not streaming:
        return datasets.Dataset.from_dict({"image": [{"path": p, "bytes": None} for p in paths], "label": labels}, features)
    # The list in gen_kwargs is the list of shards: runs of consecutive files, so an unshuffled stream
    # keeps the sorted order. Shuffling permutes the shards and mixes them in the buffer. Capping their
    # number keeps datasets' per-epoch shard bookkeeping, linear in it, cheap for folders of 100k files.
    num_shards = min(len(paths), _FOLDER_SHARDS)
    examples = list(zip(paths, labels))
    shards = [examples[i * len(examples) // num_shards : (i + 1) * len(examples) // num_shards] for i in range(num_shards)]
    return datasets.IterableDataset.from_generator(_folder_examples, gen_kwargs={"shards": shards}, features=features)


def _resolve_column(features, wanted: str, role: str, matches, source: str) -> str:
    """The column holding the ``role`` ("image"/"label"); with the default name absent, the one that ``matches``."""
    columns = list(features)
    if wanted in features:
        return wanted
    candidates = [column for column in columns if matches(column, features[column])]
    if wanted == role and len(candidates) == 1:
        logger.info("No '%s' column in %s; using '%s' as the %s column.", wanted, source, candidates[0], role)
        return candidates[0]
    raise ValueError(
        f"The {role} column '{wanted}' is not in {source}; its columns are {columns}. "
        f"Set --{role}_column_name to the column that holds the {role}s."
    )


def _standardise_columns(dataset, image_column: str, label_column: str, source: str):
    """Keep only the image and label columns, named ``image``/``label``, typed Image(decode=False)/ClassLabel."""
    if dataset.features is None:  # a stream whose schema is only known from its first examples
        dataset = dataset._resolve_features()
    features = dataset.features
    image_col = _resolve_column(features, image_column, "image", lambda _, f: isinstance(f, datasets.Image), source)
    label_col = _resolve_column(
        features, label_column, "label", lambda column, f: isinstance(f, datasets.ClassLabel) or column == "cls", source
    )
    # Cast first: renaming a stream re-encodes its decoded images, which would decode every image here.
    dataset = dataset.cast_column(image_col, datasets.Image(decode=False))
    dataset = dataset.select_columns([image_col, label_col])
    dataset = dataset.rename_columns({old: new for old, new in ((image_col, "image"), (label_col, "label")) if old != new})
    if not isinstance(dataset.features["label"], datasets.ClassLabel):
        dataset = _encode_labels(dataset, source, label_col)
    return dataset


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


# --------------------------------------------------------------------------------------------------
# Decoding and collation
# --------------------------------------------------------------------------------------------------
