"""BadImageLimitCallback: a training run with too many unreadable images never ends successfully.

:class:`~moma_hf.data.collator.PatchCollator` checks the share of unreadable images only once it has seen
``min_samples_for_threshold`` of them, so that one bad file among the first few does not stop a run. A short
run may never get there; this callback applies the same limit to the whole run when training ends, with the
counts of every process (and every DataLoader worker) summed.
"""

from __future__ import annotations

import torch
from accelerate import PartialState
from accelerate.utils import reduce
from transformers import TrainerCallback

from ..data.collator import check_bad_fraction


class BadImageLimitCallback(TrainerCallback):
    """On ``on_train_end``, raise :class:`~moma_hf.data.collator.TooManyBadImagesError` when more than
    ``collator.max_bad_fraction`` of the images the run collated could not be decoded.

    Args:
        collator: the training collator (anything with ``num_seen``, ``num_bad`` and ``max_bad_fraction``,
            such as a :class:`~moma_hf.data.collator.PatchCollator`).

    Every process calls ``on_train_end``, so the cross-process sum is safe; every process then raises alike.
    The checkpoints written so far stay; the exported student is never written, since training did not end.
    """

    def __init__(self, collator):
        self.collator = collator

    def on_train_end(self, args, state, control, **kwargs):
        """Sum the counts of all processes and apply the limit to the whole run."""
        counts = torch.tensor([self.collator.num_seen, self.collator.num_bad], device=PartialState().device)
        num_seen, num_bad = reduce(counts, reduction="sum").tolist()
        check_bad_fraction(num_bad, num_seen, self.collator.max_bad_fraction, self.collator.bad_files,
                           scope=" in the whole training run")
