"""What every distillation model of this package shares: a student, a frozen-or-momentum teacher, one module.

`MoMAForDistillation` and `BaselineForDistillation` both derive from `DistillationPreTrainedModel`, so the
trainer, checkpoints and export treat every `--method` the same way.

A frozen teacher loaded by name (its config holds `teacher_weights_sha256`) is named in checkpoints, not stored:
`save_pretrained` leaves its tensors out (`_keys_to_ignore_on_save`), resume keeps the teacher the run loaded
(checked by `training.fault_tolerance.check_checkpoint_teacher`), and `from_pretrained` reloads it by name and
checks the hash. A model whose teacher outputs come from a feature cache drops its teacher (`release_teacher`).
"""

from __future__ import annotations

import gc

import torch
from torch import nn
from transformers import AutoModel, AutoModelForImageClassification, PreTrainedModel
from transformers.utils import logging

from .configuration_distillation import (
    TEACHER_DTYPES,
    DistillationConfig,
    Method,
    TeacherUpdate,
    parse_mode,
    refuse_other_method,
)
from .modules.key_queue import KeyQueue
from .networks.backbones import pooled_features
from .networks.teacher_presets import instantiate
from .networks.teachers import load_teacher

logger = logging.get_logger(__name__)


class TeacherMismatchError(ValueError):
    """The teacher a checkpoint names cannot be had: other weights under its name, or it cannot be loaded."""


