"""`DistillationTrainingArguments`: `TrainingArguments` plus the teacher, the student and the distillation settings."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .configuration_distillation import DistillationSettings
from .data.feature_cache import STORAGE_DTYPES
from .training.run_folder import OutputDirArguments
from .training.token_safety import TokenSafeArgumentsMixin


@dataclass(repr=False)  # keep the redacting repr of TokenSafeArgumentsMixin
class DistillationTrainingArguments(
    TokenSafeArgumentsMixin, DistillationSettings, TrainingArguments, OutputDirArguments
):
    """`TrainingArguments` plus the teacher, the student and the distillation settings (DESIGN.md section 1).

    The distillation hyper-parameters (`--method`, `--num_attention_heads`, also spelt `--attention_heads`,
    `--queue_size`, ...) are the fields of `DistillationSettings`, declared and validated there once;
    `distillation_config_kwargs()` hands them to the model's config.

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
    cache_teacher_features: bool = field(
        default=False, metadata={"help": "Frozen teachers: compute the teacher's outputs for --cache_views views of "
                                 "every training image once, then distil with no teacher forward."}
    )
    cache_views: int = field(default=4, metadata={"help": "Augmented views per image in the teacher-feature cache; "
                                                  "epoch e trains on view e % cache_views."})
    cache_dtype: str = field(
        default="float32", metadata={"help": "Storage of the teacher-feature cache: float32, float16 or bfloat16 "
                                     "(half the disk; lookups give float32 either way)."}
    )
    cache_shard_size: int = field(
        default=4096, metadata={"help": "Examples per shard of the teacher-feature cache: the unit that processes "
                                "share and that an interrupted caching pass keeps."}
    )
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
        super().__post_init__()  # TrainingArguments', then DistillationSettings' checks
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
        if self.cache_shard_size < 1:
            raise ValueError(f"--cache_shard_size {self.cache_shard_size} must be at least 1.")
        if self.cache_dtype not in STORAGE_DTYPES:
            raise ValueError(f"--cache_dtype must be one of {', '.join(STORAGE_DTYPES)}, not {self.cache_dtype!r}.")
        if self.remove_unused_columns:
            raise ValueError("--remove_unused_columns must be False: the collator reads the raw image column.")
        if isinstance(self.teacher_model_init_kwargs, str):
            self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)

    @property
    def global_batch_size(self) -> int:
        """Keys enqueued per optimiser step: per-device batch x processes x accumulation steps."""
        return self.per_device_train_batch_size * self.world_size * self.gradient_accumulation_steps

    def distillation_config_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the model's config (`config_class_for_method(args.method)`): the settings,
        the global batch (checked against the queue) and the teacher's origin (for the model card)."""
        return dict(
            self.settings_dict(),
            global_batch_size=self.global_batch_size,
            teacher_name_or_path=self.teacher_model_name_or_path,
            teacher_revision=self.teacher_model_revision,
        )
