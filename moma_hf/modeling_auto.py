"""Which model class runs which method: the one place that pairs each config class with its model class.

Each pair is registered with `AutoModel`, so `AutoModel.from_pretrained(checkpoint)` rebuilds the class of the
checkpoint's method, checkpoints written before the split (model type "moma") included: `DistillationConfig`
reads those as the config class of their method.
"""

from __future__ import annotations

from transformers import AutoModel, PreTrainedModel

from .configuration_distillation import (
    BaselineDistillationConfig,
    DistillationConfig,
    Method,
    MoMAConfig,
    config_class_for_method,
)
from .modeling_baselines import BaselineForDistillation
from .modeling_distillation import DistillationPreTrainedModel
from .modeling_moma import MoMAForDistillation

MODEL_CLASSES: dict[type[DistillationConfig], type[DistillationPreTrainedModel]] = {
    MoMAConfig: MoMAForDistillation,
    BaselineDistillationConfig: BaselineForDistillation,
}
for _config_class, _model_class in MODEL_CLASSES.items():
    AutoModel.register(_config_class, _model_class, exist_ok=True)


def distillation_model_class(method: str | Method) -> type[DistillationPreTrainedModel]:
    """The model class that runs `method`: `MoMAForDistillation` or `BaselineForDistillation`."""
    return MODEL_CLASSES[config_class_for_method(method)]


def build_distillation_model(
    student: PreTrainedModel, teacher: PreTrainedModel | None, teacher_id2label: dict | None = None, **settings
) -> DistillationPreTrainedModel:
    """The distillation model of `settings["method"]` (default moma) around built networks.

    Args:
        student: the student image classifier.
        teacher: the teacher (a base model or a classifier); None for `ce`.
        teacher_id2label: the teacher's label names when it has a classifier head (logit KD needs them).
        settings: the config's keyword arguments, e.g. `DistillationTrainingArguments.distillation_config_kwargs()`.
    """
    model_class = distillation_model_class(settings.get("method", Method.MOMA))
    return model_class.from_student_and_teacher(student, teacher, teacher_id2label, **settings)
