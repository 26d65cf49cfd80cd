"""What keeps a distillation run from losing or corrupting its state: a per-step guard and complete checkpoints.

- `StepGuard` runs once per optimiser step, before the optimiser touches the weights. It stops the run with a
  `NonFiniteLossError` when any process saw a NaN/Inf loss term, and turns SIGTERM (a pre-empted cluster job)
  into "save a checkpoint after this step, then stop". Both flags travel in one all-reduce, so every process
  takes the same decision at the same step. On steps that save, and before the final export, it also checks
  that every tensor of the model state (parameters and buffers: BatchNorm statistics, the key queue) is
  finite, and stops with a `NonFiniteStateError` naming the tensors otherwise.
- `ResumeLearningRate` makes a `--learning_rate` given on resume take effect (the Trainer would restore the
  checkpoint's schedule), so the advice after a NaN, "resume with a lower learning rate", works.
- The Trainer writes `checkpoint-N` in place. `is_complete_checkpoint` states when such a folder may be resumed
  (its `trainer_state.json` exists); `remove_incomplete_checkpoints` deletes the others (a crash or a kill
  mid-save), which the Trainer would otherwise "resume" from step 0; `check_resumable` refuses an explicit one;
  `StaleCheckpointCallback` makes an older `checkpoint-N` that is about to be overwritten incomplete first.
- `is_checkpoint_folder` states which folders receive the full distillation state rather than the student alone.
- `check_checkpoint_teacher`: a checkpoint that names its frozen teacher (instead of storing it) is resumed only
  with a teacher of the same weights.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME  # written last into a checkpoint (see is_complete_checkpoint)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import CONFIG_NAME

from ..modeling_distillation import check_teacher_hash
from .launcher import follow_launcher, reroute_orphaned_output

logger = logging.getLogger(__name__)

BLOWUP_FACTOR = 10.0  # a logged loss this many times the run's first one: the weights had diverged by then
# The name `Trainer._save_checkpoint` gives a checkpoint folder (and the one its `get_last_checkpoint` looks for).
CHECKPOINT_NAME = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


class NonFiniteLossError(RuntimeError):
    """A loss term was NaN or Inf; raised before the optimiser step, so the weights are still the last good ones."""


class NonFiniteStateError(RuntimeError):
    """A tensor of the model state (parameter or buffer) holds NaN or Inf; raised before it is saved or exported."""


class StepGuard(TrainerCallback):
    """Stop on non-finite losses or state, and save-then-stop on SIGTERM, agreed across processes.

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
        self._checked_step: int | None = None
        self.stopped_by_signal = False

    def record(self, values: torch.Tensor) -> None:
        """Note which of this micro-batch's `(len(term_names),)` loss values are not finite (no host sync)."""
        bad = ~torch.isfinite(values.detach())
        self._bad = bad if self._bad is None else self._bad | bad

    def on_train_begin(self, args, state, control, **kwargs):
        self.stopped_by_signal = False
        self._checked_step = None
        # Signal handlers can only be installed from the main thread (a notebook's cell thread may not be).
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            follow_launcher()  # a launcher that dies (even by SIGKILL) sends us SIGTERM: checkpoint, not orphan

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
        # The state the caller exports next (save_model) must be finite too.
        self._check_state(args, state, model)

    def _on_sigterm(self, signum, frame):
        # Only a flag: the step in flight finishes, then every process saves the same checkpoint.
        self._sigterm = True
        reroute_orphaned_output()  # the signal may say that the launcher, which read our stderr, has died

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._bad is None:
            return
        flags = torch.cat([self._bad.float(), self._bad.new_tensor([float(self._sigterm)], dtype=torch.float32)])
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        self._bad = None
        *term_flags, sigterm = flags.tolist()  # one host sync for the terms and the signal
        bad_terms = [name for name, flag in zip(self.term_names, term_flags) if flag > 0]
        if bad_terms:
            raise NonFiniteLossError(_non_finite_loss_message(state.global_step + 1, bad_terms, args, state))
        if sigterm > 0:
            logger.warning("SIGTERM received: saving checkpoint-%d, then stopping.", state.global_step + 1)
            self.stopped_by_signal = True
            control.should_save = True
            control.should_training_stop = True

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if may_save_now(args, control):
            self._check_state(args, state, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if may_save_now(args, control):
            self._check_state(args, state, model)

    def _check_state(self, args, state, model) -> None:
        if model is None or self._checked_step == state.global_step:
            return
        bad = non_finite_tensors(self.accelerator.unwrap_model(model), self.accelerator)
        self._checked_step = state.global_step
        if bad:
            raise NonFiniteStateError(_non_finite_state_message(state.global_step, bad, args, state))


def may_save_now(args, control) -> bool:
    """Whether the Trainer may write a checkpoint right after this `on_step_end` / `on_epoch_end`.

    Callbacks run after DefaultFlowCallback (the Trainer's first callback), which has set `should_save` by then,
    and before the Trainer saves. With save_strategy="best" the save follows an evaluation, so it may happen.
    """
    return bool(control.should_save or (control.should_evaluate and args.save_strategy == "best"))


def non_finite_tensors(module: torch.nn.Module, accelerator=None) -> list[str]:
    """Names of the parameters and buffers of `module` that hold a NaN or Inf, on any process.

    One fused max-abs reduction over every floating tensor and one host sync (plus one all-reduce when
    `accelerator` runs several processes), so it is cheap enough for every checkpoint.
    """
    named = [(name, tensor.detach()) for name, tensor in itertools.chain(module.named_parameters(),
                                                                        module.named_buffers())
             if tensor.is_floating_point()]
    if not named:
        return []
    # The infinity norm has no value on an empty tensor (a shard can be empty); such a tensor is finite.
    tensors = [t if t.numel() else t.new_zeros(1) for _, t in named]
    device = tensors[0].device
    flags = torch.stack([(~torch.isfinite(m)).to(device) for m in torch._foreach_norm(tensors, float("inf"))])
    if accelerator is not None and accelerator.num_processes > 1:
        flags = accelerator.reduce(flags.float(), reduction="sum")
    return [name for (name, _), flag in zip(named, flags.tolist()) if flag]


class ResumeLearningRate(TrainerCallback):
    """On resume, make `args.learning_rate` the peak learning rate of the restored schedule.

    The Trainer restores the checkpoint's optimiser and scheduler, whose base learning rates are the old run's,
    so a lower `--learning_rate` given with `--resume_from_checkpoint` would be ignored. `on_train_begin` runs
    after that restore: it rescales every group's `lr` and `initial_lr` and the scheduler's `base_lrs` by
    new / old, keeping the schedule's shape and position, and logs that it did. Same learning rate: no change.
    """

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # unwrap accelerate's AcceleratedScheduler
        base_lrs = getattr(scheduler, "base_lrs", None)
        if state.global_step == 0 or optimizer is None or not base_lrs or not base_lrs[0]:
            return
        factor = args.learning_rate / base_lrs[0]
        if factor == 1.0:
            return
        for group in optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        scheduler.base_lrs = [lr * factor for lr in base_lrs]
        if hasattr(scheduler, "_last_lr"):  # what get_last_lr() (and the Trainer's log) reports until next step
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        logger.warning("Resumed at step %d with --learning_rate %g; the checkpoint's schedule peaked at %g. "
                       "Learning rates rescaled by %g.", state.global_step, args.learning_rate, base_lrs[0], factor)


def last_healthy_checkpoint(output_dir: str, log_history: list[dict], logging_steps: int) -> str | None:
    """The newest complete `checkpoint-N` in `output_dir` saved before the logged training loss blew up, or None.

    Finite is not healthy: weights of 1e21 still give a non-finite state at the next forward pass. The loss
    blew up at the first logged step whose loss is not finite or above `BLOWUP_FACTOR` x the first logged
    loss; with no blow-up in the log, the newest checkpoint is the answer.
    """
    steps = [checkpoint_step(path) for path in checkpoint_folders(output_dir) if is_complete_checkpoint(path)]
    losses = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    first = abs(losses[0][1]) if losses else 0.0
    blowup = next((step for step, loss in losses if not math.isfinite(loss) or loss > BLOWUP_FACTOR * first), None)
    # checkpoint-N's weights first made the loss of step N + 1, and a logged loss averages `logging_steps` steps.
    healthy = [n for n in steps if blowup is None or n + max(int(logging_steps), 1) < blowup]
    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{healthy[-1]}") if healthy else None


def _resume_advice(args, state) -> str:
    """How to continue: a tenth of the learning rate, from the last healthy checkpoint or afresh, as a command."""
    checkpoint = last_healthy_checkpoint(args.output_dir, state.log_history, args.logging_steps)
    flags = ["--learning_rate", f"{args.learning_rate / 10:g}"]
    if checkpoint:
        flags += ["--resume_from_checkpoint", checkpoint]
        advice = f"Continue from {checkpoint} (the newest checkpoint saved before the loss blew up)"
    else:
        flags += ["--overwrite_output_dir", "true"]
        advice = "Start over (no checkpoint predates the blow-up of the loss)"
    advice += f" with a lower learning rate, which takes effect on resume too: rerun with {shlex.join(flags)}"
    script = sys.argv[0] if sys.argv else ""
    if script.endswith(".py") and os.path.basename(script) != "__main__.py":
        advice += f", e.g. (with your launcher's options, if any):\n  {relaunch_command(sys.argv, flags)}"
    return advice


def relaunch_command(argv: list[str], flags: list[str]) -> str:
    """`accelerate launch` + `argv` (script and arguments) with every flag in `flags` replaced or added.

    `--resume_from_checkpoint` is always dropped from `argv`: `flags` says where to continue from, if anywhere.
    """
    replaced = {flag for flag in flags if flag.startswith("--")} | {"--resume_from_checkpoint"}
    kept, drop_value = [], False
    for token in argv:
        name = token.split("=", 1)[0]
        if drop_value and not token.startswith("--"):  # the value of a replaced flag
            drop_value = False
            continue
        drop_value = name in replaced and "=" not in token
        if name not in replaced:
            kept.append(token)
    return shlex.join(["accelerate", "launch", *kept, *flags])


def _non_finite_loss_message(step: int, terms: list[str], args, state) -> str:
    return (
        f"Non-finite loss at optimiser step {step}: {', '.join(terms)} is NaN or Inf. The run stopped before this "
        f"step changed any weight; the checkpoints in {args.output_dir} hold only finite tensors (each is "
        "checked before it is written). Usual fixes: lower --learning_rate or set --max_grad_norm; use --bf16 "
        "instead of --fp16 (fp16 overflows); raise --contrastive_temperature if loss_moma is the term; check the "
        f"images for blank or constant patches. {_resume_advice(args, state)}"
    )


def _non_finite_state_message(step: int, names: list[str], args, state) -> str:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (
        f"Non-finite model state after optimiser step {step}: {len(names)} tensor(s) hold NaN or Inf ({shown}). "
        f"Nothing was saved at this step; the checkpoints in {args.output_dir} hold only finite tensors (each is "
        "checked before it is written). The weights diverged: lower --learning_rate or set --max_grad_norm; "
        "non-finite BatchNorm running statistics come from huge activations. "
        f"{_resume_advice(args, state)}"
    )


def is_checkpoint_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a Trainer checkpoint folder, `checkpoint-<step>` (transformers' `PREFIX_CHECKPOINT_DIR`).

    The rule of `DistillationTrainer._save`: a checkpoint folder receives the full distillation state (key
    pathway, queue, a momentum teacher; a frozen teacher is named, not stored: see `check_checkpoint_teacher`),
    so that training resumes exactly; any other folder receives the student alone.
    """
    return CHECKPOINT_NAME.fullmatch(Path(path).name) is not None


def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimiser step `N` of a `checkpoint-N` folder."""
    return int(CHECKPOINT_NAME.fullmatch(Path(path).name).group(1))


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the checkpoint folder `path` was fully written: its `trainer_state.json` exists.

    `Trainer._save_checkpoint` (transformers 5) writes, in this order, the model, the optimiser and scheduler,
    the scaler, this process's RNG state, and then, on the saving process, `trainer_state.json`. A save cut short
    (crash, full disk, SIGKILL) therefore leaves no `trainer_state.json`, and without it the Trainer cannot
    resume: it would silently restart from step 0. With several processes, another process's RNG file may
    trail `trainer_state.json` by a moment; if it is missing, the Trainer warns and resumes without it.
    """
    return os.path.isfile(os.path.join(path, TRAINER_STATE_NAME))


def checkpoint_folders(output_dir: str | os.PathLike) -> list[str]:
    """Every `checkpoint-N` folder in `output_dir`, complete or not, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    folders = [os.path.join(output_dir, name) for name in os.listdir(output_dir)
               if is_checkpoint_folder(name) and os.path.isdir(os.path.join(output_dir, name))]
    return sorted(folders, key=checkpoint_step)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete checkpoint in `output_dir` (see `is_complete_checkpoint`), or None."""
    complete = [path for path in checkpoint_folders(output_dir) if is_complete_checkpoint(path)]
    return complete[-1] if complete else None


def remove_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """Delete the incomplete checkpoint folders of `output_dir`, with a warning naming them; returns their paths.

    Afterwards transformers' own `get_last_checkpoint` (what `resume_from_checkpoint=True` uses) finds the last
    complete checkpoint. Call on the process that saves, while no checkpoint is being written.
    """
    incomplete = [path for path in checkpoint_folders(output_dir) if not is_complete_checkpoint(path)]
    if incomplete:
        logger.warning("Removing %s: a save was cut short (no %s), so %s cannot be resumed.",
                       ", ".join(incomplete), TRAINER_STATE_NAME, "they" if len(incomplete) > 1 else "it")
    for path in incomplete:
        shutil.rmtree(path, ignore_errors=True)
    return incomplete


class IncompleteCheckpointError(ValueError):
    """`--resume_from_checkpoint` names a checkpoint whose save was cut short."""


def check_resumable(checkpoint: str | os.PathLike) -> None:
    """Raise `IncompleteCheckpointError` when the folder `checkpoint` exists but is not a complete checkpoint.

    The message names the problem and the last complete checkpoint beside it. A missing folder is left to the
    Trainer, which reports it.
    """
    if not os.path.isdir(checkpoint) or is_complete_checkpoint(checkpoint):
        return
    last = last_complete_checkpoint(os.path.dirname(os.path.abspath(checkpoint)))
    advice = (f"The last complete checkpoint beside it is {last}: resume from that one." if last else
              "No complete checkpoint lies beside it: start afresh (--overwrite_output_dir).")
    raise IncompleteCheckpointError(
        f"Cannot resume from {checkpoint}: it is an incomplete checkpoint (no {TRAINER_STATE_NAME}, which the "
        f"Trainer writes last), left by a save that was cut short, and the Trainer would restart it from step 0. "
        f"{advice}"
    )


def check_checkpoint_teacher(checkpoint: str | os.PathLike, model) -> None:
    """Raise `TeacherMismatchError` when `checkpoint` names its frozen teacher by a weights hash that the teacher
    `model` holds now does not have (the name or folder now holds other weights).

    Nothing is checked when the checkpoint names no hash, or when `model` holds no teacher (its outputs come
    from a teacher-feature cache) or stores its teacher in checkpoints (a momentum teacher, one of unknown name or
    hash). The model's hash is the one computed when its teacher was loaded (`config.teacher_weights_sha256`).
    """
    config_file = os.path.join(checkpoint, CONFIG_NAME)
    if not model.names_teacher or not os.path.isfile(config_file):
        return
    with open(config_file, encoding="utf-8") as f:
        saved = json.load(f)
    if not saved.get("teacher_weights_sha256"):
        return
    check_teacher_hash(saved.get("teacher_name_or_path"), saved.get("teacher_revision"),
                       saved["teacher_weights_sha256"], model.config.teacher_weights_sha256)


class StaleCheckpointCallback(TrainerCallback):
    """Before the Trainer writes `checkpoint-N` over an older `checkpoint-N`, make the older one incomplete.

    This happens when a run resumes from an earlier checkpoint than its newest (the advice after a blow-up).
    The Trainer writes into the existing folder, so until its new `trainer_state.json` is in, the folder would
    mix new weights with the old state; removing the old `trainer_state.json` first keeps the completeness rule
    (`is_complete_checkpoint`) true throughout. Add it after `StepGuard`, which may still cancel the save.
    """

    def on_step_end(self, args, state, control, **kwargs):
        self._invalidate(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._invalidate(args, state, control)

    @staticmethod
    def _invalidate(args, state, control) -> None:
        if args.should_save and may_save_now(args, control):
            stale = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", TRAINER_STATE_NAME)
            if os.path.isfile(stale):
                os.remove(stale)
