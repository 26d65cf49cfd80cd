"""Teacher-feature cache: a frozen teacher's outputs for V augmented views of every training image, on disk.

With a frozen teacher the teacher forward is the same function of the same crop in every epoch, so it can be
computed once. `build_feature_cache` runs the teacher over V views of each image and writes its pooled
features (and logits, when it has a classifier) to one Arrow file, which `TeacherFeatureCache` memory-maps.
Training then runs no teacher forward at all: the collator looks each example's row up.

The teacher comes in as a callable, `teacher_forward(pixel_values (B, 3, H, W)) -> (features (B, d_t), logits
(B, C_t) or None)`, such as the distillation model's `teacher_outputs`: the data side knows no model.

The student must see exactly the crop the teacher saw. `PatchCollator(views=V)` makes that so: in epoch `e`
an image is augmented with the draws of view `e % V`, seeded from the run seed, the view and the image alone
(not its batch or slot), and the cache stores the teacher's output for that same view.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np
import torch
from datasets.arrow_writer import ArrowWriter

ROW_KEY = "_row"  # the column `add_row_index` adds: each example's position in the training set
FEATURES_FILE, META_FILE = "teacher_features.arrow", "cache_info.json"
DEFAULT_DIR = "_teacher-feature-cache"  # inside output_dir; the Trainer never pushes names that start with "_"
TeacherForward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def dataset_fingerprint(dataset: datasets.Dataset) -> str:
    """The fingerprint ``datasets`` gives `dataset`: a hash of its data files and of every transform applied.

    ``datasets`` keeps it in the private ``Dataset._fingerprint`` and has no public accessor, so this is the one
    place that reads it (``tests/test_feature_cache.py`` pins its behaviour: a ``datasets`` upgrade that moves it
    fails that test, not a run). A cache records it so that one built for other data is never reused.
    """
    return dataset._fingerprint


def add_row_index(dataset: datasets.Dataset) -> datasets.Dataset:
    """`dataset` with a `_row` column (0 .. N-1), which the collator uses to find an example's cached outputs."""
    if ROW_KEY in dataset.column_names:
        return dataset
    return dataset.add_column(ROW_KEY, np.arange(len(dataset), dtype=np.int64))


