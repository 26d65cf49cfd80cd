"""Teacher-feature cache: a frozen teacher's outputs for V augmented views of every training image, on disk.

With a frozen teacher the teacher forward is the same function of the same crop in every epoch, so it can be
computed once (`feature_cache_build.py` runs that pass, in every process). Training then runs no teacher
forward at all: the collator looks each example's outputs up in `TeacherFeatureCache`.

Format: a folder of shards `shard-00000.arrow`, ... of `shard_size` consecutive examples of the training set (a
stream: of its epoch-0 order), one row per example: `key` (16 bytes, `collator.example_key`: a digest of the
image's path and bytes, what its augmentation is seeded from), `features` `(V, d_t)` and, when the teacher has
a classifier, `logits` `(V, C)`, all V views in one row. `cache_info.json`, written last, marks a complete cache
and records what it was built for. Storage is float32, float16 or bfloat16 (Arrow has no bfloat16: its 16-bit
patterns are stored as uint16); lookups always give float32.

Lookup: a map-style example by its `_row` (its position, `add_row_index`), its key checked; a streamed example
by its key. Two examples with one key have the same path and bytes, hence the same crops and outputs, so one
row serves both; an example whose key is not in the cache raises, so none ever gets another example's outputs.

The student must see exactly the crop the teacher saw. `PatchCollator(views=V)` makes that so: in epoch `e`
an image is augmented with the draws of view `e % V`, seeded from the run seed, the view and the image alone
(not its batch or slot), and the cache stores the teacher's output for that same view.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import datasets
import numpy as np
import pyarrow as pa
import torch

ROW_KEY = "_row"  # the column `add_row_index` adds: each example's position in the training set
META_FILE = "cache_info.json"
SHARD_NAME = "shard-{:05d}.arrow"
DEFAULT_DIR = "_teacher-feature-cache"  # inside output_dir; the Trainer never pushes names that start with "_"
SCHEMA_KEY = b"moma_teacher_cache"  # each shard's schema metadata: the build facts it belongs to (JSON)
KEY_BYTES = 16
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}  # bfloat16: raw bits
TeacherForward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def dataset_fingerprint(dataset: datasets.Dataset | datasets.IterableDataset) -> str | None:
    """The fingerprint ``datasets`` gives a map-style `dataset`: a hash of its data files and every transform.

    ``datasets`` keeps it in the private ``Dataset._fingerprint`` and has no public accessor, so this is the one
    place that reads it (``tests/test_feature_cache.py`` pins its behaviour). A stream has none (an
    ``IterableDataset`` records neither its files nor a hash): None, and the caller names the stream's source in
    the facts instead (`moma_hf.commands.teacher_cache.cache_facts`); each row's key then checks every example.
    """
    return dataset._fingerprint if isinstance(dataset, datasets.Dataset) else None


def add_row_index(dataset: datasets.Dataset) -> datasets.Dataset:
    """`dataset` with a `_row` column (0 .. N-1), which the collator uses to find an example's cached outputs."""
    if ROW_KEY in dataset.column_names:
        return dataset
    return dataset.add_column(ROW_KEY, np.arange(len(dataset), dtype=np.int64))


