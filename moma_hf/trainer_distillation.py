"""DistillationTrainer: every distillation method on the standard transformers training loop.

The Trainer does the loop, the optimiser, mixed precision, checkpoints and logging. DistillationTrainer adds only
what MoMA needs: the loss from the model output, the momentum update and the gathered enqueue after each
optimiser step, per-term logging, and the export of the student alone.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .training.bad_image_limit import BadImageLimitCallback
from .configuration_distillation import METHODS, TEACHER_UPDATES
from .data.streaming import EndlessStream
from .networks.students import save_student
from .training.fault_tolerance import STAGING_DIR, ResumeLearningRate, StepGuard, publish_checkpoint
from .training.run_folder import OutputDirArguments
from .training.token_safety import TokenSafeArgumentsMixin



class _MoMAStepCallback(TrainerCallback):
    """After every optimiser step: EMA of the key pathway, then enqueue the step's gathered keys. Before every
    epoch: tell the collator the epoch, which seeds its augmentation (see `PatchCollator`)."""

    def __init__(self, trainer: "DistillationTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.finish_optimizer_step()

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.trainer.data_collator, "set_epoch"):
            self.trainer.data_collator.set_epoch(int(state.epoch or 0))


class DistillationTrainer(Trainer):
    """A `Trainer` for `MoMAForDistillation`.

    It overrides only `compute_loss` (collect keys and loss terms), `log` (add the terms and the queue fill),
    `_save` (export the student alone outside `checkpoint-*`), `_save_checkpoint` (write atomically),
    `create_model_card` (a MoMA card), `_get_dataloader` (evaluation may use its own `eval_data_collator`) and
    `get_batch_samples` (timed: `log` adds `data_wait_fraction`, the share of wall time spent waiting for data).
    Keys are gathered with `accelerator.gather`, so every process enqueues the same global batch in rank order.
    A NaN/Inf loss term raises `NonFiniteLossError` before the weights change, and a NaN/Inf parameter or buffer
    raises `NonFiniteStateError` before it is saved or exported; SIGTERM saves a checkpoint and stops, after
    which `stopped_by_signal` is True; a `--learning_rate` given on resume replaces the checkpoint's (see
    `fault_tolerance.py`).
    """

    def __init__(self, *args, eval_data_collator=None, model_card_data=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.dataloader_persistent_workers and isinstance(self.train_dataset, datasets.Dataset):
            raise ValueError(
                "--dataloader_persistent_workers keeps each worker's copy of the collator from the first epoch, so "
                "every epoch would repeat epoch 0's augmentation (and view 0 of a teacher-feature cache). Drop it; "
                "raise --dataloader_prefetch_factor instead if workers start too slowly."
            )
        # Evaluation needs other transforms than training (no augmentation, no teacher input).
        self.eval_data_collator = eval_data_collator
        self.model_card_data = model_card_data  # a model_card.MoMAModelCardData: facts only the caller knows
        self._pending_keys: list[torch.Tensor] = []
        self._term_sums: torch.Tensor | None = None
        self._term_steps = 0
        self._staging_root: str | None = None
        self._data_wait = 0.0  # seconds spent waiting for batches since the last log
        self._window_start: float | None = None
        self.add_callback(_MoMAStepCallback(self))
        if hasattr(self.data_collator, "num_bad"):  # the unreadable-image limit holds for runs of any length
            self.add_callback(BadImageLimitCallback(self.data_collator))
        # The model's unweighted loss terms, then the share of labelled examples (-1 marks unlabelled ones).
        self.loss_terms = (*self.distillation_model.loss_terms, "labelled_fraction")
        self.step_guard = StepGuard(self.accelerator, ("loss", *self.loss_terms))
        self.add_callback(self.step_guard)
        self.add_callback(ResumeLearningRate())

    @property
    def stopped_by_signal(self) -> bool:
        """True when the last `train()` stopped early on SIGTERM (after saving a checkpoint)."""
        return self.step_guard.stopped_by_signal

    @property
    def distillation_model(self):
        """The bare `MoMAForDistillation`, unwrapped from DDP or compilation."""
        return self.accelerator.unwrap_model(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's weighted loss; in training, also stash the gathered keys and the unweighted terms."""
        outputs = model(**inputs)
        if model.training:
            if outputs.contrastive_keys is not None:
                self._pending_keys.append(self.accelerator.gather(outputs.contrastive_keys))
            labels = inputs.get("labels")
            labelled = (labels >= 0).float().mean() if labels is not None else outputs.loss.new_ones(())
            terms = torch.stack([outputs[name].detach().float() for name in self.loss_terms[:-1]] + [labelled.float()])
            self.step_guard.record(torch.cat([outputs.loss.detach().float().reshape(1), terms]))
            self._term_sums = terms if self._term_sums is None else self._term_sums + terms
            self._term_steps += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False,
                        dataloader_key=None):
        if is_training:
            if isinstance(dataset, datasets.IterableDataset):
                dataset = EndlessStream(dataset)  # exact resume of streams, and no short batches
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator or self.data_collator
        drop_last, self.args.dataloader_drop_last = self.args.dataloader_drop_last, False  # evaluate every sample
        try:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)
        finally:
            self.data_collator, self.args.dataloader_drop_last = train_collator, drop_last

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the next step's batches, timing the wait: `log` reports it as `data_wait_fraction`."""
        start = time.perf_counter()
        if self._window_start is None:
            self._window_start = start
        try:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        finally:
            self._data_wait += time.perf_counter() - start

    def finish_optimizer_step(self) -> None:
        """Momentum update, then enqueue the keys of every micro-batch of the step that just ended."""
        moma = self.distillation_model
        moma.momentum_update()
        if self._pending_keys:
            moma.enqueue(torch.cat(self._pending_keys))
            self._pending_keys.clear()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of each loss term since the last log, across processes, and the queue fill level."""
        if "loss" in logs and self._term_steps:
            means = self.accelerator.reduce(self._term_sums / self._term_steps, reduction="mean")
            logs.update({name: round(value, 4) for name, value in zip(self.loss_terms, means.tolist())})
            fill = self.distillation_model.queue_fill
            if fill is not None:
                logs["queue_fill"] = round(fill, 4)
            self._term_sums, self._term_steps = None, 0
        if "loss" in logs and self._window_start is not None:
            # Host time blocked on the DataLoader over wall time since the last log (this process's view): near
            # 0 when the workers keep up, near 1 when data is the bottleneck.
            now = time.perf_counter()
            logs["data_wait_fraction"] = round(self._data_wait / max(now - self._window_start, 1e-9), 4)
            self._data_wait, self._window_start = 0.0, now
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """`checkpoint-*` keeps the full MoMA state; any other folder receives the student alone."""
        output_dir = output_dir or self.args.output_dir
        if os.path.basename(os.path.normpath(output_dir)).startswith(PREFIX_CHECKPOINT_DIR):
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_student(self.distillation_model.student, output_dir)  # a timm student in the layout timm also loads
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        # JSON, not the pickled args: it redacts tokens and never needs unpickling.
        with open(os.path.join(output_dir, "training_args.json"), "w", encoding="utf-8") as f:
            f.write(self.args.to_json_string())

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is being written, the Trainer writes it into the staging folder.
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write `checkpoint-N` into a staging folder, then rename it into place once every process is done."""
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_DIR)
        if self.args.should_save:
            shutil.rmtree(os.path.join(staging_root, name), ignore_errors=True)  # left by a crash mid-save
        self.accelerator.wait_for_everyone()
        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        best = self.state.best_model_checkpoint
        if best and best.startswith(staging_root):
            self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staging_root, name, "trainer_state.json"))
        self.accelerator.wait_for_everyone()  # every process's RNG file is in before the folder goes live
        if self.args.should_save:
            publish_checkpoint(os.path.join(staging_root, name), os.path.join(run_dir, name))
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def create_model_card(self, *args, **kwargs) -> None:
        """Write the MoMA model card (not the Trainer's generic one) into `output_dir`."""
        if not self.is_world_process_zero():
            return
        from .evaluation.model_card import write_model_card

        write_model_card(self, self.args.output_dir, self.model_card_data)
