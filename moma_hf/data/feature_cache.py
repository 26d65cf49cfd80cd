"""Teacher-feature cache: a frozen teacher's outputs for V augmented views of every training image, on disk.

With a frozen teacher the teacher forward is the same function of the same crop in every epoch, so it can be
computed once. `build_feature_cache` runs the teacher over V views of each image and writes its pooled
features (and logits, when it has a classifier) to one Arrow file, which `TeacherFeatureCache` memory-maps.
Training then runs no teacher forward at all: the collator looks each example's row up.

The student must see exactly the crop the teacher saw. `PatchCollator(views=V)` makes that so: in epoch `e`
an image is augmented with the draws of view `e % V`, seeded from the run seed, the view and the image alone
(not its batch or slot), and the cache stores the teacher's output for that same view.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets.arrow_writer import ArrowWriter

from ..networks.backbones import pooled_features

ROW_KEY = "_row"  # the column `add_row_index` adds: each example's position in the training set
FEATURES_FILE, META_FILE = "teacher_features.arrow", "cache_info.json"
DEFAULT_DIR = "_teacher-feature-cache"  # inside output_dir; the Trainer never pushes names that start with "_"


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
            details = "; ".join(f"{k}: cache has {have!r}, this run needs {want!r}" for k, (have, want) in wrong.items())
            raise ValueError(
                f"The teacher-feature cache at {self.path} was built for another run ({details}). Delete the folder "
                "to rebuild it, or point --teacher_feature_cache_dir at a new one."
            )


@torch.no_grad()
def build_feature_cache(teacher: torch.nn.Module, dataset: datasets.Dataset, collator, path: str | Path,
                        info: dict[str, Any], batch_size: int = 64, device: str | torch.device = "cpu",
                        progress: bool = True) -> TeacherFeatureCache:
    """Run `teacher` over `collator.views` views of every example of `dataset`; write and open the cache.

    Args:
        teacher: the frozen teacher (a backbone or a classifier), in eval mode.
        dataset: the map-style training set, with its `_row` column (see `add_row_index`).
        collator: a `PatchCollator` with `views` set; its `teacher_pixel_values` (or `pixel_values`) are fed.
        path: the cache folder (created; its files are written under a temporary name, then renamed).
        info: facts the cache must match when reused (teacher, seed, image size ...), stored in its metadata.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    partial = path / (FEATURES_FILE + ".partial")
    teacher = teacher.eval().to(device)
    writer, total = None, collator.views * len(dataset)
    bar = tqdm(total=total, desc="Caching teacher features", disable=not progress)
    for view in range(collator.views):
        collator.set_epoch(view)
        for start in range(0, len(dataset), batch_size):
            examples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collator(examples)
            pixels = batch.get("teacher_pixel_values", batch["pixel_values"]).to(device)
            features, logits = pooled_features(teacher, pixels)
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


def attach_feature_cache(model, train_dataset, collator, args, facts: dict[str, Any]) -> datasets.Dataset:
    """Build (once, on the main process) or reuse the cache of `args`, and make `collator` read from it.

    Args:
        model: the distillation model; its teacher must be frozen.
        train_dataset: the map-style training set; returned with its `_row` column.
        collator: the training `PatchCollator`; it gets `views = args.cache_views` and the cache.
        args: `DistillationTrainingArguments` (`cache_views`, `teacher_feature_cache_dir`, `seed`, ...).
        facts: what else the cached crops depend on (image size, augmentation, teacher), checked on reuse.
    """
    if not isinstance(train_dataset, datasets.Dataset):
        raise ValueError("--cache_teacher_features needs a map-style training set (its rows are indexed); drop "
                         "--streaming, or distil without the cache.")
    if getattr(model, "teacher", None) is None or getattr(model, "teacher_update", "frozen") != "frozen":
        raise ValueError("--cache_teacher_features needs a frozen teacher: a momentum teacher changes every step, "
                         "and `ce` has none. Use --teacher_update frozen.")
    info = {**facts, "seed": args.seed, "dataset_fingerprint": train_dataset._fingerprint,
            "num_rows": len(train_dataset), "views": args.cache_views}
    train_dataset = add_row_index(train_dataset)
    collator.views = args.cache_views
    path = Path(args.teacher_feature_cache_dir or Path(args.output_dir) / DEFAULT_DIR)
    with args.main_process_first(desc="teacher-feature cache"):
        if args.process_index == 0 and not (path / META_FILE).exists():
            build_feature_cache(model.teacher, train_dataset, collator, path, info,
                                batch_size=args.per_device_train_batch_size, device=args.device,
                                progress=not args.disable_tqdm)
    cache = TeacherFeatureCache(path)
    cache.check_compatible(info)
    collator.feature_cache = cache
    return train_dataset