class DistillationPreTrainedModel(PreTrainedModel):
    """Base of the distillation models: construction from built networks, and a teacher kept in eval mode.

    Subclasses set `config_class` (whose `methods` are the methods they run), `loss_terms` (the names of the
    unweighted terms their output carries, logged by the trainer) and implement `forward`, `momentum_update()`
    and `enqueue(keys)` (no-ops where not needed). A config of another method is refused, naming the class that
    runs it; a base `DistillationConfig` of the right method becomes the class's own config type.
    """

    config_class = DistillationConfig
    base_model_prefix = "moma"
    main_input_name = "pixel_values"
    _supports_sdpa = True
    # The loss is a per-batch mean, not a sum over `num_items_in_batch`: the Trainer must divide it by the
    # gradient-accumulation steps (forward's **kwargs would otherwise make it assume we do).
    accepts_loss_kwargs = False
    loss_terms: tuple[str, ...] = ()

    def __init__(self, config: DistillationConfig, *inputs, **kwargs):
        self.check_method(config.method)
        if not isinstance(config, self.config_class):  # a base DistillationConfig: save it under our own type
            config = self.config_class.from_dict(config.to_dict())
        super().__init__(config, *inputs, **kwargs)

    @classmethod
    def check_method(cls, method: str) -> None:
        """Raise a ValueError naming the model and config classes of `method` when this class does not run it."""
        refuse_other_method(cls.__name__, cls.config_class.methods, parse_mode(Method, "method", method))

    @classmethod
    def from_student_and_teacher(
        cls, student: PreTrainedModel, teacher: PreTrainedModel | None, teacher_id2label: dict | None = None,
        **settings,
    ) -> "DistillationPreTrainedModel":
        """Wrap built networks; `settings` are the config's (`DistillationSettings` fields, `global_batch_size`,
        the teacher's origin: see `DistillationTrainingArguments.distillation_config_kwargs`)."""
        cls.check_method(settings.get("method", cls.config_class.methods[0]))
        config = cls.config_class(
            student_config=student.config, teacher_config=teacher.config if teacher is not None else None,
            teacher_id2label=teacher_id2label, **settings,
        )
        return cls(config, student=student, teacher=teacher)

    def _attach_networks(self, student, teacher, with_teacher: bool = True) -> None:
        """Set `self.student` and a frozen `self.teacher` (None without one), rebuilding any not given."""
        config = self.config
        self.student = student if student is not None else build_network(config.build_student_config(), True)
        self.teacher = None
        if with_teacher:
            self.attach_teacher(teacher if teacher is not None else build_network(
                config.build_teacher_config(), config.teacher_id2label is not None
            ))

    def attach_teacher(self, teacher: nn.Module) -> None:
        """Make `teacher` this model's frozen teacher (gradients off, eval mode, the config's precision)."""
        self.teacher = teacher.requires_grad_(False).eval().to(dtype=TEACHER_DTYPES[self.config.teacher_dtype])
        if hasattr(self, "teacher_update"):  # after __init__: a new teacher, so new names to leave out of saves
            self._leave_named_teacher_out_of_saves()

    def _leave_named_teacher_out_of_saves(self) -> None:
        self._keys_to_ignore_on_save = (
            {f"teacher.{name}" for name in self.teacher.state_dict()} if self.names_teacher else set())

    def release_teacher(self) -> None:
        """Drop a frozen teacher, e.g. when a teacher-feature cache serves its outputs; its memory is freed.

        The config keeps `teacher_config`, so `g_T`, KD from cached logits, checkpoints and export still work; a
        training batch without cached `teacher_features` then raises. A momentum teacher cannot be released.
        """
        if getattr(self, "teacher_update", None) == TeacherUpdate.MOMENTUM:
            raise ValueError("A momentum teacher is an EMA of the student and cannot be released.")
        self.teacher = None
        self._leave_named_teacher_out_of_saves()  # nothing left to leave out
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def names_teacher(self) -> bool:
        """Whether checkpoints name the teacher instead of storing it: a frozen teacher loaded by name, its hash
        known (`config.teacher_weights_sha256`)."""
        config = self.config
        return (getattr(self, "teacher", None) is not None
                and getattr(self, "teacher_update", None) == TeacherUpdate.FROZEN
                and bool(config.teacher_name_or_path and config.teacher_weights_sha256))

    def post_init(self) -> None:
        """transformers' post-init, then keep the key queues out of DDP's per-step buffer broadcast, and a named
        teacher's tensors out of saved weights."""
        super().post_init()
        self._leave_named_teacher_out_of_saves()
        # Every process enqueues the same gathered keys, so the queues are identical by construction; DDP
        # would otherwise re-send them from rank 0 before every forward (32 MiB at K=16384, D=512).
        self._ddp_params_and_buffers_to_ignore = [
            f"{module_name}.{buffer_name}" for module_name, module in self.named_modules()
            if isinstance(module, KeyQueue) for buffer_name, _ in module.named_buffers()
        ]

    def _init_weights(self, module: nn.Module) -> None:
        # Sub-modules are initialised when built (torch defaults) or come pre-trained; never re-initialise.
        pass

    def train(self, mode: bool = True) -> "DistillationPreTrainedModel":
        """Train mode for the student side; the teacher always runs in eval mode (fixed BN, no dropout)."""
        super().train(mode)
        if getattr(self, "teacher", None) is not None:
            self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_outputs(self, pixel_values: torch.Tensor, teacher_pixel_values: torch.Tensor | None = None,
                        teacher_features: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None):
        """The teacher's pooled features `(B, d_t)` and logits `(B, C_t)` (None without a head).

        They come from a teacher-feature cache when the batch carries `teacher_features` (see
        `feature_cache.py`), else from one forward of the teacher on `teacher_pixel_values` (default:
        `pixel_values`).
        """
        if teacher_features is not None:
            return teacher_features, teacher_logits
        if self.teacher is None:
            raise ValueError(
                "This model holds no teacher (released: its outputs come from a teacher-feature cache), but the "
                "batch carries no cached teacher_features. Train with the collator that reads the cache "
                "(--cache_teacher_features), or build the model with its teacher."
            )
        images = pixel_values if teacher_pixel_values is None else teacher_pixel_values
        # A bf16/fp16 teacher (--teacher_dtype) runs in its own precision; what it hands on is float32.
        features, logits = pooled_features(self.teacher, images.to(next(self.teacher.parameters()).dtype))
        return features.float(), logits.float() if logits is not None else None

    @property
    def queue_fill(self) -> float | None:
        """The share of the key queue (or CRD's memory) that holds real keys; None for methods without one."""
        queues = [module for module in self.modules() if isinstance(module, KeyQueue)]
        return queues[0].fill if queues else None

    @property
    def student_summary(self) -> dict:
        """What the exported student is: `{"architecture": timm name or transformers class, "num_parameters": int}`."""
        name = getattr(self.student.config, "architecture", None) or type(self.student).__name__
        return {"architecture": name, "num_parameters": sum(p.numel() for p in self.student.parameters())}

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
        """transformers' `from_pretrained`; a frozen teacher that the weights do not hold (a checkpoint names it)
        is reloaded by name and revision, its hash checked against the config's. `token` is passed on."""
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = {key for key in info["missing_keys"] if key.startswith("teacher.")}
        if missing and model.teacher is not None:
            model.reload_named_teacher(token=kwargs.get("token"))
            info["missing_keys"] = type(info["missing_keys"])(k for k in info["missing_keys"] if k not in missing)
        return (model, info) if output_loading_info else model

    def reload_named_teacher(self, token: str | bool | None = None) -> None:
        """Load the teacher named by the config (`teacher_name_or_path` at `teacher_revision`) and attach it,
        after checking its weights against `teacher_weights_sha256` (when known)."""
        config = self.config
        if not config.teacher_name_or_path:
            raise ValueError("These weights hold no teacher and the config names none to reload: build the model "
                             "with its teacher (from_student_and_teacher).")
        try:
            teacher = load_teacher(config.teacher_name_or_path, config.teacher_revision or "main", token=token,
                                   dtype=config.teacher_dtype)
        except Exception as error:
            raise TeacherMismatchError(
                f"These weights hold no teacher: the checkpoint names {config.teacher_name_or_path} at revision "
                f"{config.teacher_revision}, which could not be reloaded ({type(error).__name__}: {error}). Make "
                "that teacher reachable (path, Hub access, token), or build the model with its teacher "
                "(from_student_and_teacher)."
            ) from error
        check_teacher_hash(config.teacher_name_or_path, config.teacher_revision, config.teacher_weights_sha256,
                           teacher.weights_sha256)
        logger.info("The weights hold no teacher (the checkpoint names it): reloaded %s at revision %s, hash checked.",
                    config.teacher_name_or_path, config.teacher_revision)
        self.attach_teacher(teacher.model)

    def momentum_update(self) -> None:
        """After each optimiser step: update EMA copies (none by default)."""

    def enqueue(self, keys) -> None:
        """After each optimiser step: store the step's gathered `contrastive_keys` (nothing by default)."""


def check_teacher_hash(name: str, revision: str | None, expected: str | None, found: str | None) -> None:
    """Raise `TeacherMismatchError` when `found`, the weights hash of the teacher `name` at `revision` loaded now,
    is not `expected`, the one a checkpoint names (no check when either is unknown)."""
    if expected and found and expected != found:
        raise TeacherMismatchError(
            f"The teacher {name} at revision {revision} now has other weights "
            f"than this checkpoint was trained with (sha256 {found}, expected {expected}): the name was moved to new "
            "weights, or a local folder was changed. Pin the original weights with --teacher_model_revision <commit "
            "sha> (or restore the folder) to resume; the checkpoint names the teacher instead of storing it."
        )


def build_network(config, classifier: bool) -> PreTrainedModel:
    """A student or teacher rebuilt from its own config (random weights; checkpoints load over them)."""
    auto = AutoModelForImageClassification if classifier else AutoModel
    return instantiate(auto.from_config, config)  # a preset's constructor classes come back here
