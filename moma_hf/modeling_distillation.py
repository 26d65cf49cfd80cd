"""What every distillation model of this package shares: a student, a frozen-or-momentum teacher, one module.

`MoMAForDistillation` and `BaselineForDistillation` both derive from `DistillationPreTrainedModel`, so the
trainer, checkpoints and export treat every `--method` the same way.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, AutoModelForImageClassification, PreTrainedModel

from .configuration_distillation import TEACHER_DTYPES, DistillationConfig, Method, parse_mode, refuse_other_method
from .modules.key_queue import KeyQueue
from .networks.backbones import pooled_features
from .networks.teacher_presets import instantiate


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
            self.teacher = teacher if teacher is not None else build_network(
                config.build_teacher_config(), config.teacher_id2label is not None
            )
            self.teacher.requires_grad_(False)
            self.teacher.to(dtype=TEACHER_DTYPES[config.teacher_dtype])

    def post_init(self) -> None:
        """transformers' post-init, then keep the key queues out of DDP's per-step buffer broadcast."""
        super().post_init()
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

    def momentum_update(self) -> None:
        """After each optimiser step: update EMA copies (none by default)."""

    def enqueue(self, keys) -> None:
        """After each optimiser step: store the step's gathered `contrastive_keys` (nothing by default)."""


def build_network(config, classifier: bool) -> PreTrainedModel:
    """A student or teacher rebuilt from its own config (random weights; checkpoints load over them)."""
    auto = AutoModelForImageClassification if classifier else AutoModel
    return instantiate(auto.from_config, config)  # a preset's constructor classes come back here
