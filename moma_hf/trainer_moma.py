"""MoMATrainingArguments and MoMATrainer: MoMA on the standard transformers training loop.

The Trainer does the loop, the optimiser, mixed precision, checkpoints and logging. MoMATrainer adds only
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

from .bad_image_limit import BadImageLimitCallback
from .configuration_moma import METHODS, TEACHER_UPDATES
from .streaming import EndlessStream
from .students import save_student
from .fault_tolerance import STAGING_DIR, ResumeLearningRate, StepGuard, publish_checkpoint
from .run_folder import OutputDirArguments
from .token_safety import TokenSafeArgumentsMixin



@dataclass(repr=False)  # keep the redacting repr of TokenSafeArgumentsMixin
class MoMATrainingArguments(TokenSafeArgumentsMixin, TrainingArguments, OutputDirArguments):
    """`TrainingArguments` plus the teacher, the student and MoMA's hyper-parameters (DESIGN.md section 1).

    Defaults that differ from `TrainingArguments`: `remove_unused_columns=False` (the collator reads the raw
    image column), `hub_strategy="end"` (only the final student is pushed, never a MoMA checkpoint) and
    `dataloader_drop_last=True` for training (evaluation never drops samples). Pickles of these arguments
    (`checkpoint-*/training_args.bin`) hold no Hub token (see `token_safety.py`).
    """

    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher: Hub id or local path (transformers or timm `hf-hub:` model)."}
    )
    teacher_model_revision: str = field(default="main", metadata={"help": "Teacher revision (branch, tag, sha)."})
    teacher_model_init_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Extra timm kwargs for the teacher, e.g. '{\"init_values\": 1e-5}'."}
    )
    student_model_name_or_path: str = field(
        default="resnet18",
        metadata={"help": "Student: Hub id or path of an image classifier, a timm architecture name built from "
                  "scratch (e.g. resnet18), or 'same-as-teacher'."},
    )
    method: str = field(
        default="moma", metadata={"help": f"Distillation method, one of {METHODS}: MoMA, its no-attention ablation, "
                                  "or a baseline (ce = no teacher)."}
    )
    teacher_update: str = field(default="auto", metadata={"help": f"One of {TEACHER_UPDATES}."})
    projection_dim: int = field(default=512, metadata={"help": "D, the contrastive embedding size."})
    attention_heads: int = field(default=4, metadata={"help": "Heads of the batch-axis attention."})
    queue_size: int = field(default=16384, metadata={"help": "K, the number of queued negative keys."})
    contrastive_temperature: float = field(default=0.15, metadata={"help": "T of the InfoNCE term."})
    momentum: float = field(default=0.999, metadata={"help": "m of the key-pathway EMA."})
    w_ce: float = field(default=1.0, metadata={"help": "Weight of the cross-entropy term."})
    w_kd: float | None = field(
        default=None, metadata={"help": "Weight of logit KD; default 1 when the teacher has the student's labels, "
                                "else 0."}
    )
    attention_residual: bool = field(
        default=True, metadata={"help": "Batch attention outputs normalize(x + attention(x)); False gives the "
                                "reference code's normalize(attention(x)), whose keys collapse at init."}
    )
    w_moma: float = field(default=1.0, metadata={"help": "Weight of the MoMA contrastive term."})
    kd_temperature: float = field(default=4.0, metadata={"help": "T_kd of the logit-KD term."})
    w_feature: float | None = field(
        default=None, metadata={"help": "Weight of the fitnet/rkd/crd term; default 100/1/0.8 (RepDistiller)."}
    )
    shuffle_bn: bool = field(
        default=False, metadata={"help": "Momentum teachers on several processes: BatchNorm on a batch shuffled "
                                 "across processes (MoCo's Shuffle-BN) instead of running statistics."}
    )
    cache_teacher_features: bool = field(
        default=False, metadata={"help": "Frozen teachers: compute the teacher's outputs for --cache_views views of "
                                 "every training image once, then distil with no teacher forward."}
    )
    cache_views: int = field(default=4, metadata={"help": "Augmented views per image in the teacher-feature cache; "
                                                  "epoch e trains on view e % cache_views."})
    teacher_feature_cache_dir: str | None = field(
        default=None, metadata={"help": "Where the cache lives (reused when it matches the run); default "
                                "OUTPUT_DIR/_teacher-feature-cache (the leading _ keeps it out of --push_to_hub)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow Hub models to run their own code."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep False: the collator needs images."})
    hub_strategy: str = field(default="end", metadata={"help": "Only 'end' is supported: the student is pushed."})
    dataloader_drop_last: bool = field(
        default=True, metadata={"help": "Drop a short last training batch: batch attention and BN need full ones "
                                "(evaluation never drops). Streams never have short batches: they run as one "
                                "endless epoch (see streaming.py)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r} is not one of {METHODS}.")
        if self.teacher_update not in TEACHER_UPDATES:
            raise ValueError(f"--teacher_update {self.teacher_update!r} is not one of {TEACHER_UPDATES}.")
        if str(getattr(self.hub_strategy, "value", self.hub_strategy)) != "end":
            raise ValueError(
                "--hub_strategy must be 'end': checkpoints hold the whole MoMA state (teacher, queue), not the "
                "student, so only the exported student is pushed, once training ends."
            )
        if self.ddp_find_unused_parameters is None:
            # Every trainable parameter gets a gradient in every step unless a loss term is switched off, so DDP
            # can skip its per-step search of the autograd graph (the Trainer turns it on for any PreTrainedModel).
            self.ddp_find_unused_parameters = self.w_ce == 0 or self.w_moma == 0 or self.w_feature == 0
        if self.cache_views < 1:
            raise ValueError(f"--cache_views {self.cache_views} must be at least 1.")
        if self.remove_unused_columns:
            raise ValueError("--remove_unused_columns must be False: the collator reads the raw image column.")
        if isinstance(self.teacher_model_init_kwargs, str):
            import json

            self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)

    @property
    def global_batch_size(self) -> int:
        """Keys enqueued per optimiser step: per-device batch x processes x accumulation steps."""
        return self.per_device_train_batch_size * self.world_size * self.gradient_accumulation_steps

    def moma_config_kwargs(self) -> dict[str, Any]:
        """The `MoMAConfig` fields these arguments set."""
        return dict(
            projection_dim=self.projection_dim,
            num_attention_heads=self.attention_heads,
            queue_size=self.queue_size,
            contrastive_temperature=self.contrastive_temperature,
            momentum=self.momentum,
            teacher_update=self.teacher_update,
            use_attention=self.method != "moma-noattn",
            attention_residual=self.attention_residual,
            w_ce=self.w_ce,
            w_kd=self.w_kd,
            w_moma=self.w_moma,
            kd_temperature=self.kd_temperature,
            method=self.method,
            w_feature=self.w_feature,
            shuffle_bn=self.shuffle_bn,
            global_batch_size=self.global_batch_size,
            teacher_name_or_path=self.teacher_model_name_or_path,
            teacher_revision=self.teacher_model_revision,
        )


class _MoMAStepCallback(TrainerCallback):
    """After every optimiser step: EMA of the key pathway, then enqueue the step's gathered keys. Before every
    epoch: tell the collator the epoch, which seeds its augmentation (see `PatchCollator`)."""

    def __init__(self, trainer: "MoMATrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.finish_optimizer_step()

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.trainer.data_collator, "set_epoch"):
            self.trainer.data_collator.set_epoch(int(state.epoch or 0))


class MoMATrainer(Trainer):
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
        self.loss_terms = (*self.moma_model.loss_terms, "labelled_fraction")
        self.step_guard = StepGuard(self.accelerator, ("loss", *self.loss_terms))
        self.add_callback(self.step_guard)
        self.add_callback(ResumeLearningRate())

    @property
    def stopped_by_signal(self) -> bool:
        """True when the last `train()` stopped early on SIGTERM (after saving a checkpoint)."""
        return self.step_guard.stopped_by_signal

    @property
    def moma_model(self):
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
        moma = self.moma_model
        moma.momentum_update()
        if self._pending_keys:
            moma.enqueue(torch.cat(self._pending_keys))
            self._pending_keys.clear()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of each loss term since the last log, across processes, and the queue fill level."""
        if "loss" in logs and self._term_steps:
            means = self.accelerator.reduce(self._term_sums / self._term_steps, reduction="mean")
            logs.update({name: round(value, 4) for name, value in zip(self.loss_terms, means.tolist())})
            queue = getattr(self.moma_model, "key_queue", None)
            if queue is not None:
                logs["queue_fill"] = round(queue.queue_len.item() / queue.size, 4)
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
        save_student(self.moma_model.student, output_dir)  # a timm student in the layout timm also loads
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
        from .model_card import write_model_card

        write_model_card(self, self.args.output_dir, self.model_card_data)
