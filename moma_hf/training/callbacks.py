"""The trainer's per-step work, done through the Trainer's public callback events.

- `DistillationStepCallback`: after every optimiser step, the momentum update and the enqueue of the step's keys;
  before every epoch, the collator's epoch (which seeds its augmentation).
- `DataWaitCallback`: the share of wall time the training loop waits for batches (`data_wait_fraction`).
"""

from __future__ import annotations

import time
from typing import Callable

from transformers import TrainerCallback


class DistillationStepCallback(TrainerCallback):
    """After every optimiser step: `trainer.finish_optimizer_step()` (EMA of the key pathway, then the enqueue of
    the step's gathered keys). Before every epoch: tell the collator the epoch, which seeds its augmentation (see
    `PatchCollator.set_epoch`).

    Args:
        trainer: the `DistillationTrainer` (anything with `finish_optimizer_step()` and `data_collator`).
    """

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.finish_optimizer_step()

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.trainer.data_collator, "set_epoch"):
            self.trainer.data_collator.set_epoch(int(state.epoch or 0))


class DataWaitCallback(TrainerCallback):
    """Time the training loop spends waiting for batches, from the Trainer's callback events.

    transformers' training loop (`Trainer._run_epoch`, 5.x) fetches every micro-batch of an optimiser step
    (`get_batch_samples`) right before `on_step_begin`. Between `on_step_end` and that fetch it only logs,
    evaluates and saves, each of which ends with its own event (`on_log`, `on_evaluate`, `on_save`). So the
    time from the last of those events (or from `on_train_begin` / `on_epoch_begin`, which also covers starting
    the DataLoader's workers) to the next `on_step_begin` is the time spent fetching data.

    `pop_fraction()` gives the waited share of the wall time since the previous call (or since `on_train_begin`)
    and starts a new window; the trainer logs it with the loss as `data_wait_fraction`: near 0 when the
    workers keep up, near 1 when data is the bottleneck. Each process measures its own wait.

    Args:
        clock: the time source in seconds (`time.perf_counter`; a test may pass its own).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.waited = 0.0  # seconds spent fetching batches in the current window
        self.window_start: float | None = None
        self.work_end: float | None = None  # when the last work before the next fetch ended

    def on_train_begin(self, args, state, control, **kwargs):
        self.window_start = self.work_end = self.clock()
        self.waited = 0.0

    def mark_work_end(self, *args, **kwargs) -> None:
        """Note that the loop's own work ended now: what follows until `on_step_begin` is fetching."""
        self.work_end = self.clock()

    on_epoch_begin = on_step_end = on_log = on_evaluate = on_save = mark_work_end

    def on_step_begin(self, args, state, control, **kwargs):
        if self.work_end is not None:
            self.waited += self.clock() - self.work_end
            self.work_end = None

    def pop_fraction(self) -> float | None:
        """The share of wall time spent fetching since the last call (None before training); starts a new window."""
        if self.window_start is None:
            return None
        now = self.clock()
        fraction = self.waited / max(now - self.window_start, 1e-9)
        self.waited, self.window_start = 0.0, now
        return fraction
