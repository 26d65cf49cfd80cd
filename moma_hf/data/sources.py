"""Read a data source as it is: a Hub dataset id, a local image folder, parquet files or webdataset tars.

:func:`read_source` returns the source's own columns; :mod:`moma_hf.data.loading` turns them into the labeled
``image``/``label`` schema and :mod:`moma_hf.data.unlabeled` into the unlabeled one. Both build datasets of image
files with :func:`folder_dataset` and find their image column with :func:`find_column`.

A local image folder is listed here, not by ``datasets``' ``imagefolder`` builder, which streams a whole folder
as one shard (so only one DataLoader worker would read it) and took ~25 s to resolve the 13k files of
crc-polyp-96 here. The files are split into up to 1024 shards of consecutive files: shuffling permutes the shards
and a buffer mixes them, and the image bytes are read by the collator inside the DataLoader workers. A folder with
``metadata.csv``/``.jsonl``/``.parquet`` still goes through ``datasets``' builder, which understands the metadata.
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

import datasets
import pyarrow as pa

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    ext.lower() for ext in datasets.packaged_modules.imagefolder.ImageFolder.EXTENSIONS
)
_METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
_FOLDER_SHARDS = 1024
# Shards the shuffle buffer reads at once for files that are few and large (datasets' default).
_INPUT_SHARDS = 10
_SPLIT_NAMES = frozenset({"train", "training", "test", "testing", "validation", "valid", "val", "dev", "eval"})
# Examples read to learn the columns of a stream that does not declare them (datasets reads as many).
_SCHEMA_EXAMPLES = 5


def looks_like_local_path(name: str) -> bool:
    """True when `name` can only be a path: it starts with '.', '/' or '~', or has more than one '/'
    (a Hub id, of a dataset or a model, is `name` or `org/name`)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.isabs(name)


def is_image_file(file_name: str) -> bool:
    """True when `file_name` ends in an image extension that ``datasets``' ``imagefolder`` reads (case ignored)."""
    return os.path.splitext(file_name)[1].lower() in IMAGE_EXTENSIONS


def read_source(source: str, split: str, streaming: bool, name: str | None = None, revision: str | None = None,
                data_files=None, token: str | bool | None = None):
    """``(dataset with the source's own columns, how many shards a shuffle buffer should read at once)``.

    Args:
        source, split, streaming, name, revision, data_files, token: as for
            :func:`~moma_hf.data.loading.load_patch_dataset`.

    Raises:
        ValueError: a missing local path or glob, files of an unknown kind, or a dataset the Hub does not have.
    """
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


def with_known_features(dataset, source: str):
    """`dataset` with its ``features`` set, reading the first examples of a stream that does not declare them.

    ``datasets`` has no public call for this (it uses the private ``IterableDataset._resolve_features``), so
    the columns are inferred here from the first examples through public calls, as ``datasets`` does itself.

    Raises:
        ValueError: the stream yields no example, so it has no columns to find.
    """
    if dataset.features is not None:
        return dataset
    first = next(iter(dataset.with_format(None).iter(batch_size=_SCHEMA_EXAMPLES)), None)
    if first is None:
        raise ValueError(f"{source} yielded no example. Check the split name, the path and the filters.")
    return dataset.cast(datasets.Features.from_arrow_schema(pa.Table.from_pydict(first).schema))


def find_column(features: datasets.Features, wanted: str, role: str, matches: Callable, source: str) -> str:
    """The column of `features` holding the ``role`` ("image" or "label").

    It is ``wanted`` when present. With the default name (``wanted == role``) absent, it is the single column for
    which ``matches(column, feature)`` holds; otherwise a ValueError names the columns and the flag to set.
    """
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


def is_image_feature(_column: str, feature) -> bool:
    """A `find_column` match: the column holds ``datasets.Image`` values."""
    return isinstance(feature, datasets.Image)


def folder_dataset(paths: list[str], labels: list[int], features: datasets.Features, streaming: bool):
    """A dataset of image files (`paths`, read later by the collator) and their `labels`, typed by `features`."""
    if not streaming:
        images = [{"path": path, "bytes": None} for path in paths]
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features)
    # The list in gen_kwargs is the list of shards: runs of consecutive files, so an unshuffled stream
    # keeps the sorted order. Shuffling permutes the shards and mixes them in the buffer. Capping their
    # number keeps datasets' per-epoch shard bookkeeping, linear in it, cheap for folders of 100k files.
    num_shards = min(len(paths), _FOLDER_SHARDS)
    examples = list(zip(paths, labels))
    bounds = [i * len(examples) // num_shards for i in range(num_shards + 1)]
    shards = [examples[start:end] for start, end in zip(bounds, bounds[1:])]
    return datasets.IterableDataset.from_generator(_folder_examples, gen_kwargs={"shards": shards}, features=features)


def _folder_examples(shards: list[list[tuple[str, int]]]) -> Iterator[dict]:
    for shard in shards:
        for path, label in shard:
            yield {"image": {"path": path, "bytes": None}, "label": label}


def _imagefolder_dataset(root: Path, streaming: bool):
    paths, labels, classes = _list_imagefolder(root)
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=classes)})
    return folder_dataset(paths, labels, features, streaming)


def _list_imagefolder(root: Path) -> tuple[list[str], list[int], list[str]]:
    """Sorted image paths, their label ids and the class names (the sub-folders of ``root``, sorted)."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    loose = [entry.name for entry in os.scandir(root) if entry.is_file() and is_image_file(entry.name)]
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
            paths.extend(os.path.join(directory, f) for f in sorted(files) if is_image_file(f))
            labels.extend([label] * (len(paths) - len(labels)))
    if not paths:
        raise ValueError(
            f"The split folder '{root}' is empty: its class folders {classes} hold no image files "
            f"(extensions such as .jpg, .png, .tif). Check the path and the split name."
        )
    return paths, labels, classes


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


def _check_parquet_rows(files) -> None:
    """Fail clearly on a parquet file without rows (datasets' reader fails on one with an Arrow error)."""
    import pyarrow.parquet as pq

    for file in files:
        if pq.ParquetFile(file).metadata.num_rows == 0:
            raise ValueError(f"The parquet file '{file}' has no rows, so its split is empty. Remove it or refill it.")


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