class TeacherFeatureCache:
    """A built cache, memory-mapped: `lookup(rows, views)` gives the teacher's outputs for those examples.

    Args:
        path: the cache folder written by `build_feature_cache`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.info = json.loads((self.path / META_FILE).read_text())
        self.table = datasets.Dataset.from_file(str(self.path / FEATURES_FILE)).with_format("numpy")
        self.num_rows, self.views = self.info["num_rows"], self.info["views"]

    def lookup(self, rows: list[int], views: list[int]) -> dict[str, torch.Tensor]:
        """`{"teacher_features": (B, d_t), "teacher_logits": (B, C)}` (logits only when cached) for each pair."""
        index = [view * self.num_rows + row for row, view in zip(rows, views)]
        found = self.table[index]
        batch = {"teacher_features": torch.from_numpy(np.asarray(found["features"], dtype=np.float32))}
        if "logits" in found:
            batch["teacher_logits"] = torch.from_numpy(np.asarray(found["logits"], dtype=np.float32))
        return batch

    def check_compatible(self, expected: dict[str, Any]) -> None:
        """Raise when the cache was built for another teacher, dataset, view count or augmentation."""
        wrong = {k: (self.info.get(k), v) for k, v in expected.items() if self.info.get(k) != v}
        if wrong:
            details = "; ".join(f"{k}: cache has {have!r}, this run needs {want!r}"
                                for k, (have, want) in wrong.items())
            raise ValueError(
                f"The teacher-feature cache at {self.path} was built for another run ({details}). Delete the folder "
                "to rebuild it, or point --teacher_feature_cache_dir at a new one."
            )


@torch.no_grad()
def build_feature_cache(teacher_forward: TeacherForward, dataset: datasets.Dataset, collator, path: str | Path,
                        info: dict[str, Any], batch_size: int = 64, device: str | torch.device = "cpu",
                        progress: bool = True) -> TeacherFeatureCache:
    """Run `teacher_forward` over `collator.views` views of every example of `dataset`; write and open the cache.

    Args:
        teacher_forward: `pixel_values (B, 3, H, W) -> (features (B, d_t), logits (B, C_t) or None)` of the
            frozen teacher, already in eval mode on `device`.
        dataset: the map-style training set, with its `_row` column (see `add_row_index`).
        collator: a `PatchCollator` with views set (`set_views`) and no cache; its `teacher_pixel_values` (or
            `pixel_values`) are fed.
        path: the cache folder (created; its files are written under a temporary name, then renamed).
        info: facts the cache must match when reused (teacher, seed, image size ...), stored in its metadata.
        batch_size, device, progress: batches of this many images go to `device`, with a progress bar.
    """
    from tqdm.auto import tqdm

    if not collator.views or collator.feature_cache is not None:
        raise ValueError("Building a teacher-feature cache needs a collator with fixed views and no cache of its own.")
    started = time.perf_counter()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    partial = path / (FEATURES_FILE + ".partial")
    writer = None
    bar = tqdm(total=collator.views * len(dataset), desc="Caching teacher features", disable=not progress)
    for view in range(collator.views):
        collator.set_epoch(view)
        for start in range(0, len(dataset), batch_size):
            examples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collator(examples)
            features, logits = teacher_forward(batch.get("teacher_pixel_values", batch["pixel_values"]).to(device))
            columns = {"features": features.float().cpu().numpy()}
            if logits is not None:
                columns["logits"] = logits.float().cpu().numpy()
            if writer is None:
                features_spec = {name: datasets.Sequence(datasets.Value("float32"), length=value.shape[1])
                                 for name, value in columns.items()}
                writer = ArrowWriter(features=datasets.Features(features_spec), path=str(partial))
            writer.write_batch({name: list(value) for name, value in columns.items()})
            bar.update(len(examples))
    bar.close()
    writer.finalize()
    writer.close()
    partial.replace(path / FEATURES_FILE)
    info = {**info, "num_rows": len(dataset), "views": collator.views,
            "build_seconds": round(time.perf_counter() - started, 2)}  # a fact for the record, never checked
    (path / META_FILE).write_text(json.dumps(info, indent=2))
    return TeacherFeatureCache(path)


def attach_feature_cache(train_dataset: datasets.Dataset, collator, teacher_forward: TeacherForward,
                         path: str | Path, views: int, facts: dict[str, Any], *, batch_size: int = 64,
                         device: str | torch.device = "cpu", progress: bool = True) -> datasets.Dataset:
    """Build the cache at `path` unless it is there, check that it fits this run, and make `collator` read it.

    With several processes, call it under `TrainingArguments.main_process_first()`: the main process builds the
    cache, the others then open what it built.

    Args:
        train_dataset: the map-style training set; returned with its `_row` column.
        collator: the training `PatchCollator`; it is set to `views` fixed views and reads from the cache.
        teacher_forward: the frozen teacher, as for `build_feature_cache` (only called when building).
        path: the cache folder.
        views: augmented views per image (epoch `e` trains on view `e % views`).
        facts: what else the cached crops depend on (image size, augmentation, teacher), checked on reuse; the
            collator's seed, the dataset's fingerprint, its size and `views` are added.
        batch_size, device, progress: as for `build_feature_cache`.

    Raises:
        ValueError: a stream (its rows cannot be looked up), or a cache at `path` built for another run.
    """
    if not isinstance(train_dataset, datasets.Dataset):
        raise ValueError("--cache_teacher_features needs a map-style training set (its rows are indexed); drop "
                         "--streaming, or distil without the cache.")
    info = {**facts, "seed": collator.seed, "dataset_fingerprint": dataset_fingerprint(train_dataset),
            "num_rows": len(train_dataset), "views": views}
    train_dataset = add_row_index(train_dataset)
    collator.use_feature_cache(None)  # the cache is built from the collator's pixels
    collator.set_views(views)
    path = Path(path)
    if not (path / META_FILE).exists():
        build_feature_cache(teacher_forward, train_dataset, collator, path, info, batch_size=batch_size,
                            device=device, progress=progress)
    cache = TeacherFeatureCache(path)
    cache.check_compatible(info)
    collator.use_feature_cache(cache)
    return train_dataset
