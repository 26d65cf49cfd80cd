"""moma-hf: MoMA knowledge distillation (momentum contrastive learning with multi-head attention) for
histopathology models, on transformers, datasets and accelerate."""

from .configuration_distillation import (
    BaselineDistillationConfig,
    DistillationConfig,
    DistillationSettings,
    Method,
    MoMAConfig,
    TeacherUpdate,
    config_class_for_method,
)
from .data.arguments import DataArguments, build_collators, load_datasets
from .data.transforms import normalization_from_processor
from .evaluation.linear_probe import ProbeSettings, run_linear_probe
from .modeling_auto import build_distillation_model, distillation_model_class
from .modeling_baselines import BaselineForDistillation, DistillationOutput
from .modeling_distillation import DistillationPreTrainedModel
from .modeling_moma import MoMAForDistillation, MoMAOutput
from .networks.preset_registry import PRESETS
from .networks.students import build_student
from .networks.teacher_presets import EmbeddingRecipe, TeacherPreset, find_preset
from .networks.teachers import load_teacher
from .trainer_distillation import DistillationTrainer
from .training_args import DistillationTrainingArguments

__all__ = [
    "BaselineDistillationConfig",
    "BaselineForDistillation",
    "DataArguments",
    "DistillationConfig",
    "DistillationOutput",
    "DistillationPreTrainedModel",
    "DistillationSettings",
    "DistillationTrainer",
    "DistillationTrainingArguments",
    "EmbeddingRecipe",
    "Method",
    "MoMAConfig",
    "MoMAForDistillation",
    "MoMAOutput",
    "PRESETS",
    "ProbeSettings",
    "TeacherPreset",
    "TeacherUpdate",
    "build_collators",
    "build_distillation_model",
    "build_student",
    "config_class_for_method",
    "distillation_model_class",
    "find_preset",
    "load_datasets",
    "load_teacher",
    "normalization_from_processor",
    "run_linear_probe",
]
__version__ = "0.1.0"
