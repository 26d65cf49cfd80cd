"""Data-loading throughput: moma_hf streaming and map-style datasets against torchvision's ImageFolder.

All three loaders read the same subset of crc-polyp-96/train (a folder of symlinks, a stratified
``--num_images`` files), apply the same train transform (``build_train_transform``) and the same
normalisation, with the same batch size and number of DataLoader workers:

* streaming: ``load_patch_dataset(..., streaming=True)`` (a ``datasets.IterableDataset``, shuffled
  with a buffer) + ``PatchCollator`` decoding and augmenting inside the workers;
* map-style: ``load_patch_dataset(..., streaming=False)`` + ``PatchCollator``, ``shuffle=True``;
* ImageFolder: ``torchvision.datasets.ImageFolder(transform=train transform + Normalize)``, ``shuffle=True``.

The decode, augmentation and normalisation work is the same in all three. What ``PatchCollator`` adds is its
reproducible augmentation: each image's draws are seeded from the run seed, the epoch and the image. Seeding the
CPU generator (``torch.default_generator.manual_seed``) takes about a microsecond; ``torch.manual_seed`` also queues
CUDA's lazy seeding, which records a stack trace: 0.2-0.5 ms an image in a DataLoader worker, a quarter of a 96 px
image's decode and augmentation.

Each loader runs one untimed warm-up epoch, then ``--rounds`` timed epochs, interleaved between loaders
so that load on a shared machine hits all three alike; the median epoch gives images/second. Worker
start-up is inside the timed epoch, as it is in training. Each round's ratios show the spread; the last two lines
are the ratios of the medians::

    python benchmarks/data_throughput.py --num_workers 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets as tv_datasets
from torchvision.transforms import v2

from moma_hf.data import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PatchCollator,
    build_train_transform,
    load_patch_dataset,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "crc-polyp-96" / "train"


def make_subset(source: Path, num_images: int, target: Path) -> int:
    """Symlink a stratified subset of ``source`` (``<class>/<image>``) into ``target``; return its size."""
    files = sorted(f for f in source.glob("*/*") if f.suffix.lower() in IMAGE_EXTENSIONS)
    step = max(1, len(files) // num_images)
    chosen = files[::step][:num_images]
    for f in chosen:
        (target / f.parent.name).mkdir(parents=True, exist_ok=True)
        os.symlink(f, target / f.parent.name / f.name)
    return len(chosen)


def build_loaders(root: Path, args) -> dict[str, DataLoader]:
    """The three DataLoaders to compare, over the same files with the same transforms."""
    transform = build_train_transform(args.image_size)
    norm = (IMAGENET_MEAN, IMAGENET_STD)
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers)
    streaming = load_patch_dataset(str(root), "train", streaming=True)
    mapped = load_patch_dataset(str(root), "train", streaming=False)
    folder = tv_datasets.ImageFolder(str(root), transform=v2.Compose([transform, v2.Normalize(*norm)]))
    return {
        "streaming": DataLoader(streaming, collate_fn=PatchCollator(transform, norm), **common),
        "mapstyle": DataLoader(mapped, shuffle=True, collate_fn=PatchCollator(transform, norm), **common),
        "imagefolder": DataLoader(folder, shuffle=True, **common),
    }


def run_epoch(loader: DataLoader, epoch: int) -> tuple[int, float]:
    """Iterate one epoch; return (images, seconds)."""
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    start, images = time.perf_counter(), 0
    for batch in loader:
        pixels = batch["pixel_values"] if isinstance(batch, dict) else batch[0]
        images += pixels.shape[0]
    return images, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    """Build the subset and the loaders, time them, print images/s and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the main process only receives batches; leave the cores to the workers

    with tempfile.TemporaryDirectory() as tmp:
        count = make_subset(args.data, args.num_images, Path(tmp))
        print(f"{count} images from {args.data}, {args.image_size} px train transform, batch {args.batch_size}, "
              f"{args.num_workers} workers, {os.cpu_count()} CPUs, median of {args.rounds} epochs after 1 warm-up")
        loaders = build_loaders(Path(tmp), args)
        speeds: dict[str, list[float]] = {name: [] for name in loaders}
        for epoch in range(args.rounds + 1):
            for name, loader in loaders.items():
                images, seconds = run_epoch(loader, epoch)
                assert images == count, f"{name} yielded {images} images, expected {count}"
                if epoch > 0:
                    speeds[name].append(images / seconds)
    median = {name: statistics.median(values) for name, values in speeds.items()}
    for name, value in median.items():
        print(f"{name}: {value:.1f} images/s (epochs: {', '.join(f'{v:.1f}' for v in speeds[name])})")
    for name in ("streaming", "mapstyle"):  # a round's loaders ran back to back: their ratio shows the spread
        rounds = [ours / theirs for ours, theirs in zip(speeds[name], speeds["imagefolder"])]
        print(f"{name} / imagefolder per round: {', '.join(f'{r:.3f}' for r in rounds)} "
              f"(min {min(rounds):.3f}, max {max(rounds):.3f})")
    print(f"streaming_vs_imagefolder: {median['streaming'] / median['imagefolder']:.3f}")
    print(f"mapstyle_vs_imagefolder: {median['mapstyle'] / median['imagefolder']:.3f}")


if __name__ == "__main__":
    main()
