"""`DistillationTrainingArguments`: `TrainingArguments` plus the teacher, the student and the distillation settings."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .configuration_distillation import METHODS, TEACHER_UPDATES
from .training.run_folder import OutputDirArguments
from .training.token_safety import TokenSafeArgumentsMixin


@dataclass(repr=False)  # keep the redacting repr of TokenSafeArgumentsMixin
class DistillationTrainingArguments(TokenSafeArgumentsMixin, TrainingArguments, OutputDirArguments):
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
            self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)

    @property
    def global_batch_size(self) -> int:
        """Keys enqueued per optimiser step: per-device batch x processes x accumulation steps."""
        return self.per_device_train_batch_size * self.world_size * self.gradient_accumulation_steps

    def moma_config_kwargs(self) -> dict[str, Any]:
        """The `DistillationConfig` fields these arguments set."""
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
