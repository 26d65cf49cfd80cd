"""What keeps a MoMA run from losing or corrupting its state: a per-step guard and atomic checkpoints.

- `StepGuard` runs once per optimiser step, before the optimiser touches the weights. It stops the run with a
  `NonFiniteLossError` when any process saw a NaN/Inf loss term, and turns SIGTERM (a pre-empted cluster job)
  into "save a checkpoint after this step, then stop". Both flags travel in one all-reduce, so every process
  takes the same decision at the same step.
- `publish_checkpoint` moves a fully written checkpoint from a staging folder to `checkpoint-N` with one
  rename, so a crash mid-save never leaves a half-written `checkpoint-N` for resume to pick.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# Hidden, and not matching the Trainer's `^checkpoint-\d+$`, so resume never looks inside.
STAGING_DIR = ".checkpoint-staging"


class NonFiniteLossError(RuntimeError):
    """A loss term was NaN or Inf; raised before the optimiser step, so the weights are still the last good ones."""


class StepGuard(TrainerCallback):
    """Stop on non-finite losses and save-then-stop on SIGTERM, agreed across processes once per step.

    Args:
        accelerator: the Trainer's `Accelerator` (for the all-reduce).
        term_names: names of the entries of the flag vector given to `record`, e.g. `("loss", "loss_ce", ...)`.
    """

    def __init__(self, accelerator, term_names: tuple[str, ...]):
        self.accelerator = accelerator
        self.term_names = term_names
        self._bad: torch.Tensor | None = None
        self._sigterm = False
        self._previous_handler = None
        self.stopped_by_signal = False

    def record(self, values: torch.Tensor) -> None:
        """Note which of this micro-batch's `(len(term_names),)` loss values are not finite (no host sync)."""
        bad = ~torch.isfinite(values.detach())
        self._bad = bad if self._bad is None else self._bad | bad

    def on_train_begin(self, args, state, control, **kwargs):
        # Signal handlers can only be installed from the main thread (a notebook's cell thread may not be).
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def _on_sigterm(self, signum, frame):
        # Only a flag: the step in flight finishes, then every process saves the same checkpoint.
        self._sigterm = True

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._bad is None:
            return
        flags = torch.cat([self._bad.float(), self._bad.new_tensor([float(self._sigterm)], dtype=torch.float32)])
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        self._bad = None
        bad_terms = [name for name, flag in zip(self.term_names, flags[:-1].tolist()) if flag > 0]
        if bad_terms:
            raise NonFiniteLossError(_non_finite_message(state.global_step + 1, bad_terms, args.output_dir))
        if flags[-1].item() > 0:
            logger.warning("SIGTERM received: saving checkpoint-%d, then stopping.", state.global_step + 1)
            self.stopped_by_signal = True
            control.should_save = True
            control.should_training_stop = True


def _non_finite_message(step: int, terms: list[str], output_dir: str) -> str:
    return (
        f"Non-finite loss at optimiser step {step}: {', '.join(terms)} is NaN or Inf. The run stopped before this "
        f"step changed any weight; the checkpoints in {output_dir} hold only finite weights. Usual fixes: lower "
        "--learning_rate or set --max_grad_norm; use --bf16 instead of --fp16 (fp16 overflows); raise "
        "--contrastive_temperature if loss_moma is the term; check the images for blank or constant patches. "
        "Then continue with --resume_from_checkpoint (the last checkpoint-* folder)."
    )


def publish_checkpoint(staged: str, final: str) -> None:
    """Make the fully written folder `staged` appear as `final` at once, replacing an older `final`.

    Call on the process that writes (after every process has finished writing into `staged`).
    """
    replaced = None
    if os.path.exists(final):
        # A rename cannot replace a non-empty folder: move the old one aside first. Meanwhile resume sees the
        # previous checkpoint, which is complete.
        replaced = os.path.join(os.path.dirname(final), f".replaced-{os.path.basename(final)}")
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(staged, final)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    try:
        os.rmdir(os.path.dirname(staged))  # the staging folder, once empty
    except OSError:
        pass
