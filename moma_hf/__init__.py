"""moma-hf: MoMA knowledge distillation (momentum contrastive learning with multi-head attention) for
histopathology models, on transformers, datasets and accelerate."""

from .configuration_distillation import DistillationConfig
from .data.arguments import DataArguments, build_collators, load_datasets
from .modeling_moma import MoMAForDistillation, MoMAOutput
from .modeling_baselines import BaselineForDistillation
from .trainer_distillation import DistillationTrainer
from .training_args import DistillationTrainingArguments

__all__ = [
    "BaselineForDistillation",
    "DataArguments",
    "DistillationConfig",
    "DistillationTrainer",
    "DistillationTrainingArguments",
    "MoMAForDistillation",
    "MoMAOutput",
    "build_collators",
    "load_datasets",
]
__version__ = "0.1.0"