def expected_info(dataset, seed: int, views: int, facts: dict[str, Any], storage_dtype: str) -> dict[str, Any]:
    """What a cache for this run must record: `facts` plus the seed, data fingerprint, size, views, storage."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"The cache stores {', '.join(STORAGE_DTYPES)}, not {storage_dtype!r}.")
    streaming = not isinstance(dataset, datasets.Dataset)
    info = {**facts, "seed": seed, "dataset_fingerprint": dataset_fingerprint(dataset), "streaming": streaming,
            "views": views, "storage_dtype": storage_dtype}
    if not streaming:
        info["num_rows"] = len(dataset)
    return info


def read_shard(path: Path) -> pa.Table:
    """One shard, memory-mapped (zero copy)."""
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


def shard_facts(path: Path) -> dict[str, Any]:
    """The build facts a shard was written for (its schema metadata), read without its data."""
    with pa.memory_map(str(path)) as source:
        return json.loads(pa.ipc.open_stream(source).schema.metadata[SCHEMA_KEY])


def _as_array(column: pa.ChunkedArray, num_rows: int, storage_dtype: str) -> np.ndarray:
    """A `(rows, V, width)` numpy view of a nested fixed-size-list column (zero copy for a single chunk)."""
    chunk = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    values = chunk.flatten().flatten().to_numpy(zero_copy_only=True)
    views, width = chunk.type.list_size, chunk.type.value_type.list_size
    return values.view(STORAGE_DTYPES[storage_dtype]).reshape(num_rows, views, width)


def _to_float32(values: np.ndarray, storage_dtype: str) -> torch.Tensor:
    if storage_dtype == "bfloat16":  # raw bfloat16 bits: the upper half of a float32
        return torch.from_numpy(values.astype(np.uint32) << 16).view(torch.float32)
    return torch.from_numpy(values.astype(np.float32))


class TeacherFeatureCache:
    """A complete cache, memory-mapped: `lookup(views, keys, rows)` gives the teacher's outputs for examples.

    Pickles by path (DataLoader workers reopen the files rather than copy them).

    Args:
        path: the cache folder written by `build_feature_cache` (its `cache_info.json` marks it complete).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.info = json.loads((self.path / META_FILE).read_text())
        if "num_shards" not in self.info:  # the single-file format of earlier versions
            raise ValueError(f"The teacher-feature cache at {self.path} has an older format. Delete the folder and "
                             "rerun to rebuild it.")
        self.num_rows, self.views = self.info["num_rows"], self.info["views"]
        self.shard_size, self.storage_dtype = self.info["shard_size"], self.info["storage_dtype"]
        self.shards = [self._open(index) for index in range(self.info["num_shards"])]
        self.has_logits = "logits" in self.shards[0]
        self._sorted_keys = self._order = None
        if self.info["streaming"]:  # a sorted key column: 16 bytes per example, binary-searched
            keys = np.concatenate([shard["key"] for shard in self.shards])
            self._order = np.argsort(keys, kind="stable")
            self._sorted_keys = keys[self._order]

    def _open(self, index: int) -> dict[str, np.ndarray]:
        table = read_shard(self.path / SHARD_NAME.format(index))
        keys = table.column("key").combine_chunks()
        arrays = {"key": np.frombuffer(keys.buffers()[1], dtype=f"S{KEY_BYTES}", count=len(keys),
                                       offset=keys.offset * KEY_BYTES)}
        for name in ("features", "logits"):
            if name in table.column_names:
                arrays[name] = _as_array(table.column(name), table.num_rows, self.storage_dtype)
        return arrays

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def rows_of(self, keys: Sequence[bytes], names: Sequence[str]) -> list[int]:
        """The cache rows of streamed examples, by key. Raises `KeyError` naming an example the cache lacks."""
        query = np.asarray(keys, dtype=f"S{KEY_BYTES}")
        found = np.minimum(np.searchsorted(self._sorted_keys, query), len(self._sorted_keys) - 1)
        missing = [name for name, hit, key in zip(names, found, query) if self._sorted_keys[hit] != key]
        if missing:
            raise KeyError(
                f"The stream holds examples the teacher-feature cache at {self.path} lacks, e.g. {missing[:3]}: "
                f"the cache was built from {self.num_rows} examples of another version of the data. Delete the "
                "folder (or give a new --teacher_feature_cache_dir) and rerun the same command to rebuild it."
            )
        return self._order[found].tolist()

    def lookup(self, views: Sequence[int], keys: Sequence[bytes], rows: Sequence[int] | None = None,
               names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """`{"teacher_features": (B, d_t), "teacher_logits": (B, C)}` float32 (logits only when cached).

        Args:
            views: each example's view (`epoch % V`).
            keys: each example's key (`collator.example_key`); a stream's examples are found by it, a map-style
                example's key must match its row's.
            rows: map-style examples' `_row`s (None for a stream).
            names: the examples' file names, for messages.
        """
        names = names or [f"example #{i} of the batch" for i in range(len(keys))]
        if self.info["streaming"]:
            rows = self.rows_of(keys, names)
        elif rows is None or any(row is None for row in rows):
            raise ValueError(f"The teacher-feature cache at {self.path} finds map-style examples by their "
                             f"'{ROW_KEY}' column: add it with add_row_index().")
        shard_of = [divmod(int(row), self.shard_size) for row in rows]
        stored = np.array([self.shards[shard]["key"][offset] for shard, offset in shard_of], dtype=f"S{KEY_BYTES}")
        wrong = [name for name, differs in zip(names, stored != np.asarray(keys, dtype=f"S{KEY_BYTES}")) if differs]
        if wrong:
            raise ValueError(f"The teacher-feature cache at {self.path} holds other examples at the rows of "
                             f"{wrong[:3]}: the training set changed since it was built. Delete the folder and "
                             "rerun to rebuild it.")
        batch = {}
        for name, out in (("features", "teacher_features"), ("logits", "teacher_logits")):
            if name in self.shards[0]:
                picked = np.stack([self.shards[shard][name][offset, view]
                                   for (shard, offset), view in zip(shard_of, views)])
                batch[out] = _to_float32(picked, self.storage_dtype)
        return batch

    def outputs(self, name: str = "features") -> torch.Tensor:
        """Every row's outputs in row order, float32: `(num_rows, V, d_t)` ("features") or `(num_rows, V, C)`."""
        return torch.cat([_to_float32(shard[name], self.storage_dtype) for shard in self.shards])

    def check_compatible(self, expected: dict[str, Any]) -> None:
        """Raise when the cache was built for another teacher, dataset, view count, augmentation or storage."""
        check_same_run(self.info, expected, self.path)


def check_same_run(have: dict[str, Any], expected: dict[str, Any], path: Path, what: str = "cache") -> None:
    """Raise `ValueError` naming every fact in which `have` (a cache's record) differs from `expected`."""
    wrong = {k: (have.get(k), v) for k, v in expected.items() if have.get(k) != v}
    if wrong:
        details = "; ".join(f"{k}: {what} has {h!r}, this run needs {w!r}" for k, (h, w) in wrong.items())
        raise ValueError(
            f"The teacher-feature {what} at {path} was built for another run ({details}). Delete the folder "
            "to rebuild it, or point --teacher_feature_cache_dir at a new one."
        )


def find_complete_cache(path: str | Path, expected: dict[str, Any]) -> TeacherFeatureCache | None:
    """The complete cache at `path` when it fits `expected` (see `expected_info`); None when there is none yet.

    Raises:
        ValueError: the complete cache at `path` was built for another run.
    """
    if not (Path(path) / META_FILE).exists():
        return None
    cache = TeacherFeatureCache(path)
    cache.check_compatible(expected)
    return cache


def attach_feature_cache(train_dataset, collator, teacher_forward: TeacherForward | None, path: str | Path,
                         views: int, facts: dict[str, Any], settings=None):
    """Build the cache at `path` unless it is complete there, check that it fits this run, make `collator` read it.

    With several processes, call it on every process with `settings` naming the process and a barrier: each
    computes its share of the shards (see `feature_cache_build.BuildSettings`).

    Args:
        train_dataset: the training set, map-style (returned with its `_row` column) or a stream (returned as is).
        collator: the training `PatchCollator`; it is set to `views` fixed views and reads from the cache.
        teacher_forward: `pixel_values (B, 3, H, W) -> (features (B, d_t), logits (B, C_t) or None)` of the frozen
            teacher (only called when building; None when the cache is known to be complete).
        path: the cache folder.
        views: augmented views per image (epoch `e` trains on view `e % views`).
        facts: what else the cached crops depend on (image size, augmentation, teacher), checked on reuse; the
            collator's seed, the dataset's fingerprint, its size, `views` and the storage dtype are added.
        settings: a `BuildSettings` (batch size, device, shard size, storage dtype, processes); default: one
            process on the CPU.

    Raises:
        ValueError: a cache at `path` built for another run.
        CacheBuildInterrupted: the build was asked to stop (its finished shards stay; rerun to continue).
    """
    from .feature_cache_build import BuildSettings, build_feature_cache

    settings = settings or BuildSettings()
    info = expected_info(train_dataset, collator.seed, views, facts, settings.storage_dtype)
    if isinstance(train_dataset, datasets.Dataset):
        train_dataset = add_row_index(train_dataset)
    collator.use_feature_cache(None)  # the cache is built from the collator's pixels
    collator.set_views(views)
    cache = find_complete_cache(path, info)
    if cache is None:
        if teacher_forward is None:
            raise ValueError(f"No complete teacher-feature cache at {path}, and no teacher to build one.")
        cache = build_feature_cache(teacher_forward, train_dataset, collator, path, info, settings)
    collator.use_feature_cache(cache)
    return train_dataset
