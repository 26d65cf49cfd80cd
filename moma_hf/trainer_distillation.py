"""DistillationTrainer: every distillation method on the standard transformers training loop.

The Trainer does the loop, the optimiser, mixed precision, checkpoints and logging. DistillationTrainer adds only
what distillation needs: the loss from the model output, the momentum update and the gathered enqueue after each
optimiser step, per-term logging, evaluation with its own collator, and the export of the student alone.
"""

from __future__ import annotations

import os

import datasets
import torch
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from .data.streaming import EndlessStream
from .networks.students import save_student
from .training.bad_image_limit import BadImageLimitCallback
from .training.callbacks import DataWaitCallback, DistillationStepCallback
from .training.evaluation_loader import EvalCollatorMixin
from .training.fault_tolerance import (
    ResumeLearningRate,
    StaleCheckpointCallback,
    StepGuard,
    check_checkpoint_teacher,
    check_resumable,
    is_checkpoint_folder,
    remove_incomplete_checkpoints,
)


class DistillationTrainer(EvalCollatorMixin, Trainer):
    """A `Trainer` for every `DistillationPreTrainedModel` (MoMA and the baselines).

    It works through the Trainer's public hooks: callbacks (`DistillationStepCallback`: momentum update and
    enqueue after each optimiser step; `DataWaitCallback`: `data_wait_fraction`, the share of wall time spent
    waiting for data; `StepGuard`, `StaleCheckpointCallback`, `ResumeLearningRate`, `BadImageLimitCallback`) and
    these overrides, each checked against the parent's signature by a test:

    - `__init__`: adds `eval_data_collator` and `model_card_data`; wraps a streamed training set in
      `EndlessStream` (exact resume of streams, no short batches); refuses persistent workers for map-style data.
    - `compute_loss`: the model's loss; in training, also stashes the gathered keys and the unweighted terms.
    - `log`: adds the mean of each loss term, `labeled_fraction`, `queue_fill` and `data_wait_fraction`.
    - `get_eval_dataloader`, `get_test_dataloader`: evaluation uses `eval_data_collator` (no augmentation, no
      teacher input) and never drops the last batch, while training drops short batches.
    - `train`: removes incomplete `checkpoint-*` folders first (and when training raises), so resume picks the
      last complete one, and refuses to resume from an incomplete one (see `fault_tolerance.is_complete_checkpoint`).
    - `floating_point_ops`: the Trainer's estimate with the parameters counted once, not at every step.
    - `create_model_card`: the distillation card (facts from the run) instead of the Trainer's generic one.
    - `_save`, the one private override (the usual one, with no public hook): a checkpoint folder receives the
      full distillation state, any other folder the student alone (`fault_tolerance.is_checkpoint_folder`).

    Keys are gathered with `accelerator.gather`, so every process enqueues the same global batch in rank order.
    A NaN/Inf loss term raises `NonFiniteLossError` before the weights change, and a NaN/Inf parameter or buffer
    raises `NonFiniteStateError` before it is saved or exported; SIGTERM saves a checkpoint and stops, after
    which `stopped_by_signal` is True; a `--learning_rate` given on resume replaces the checkpoint's (see
    `fault_tolerance.py`).
    """

    def __init__(self, model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, *, eval_data_collator=None, model_card_data=None, **kwargs):
        if isinstance(train_dataset, datasets.IterableDataset):
            train_dataset = EndlessStream(train_dataset)  # exact resume of streams, and no short batches
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs)
        if self.args.dataloader_persistent_workers and isinstance(self.train_dataset, datasets.Dataset):
            raise ValueError(
                "--dataloader_persistent_workers keeps each worker's copy of the collator from the first epoch, so "
                "every epoch would repeat epoch 0's augmentation (and view 0 of a teacher-feature cache). Drop it; "
                "raise --dataloader_prefetch_factor instead if workers start too slowly."
            )
        self.eval_data_collator = eval_data_collator  # no augmentation, no teacher input
        self.model_card_data = model_card_data  # a model_card.DistillationModelCardData: facts only the caller knows
        self._pending_keys: list[torch.Tensor] = []
        self._term_sums: torch.Tensor | None = None
        self._term_steps = 0
        self._num_parameters: int | None = None  # counted at the first step, once a cached run released its teacher
        self.add_callback(DistillationStepCallback(self))
        if hasattr(self.data_collator, "num_bad"):  # the unreadable-image limit holds for runs of any length
            self.add_callback(BadImageLimitCallback(self.data_collator))
        # The model's unweighted loss terms, then the share of labeled examples (-1 marks unlabeled ones).
        self.loss_terms = (*self.distillation_model.loss_terms, "labeled_fraction")
        self.step_guard = StepGuard(self.accelerator, ("loss", *self.loss_terms))
        self.add_callback(self.step_guard)
        self.add_callback(StaleCheckpointCallback())  # after StepGuard, which may still cancel the save
        self.add_callback(ResumeLearningRate())
        self.data_wait = DataWaitCallback()  # last, so the other callbacks' work is not counted as waiting
        self.add_callback(self.data_wait)

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
            labeled = (labels >= 0).float().mean() if labels is not None else outputs.loss.new_ones(())
            terms = torch.stack([outputs[name].detach().float() for name in self.loss_terms[:-1]] + [labeled.float()])
            self.step_guard.record(torch.cat([outputs.loss.detach().float().reshape(1), terms]))
            self._term_sums = terms if self._term_sums is None else self._term_sums + terms
            self._term_steps += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss


    def floating_point_ops(self, inputs: dict) -> int:
        """The Trainer's `6 x input elements x parameters` estimate for `total_flos`, the parameters counted once:
        the Trainer asks at every step, and counting walks every parameter (0.3-1.7 ms of host time a step)."""
        if self._num_parameters is None:
            self._num_parameters = self.distillation_model.num_parameters(exclude_embeddings=True)
        pixels = inputs.get(self.distillation_model.main_input_name)
        return 0 if pixels is None else 6 * pixels.numel() * self._num_parameters

    def finish_optimizer_step(self) -> None:
        """Momentum update, then enqueue the keys of every micro-batch of the step that just ended."""
        moma = self.distillation_model
        moma.momentum_update()
        if self._pending_keys:
            moma.enqueue(torch.cat(self._pending_keys))
            self._pending_keys.clear()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add to a training log the mean of each loss term since the last log across processes (`labeled_fraction`
        included), the queue fill level (`queue_fill`) and this process's `data_wait_fraction`."""
        if "loss" in logs and self._term_steps:
            means = self.accelerator.reduce(self._term_sums / self._term_steps, reduction="mean")
            logs.update({name: round(value, 4) for name, value in zip(self.loss_terms, means.tolist())})
            fill = self.distillation_model.queue_fill
            if fill is not None:
                logs["queue_fill"] = round(fill, 4)
            self._term_sums, self._term_steps = None, 0
        fraction = self.data_wait.pop_fraction() if "loss" in logs else None
        if fraction is not None:
            logs["data_wait_fraction"] = round(fraction, 4)  # this process's share of time waiting for batches
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        """`Trainer.train`, which first removes incomplete `checkpoint-*` folders (and again if training raises).

        An incomplete checkpoint (see `fault_tolerance.is_complete_checkpoint`) is a save cut short; the Trainer
        would take it for the newest and restart from step 0. After the removal, `resume_from_checkpoint=True`
        picks the last complete checkpoint through transformers' `get_last_checkpoint`. An explicit path to an
        incomplete checkpoint raises `IncompleteCheckpointError`, naming the last complete one. A checkpoint that
        names its frozen teacher is resumed only with a teacher of the same weights (`check_checkpoint_teacher`).
        """
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            check_resumable(resume_from_checkpoint)
        if self.args.should_save:
            remove_incomplete_checkpoints(self.args.output_dir)
        self.accelerator.wait_for_everyone()  # no process looks for the last checkpoint before the removal
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        if checkpoint:
            check_checkpoint_teacher(checkpoint, self.distillation_model)
        try:
            return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)
        except BaseException:
            # No barrier here: the other processes may be stuck elsewhere, or gone.
            if self.args.should_save:
                remove_incomplete_checkpoints(self.args.output_dir)
            raise

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A checkpoint folder keeps the full distillation state; any other folder receives the student alone.

        The rule is `fault_tolerance.is_checkpoint_folder`. `_save` is the only private override: the Trainer
        has no public hook for what `save_model` writes (its `save_model` also handles FSDP and DeepSpeed).
        """
        output_dir = output_dir or self.args.output_dir
        if is_checkpoint_folder(output_dir):
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

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None) -> None:
        """Write the distillation model card (not the Trainer's generic one) into `output_dir`.

        The card is built from the run's facts and `model_card_data`; the parent's arguments (which
        `Trainer.push_to_hub` passes) are accepted and ignored.
        """
        if not self.is_world_process_zero():
            return
        from .evaluation.model_card import write_model_card

        write_model_card(self, self.args.output_dir, self.model_card_data)
