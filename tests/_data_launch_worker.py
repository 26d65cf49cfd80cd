"""Worker for the 2-process data test (``tests/test_data.py::test_two_process_launch_dispatches_disjoint_batches``).

Run under ``accelerate launch --multi_gpu --num_processes 2 --cpu ...``. It streams an image folder
with :func:`moma_hf.data.load_patch_dataset`, collates with :class:`moma_hf.data.PatchCollator` through
an ``accelerator.prepare``\\ d DataLoader (Accelerate's default batch dispatching for iterable datasets)
for each folder given, and writes, per rank, the ids of the samples it received and its batch sizes to
``<out>/rank<r>.json``.
Sample ids are positions in the sorted list of the folder's files (strings cannot be broadcast).
"""
import argparse
import json
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from moma_hf.data import IMAGE_EXTENSIONS, PatchCollator, load_patch_dataset
from moma_hf.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_train_transform


class _IdCollator:
    """PatchCollator output plus ``sample_ids`` ``(B,)`` int64, looked up from each example's path."""

    def __init__(self, collator: PatchCollator, ids: dict[str, int]):
        self.collator, self.ids = collator, ids

    def __call__(self, examples):
        batch = self.collator(examples)
        batch["sample_ids"] = torch.tensor([self.ids[ex["image"]["path"]] for ex in examples], dtype=torch.int64)
        return batch


def main():
    """Stream each folder through a prepared DataLoader and record what this rank receives."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, nargs="+", help="image folders, streamed one after the other")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch_size", type=int, default=4)
    args = parser.parse_args()

    accelerator = Accelerator()
    collator = PatchCollator(build_train_transform(32), (IMAGENET_MEAN, IMAGENET_STD), ((0.5,) * 3, (0.5,) * 3), 9)
    records = []
    for folder in args.data:
        files = sorted(
            os.path.join(d, f) for d, _, names in os.walk(folder) for f in names
            if Path(f).suffix.lower() in IMAGE_EXTENSIONS
        )
        dataset = load_patch_dataset(folder, "train", streaming=True)
        id_collator = _IdCollator(collator, {f: i for i, f in enumerate(files)})
        loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=id_collator)
        ids, sizes = [], []
        for batch in accelerator.prepare(loader):
            expected = (len(batch["labels"]), 3, 32, 32)
            assert batch["pixel_values"].shape == batch["teacher_pixel_values"].shape == expected
            ids.extend(batch["sample_ids"].tolist())
            sizes.append(len(batch["sample_ids"]))
        records.append({"num_files": len(files), "ids": ids, "sizes": sizes})
    result = {
        "rank": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "datasets": records,
    }
    Path(args.out, f"rank{accelerator.process_index}.json").write_text(json.dumps(result))
    # Leave the process group together: see the end of _bad_image_launch_worker.py.
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
