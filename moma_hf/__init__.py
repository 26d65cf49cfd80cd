"""moma-hf: MoMA knowledge distillation (momentum contrastive learning with multi-head attention) for
histopathology models, on transformers, datasets and accelerate."""

from .configuration_moma import MoMAConfig
from .modeling_moma import MoMAForDistillation, MoMAOutput
from .trainer_moma import MoMATrainer, MoMATrainingArguments

__all__ = ["MoMAConfig", "MoMAForDistillation", "MoMAOutput", "MoMATrainer", "MoMATrainingArguments"]
__version__ = "0.1.0"
