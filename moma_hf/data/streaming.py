"""EndlessStream: a streamed dataset as one endless sequence of reshuffled epochs, so resume can find its place.

The Trainer resumes a stream by skipping `global_step x accumulation` batches from the start of "epoch 0",
since a stream has no length. When a stream's real epochs are shorter than the run, that lands in the wrong
epoch with the wrong shuffle. Presenting the stream as a single endless epoch makes the skip exact: the
batches it passes over are exactly the ones the interrupted run trained on, across any number of epochs.
"""

from __future__ import annotations

from typing import Iterator

import datasets
import torch

EPOCH_KEY = "_stream_epoch"  # added to every example; PatchCollator seeds augmentation from it


class EndlessStream(torch.utils.data.IterableDataset):
    """Iterate `dataset` epoch after epoch without end, calling `set_epoch(e)` before epoch `e` (new shuffle).

    Each example gains `EPOCH_KEY`, its epoch number. Batches run across epoch boundaries, so none is short.
    Training length comes from `max_steps`. DataLoader workers each read their share of the shards, as they
    would from `dataset` itself.

    Args:
        dataset: a `datasets.IterableDataset` (e.g. from `load_patch_dataset(..., streaming=True)`).
    """

    def __init__(self, dataset: datasets.IterableDataset):
        self.dataset = dataset

    def __iter__(self) -> Iterator[dict]:
        epoch = 0
        while True:
            self.dataset.set_epoch(epoch)
            count = 0
            for count, example in enumerate(self.dataset, start=1):
                yield {**example, EPOCH_KEY: epoch}
            if count == 0:
                raise ValueError("The training stream yielded no example: check the dataset and its split.")
            epoch += 1
