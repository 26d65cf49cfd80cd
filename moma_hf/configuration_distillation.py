"""Configurations of the distillation models.

- `Method` and `TeacherUpdate`: the modes, as str enums (JSON-serialisable, equal to their plain strings).
- `DistillationSettings`: every distillation hyper-parameter, declared once with its default, help and the checks
  that need nothing else. `DistillationTrainingArguments` inherits it (so each is one flag) and the configs below
  validate their values through it.
- `DistillationConfig`: the base of the model configs (settings plus the student's and teacher's own configs)
  and the reader of checkpoints written before the two classes below existed (model type "moma", any method).
- `MoMAConfig` ("moma-distillation", moma and moma-noattn) and `BaselineDistillationConfig`
  ("baseline-distillation", the baselines): one config class, and model type, per model class.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

import torch
from transformers import CONFIG_MAPPING, MODEL_MAPPING, AutoConfig, PretrainedConfig


class _StrEnum(str, Enum):
    """A str enum that prints, formats and serialises as its value (the `enum.StrEnum` of Python 3.11)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Method(_StrEnum):
    """The distillation methods: MoMA, its no-attention ablation, and the baselines it is compared with."""

    MOMA = "moma"
    MOMA_NOATTN = "moma-noattn"
    CE = "ce"  # the student on its labels alone: no teacher
    KD = "kd"  # Hinton et al. 2015
    DKD = "dkd"  # Zhao et al. 2022
    FITNET = "fitnet"  # Romero et al. 2015, on pooled features
    RKD = "rkd"  # Park et al. 2019
    CRD = "crd"  # Tian et al. 2020

    @property
    def is_moma(self) -> bool:
        """MoMA or its ablation, which `MoMAForDistillation` runs."""
        return self in (Method.MOMA, Method.MOMA_NOATTN)

    @property
    def uses_teacher(self) -> bool:
        """Every method but `ce` distils a teacher."""
        return self is not Method.CE

    @property
    def has_logit_term(self) -> bool:
        """Whether logit KD is part of the method (KD for MoMA and kd, DKD for dkd, weighted by `w_kd`), so that
        `w_kd` defaults to 1 where the labels allow and a model card says why the term is off."""
        return self.is_moma or self in (Method.KD, Method.DKD)


class TeacherUpdate(_StrEnum):
    """How the teacher side of MoMA changes: an EMA of the student ("momentum"), never ("frozen"), or "auto"
    (momentum when student and teacher backbones have identical shapes, else frozen)."""

    AUTO = "auto"
    MOMENTUM = "momentum"
    FROZEN = "frozen"


class FrozenKeyHead(_StrEnum):
    """`g_T` of a frozen teacher: a fixed PCA map fitted to the first batch ("pca"), or a projection head trained
    beside the student to match each key to its own sample's query ("learned", an ablation of issue 18)."""

    PCA = "pca"
    LEARNED = "learned"


METHODS = tuple(Method)
MOMA_METHODS = tuple(m for m in Method if m.is_moma)
BASELINE_METHODS = tuple(m for m in Method if not m.is_moma)
TEACHER_UPDATES = tuple(TeacherUpdate)
# Weights of the feature term of each feature baseline, as tuned in the CRD authors' benchmark (RepDistiller).
DEFAULT_FEATURE_WEIGHTS = {Method.FITNET: 100.0, Method.RKD: 1.0, Method.CRD: 0.8}


def parse_mode(enum_type: type[_StrEnum], name: str, value: Any) -> _StrEnum:
    """`value` as a member of `enum_type`; a ValueError naming the setting, its flag and the choices otherwise."""
    try:
        return enum_type(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} (--{name}) is not one of {', '.join(enum_type)}.") from None


TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_teacher_dtype(value: str) -> str:
    """The canonical name (`float32`, `bfloat16`, `float16`) of a teacher precision flag, aliases included."""
    name = _DTYPE_ALIASES.get(str(value).lower(), str(value).lower())
    if name not in TEACHER_DTYPES:
        raise ValueError(f"teacher_dtype={value!r} (--teacher_dtype) is not one of float32, bfloat16, float16 "
                         "(or fp32, bf16, fp16).")
    return name


@dataclass
class DistillationSettings:
    """The distillation hyper-parameters, under the config's names, each declared and validated here only.

    `method` and `teacher_update` take plain strings (flags, YAML, config.json) and hold a `Method` and a
    `TeacherUpdate` once validated. `w_kd` and `w_feature` stay None until a config resolves them, since their
    defaults depend on the teacher's labels and on the method.
    """

    method: str = field(
        default=Method.MOMA, metadata={"help": f"Distillation method, one of {', '.join(Method)}: MoMA, its "
                                       "no-attention ablation, or a baseline (ce = no teacher)."}
    )
    teacher_update: str = field(
        default=TeacherUpdate.AUTO, metadata={"help": f"One of {', '.join(TeacherUpdate)}: the key pathway is an EMA "
                                              "of the student, never changes, or momentum when they are twins."}
    )
    frozen_key_head: str = field(
        default=FrozenKeyHead.PCA, metadata={"help": "Frozen teachers only: g_T is a fixed PCA map of the teacher's "
                                             "features (pca) or a head trained to match keys to queries (learned)."}
    )
    projection_dim: int = field(default=512, metadata={"help": "D, the contrastive embedding size."})
    num_attention_heads: int = field(
        default=4, metadata={"aliases": ["--attention_heads"], "help": "Heads of the batch-axis attention A_q/A_k; "
                             "must divide projection_dim."}
    )
    queue_size: int = field(default=16384, metadata={"help": "K, the number of queued negative keys."})
    contrastive_temperature: float = field(
        default=0.15, metadata={"help": "T of the InfoNCE term (transformers reserves `temperature` for generation)."}
    )
    momentum: float = field(default=0.999, metadata={"help": "m of the key-pathway EMA key <- m key + (1 - m) query."})
    attention_residual: bool = field(
        default=True, metadata={"help": "Batch attention outputs normalize(x + attention(x)); False gives the "
                                "reference code's normalize(attention(x)), whose keys collapse at init."}
    )
    w_ce: float = field(default=1.0, metadata={"help": "Weight of the cross-entropy term."})
    w_kd: float | None = field(
        default=None, metadata={"help": "Weight of logit KD (DKD for dkd); default 1 when the teacher has the "
                                "student's labels (moma, kd, dkd), else 0."}
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

    teacher_dtype: str = field(
        default="float32", metadata={"help": "Precision of a frozen teacher's weights and forward: float32, bfloat16 "
                                     "or float16 (also fp32/bf16/fp16). Keys, queue and cached features stay float32."}
    )

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)  # e.g. TrainingArguments' in DistillationTrainingArguments
        if parent is not None:
            parent()
        self.method = parse_mode(Method, "method", self.method)
        self.teacher_update = parse_mode(TeacherUpdate, "teacher_update", self.teacher_update)
        self.frozen_key_head = parse_mode(FrozenKeyHead, "frozen_key_head", self.frozen_key_head)
        self.teacher_dtype = parse_teacher_dtype(self.teacher_dtype)
        heads = self.num_attention_heads
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"num_attention_heads={heads} (--attention_heads) must be a positive integer that "
                             "divides projection_dim: the paper uses 4 heads.")
        if self.projection_dim <= 0 or self.projection_dim % heads:
            raise ValueError(f"projection_dim={self.projection_dim} must be a positive multiple of "
                             f"num_attention_heads={heads}: pick e.g. projection_dim=512, heads=4.")
        if self.queue_size < 1:
            raise ValueError(f"queue_size={self.queue_size} must be positive: the paper queues 16384 keys.")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum={self.momentum} must lie in [0, 1); the paper uses 0.999.")
        for name in ("contrastive_temperature", "kd_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive.")
        for name in ("w_ce", "w_kd", "w_moma", "w_feature"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0: loss weights cannot be negative.")

    def settings_dict(self) -> dict[str, Any]:
        """`{name: value}` of the distillation settings alone (not the fields of a subclass such as the training
        arguments), as the configs take them."""
        return {f.name: getattr(self, f.name) for f in fields(DistillationSettings)}


SETTING_NAMES = tuple(f.name for f in fields(DistillationSettings))


class DistillationConfig(PretrainedConfig):
    """The base of the distillation model configs: the `DistillationSettings` and the recipes of the two networks.

    Build a `MoMAConfig` or a `BaselineDistillationConfig` (or let `config_class_for_method` pick); this base
    class takes any method and reads any distillation config.json, including those written before the two
    classes existed (model type "moma", which every method then carried, sometimes with a `use_attention` that
    duplicated the method): `DistillationConfig.from_pretrained`/`from_dict`, and so `AutoConfig`, give the
    class of the checkpoint's method. The student and teacher are stored as their own config dicts, so a saved
    model rebuilds both networks without any download.

    Args:
        student_config: `config.to_dict()` of the student image classifier (transformers or TimmWrapper).
        teacher_config: `config.to_dict()` of the teacher (a base model or an image classifier).
        teacher_name_or_path: where the teacher came from (Hub id or path), recorded for model cards.
        teacher_revision: the pinned teacher revision, recorded for model cards.
        teacher_weights_sha256: the hash of the teacher's weights (`networks.teachers.weights_sha256`); when set,
            a frozen teacher is named in checkpoints instead of stored, and reloaded by name and checked.
        teacher_id2label: the teacher's own label names, when it has a classifier head.
        global_batch_size: when known, checked against `queue_size` (the queue must hold one global batch).
        kwargs: the fields of `DistillationSettings` (defaults and checks come from there; `w_kd` None becomes
            1 when the method has a logit term and the teacher's labels equal the student's, else 0; `w_feature`
            None becomes `DEFAULT_FEATURE_WEIGHTS`), then those of `PretrainedConfig`.
    """

    model_type = "moma"
    methods: tuple[Method, ...] = METHODS  # the methods this config class configures

    def __init__(
        self,
        student_config: dict | None = None,
        teacher_config: dict | None = None,
        teacher_name_or_path: str | None = None,
        teacher_revision: str | None = None,
        teacher_weights_sha256: str | None = None,
        teacher_id2label: dict | None = None,
        global_batch_size: int | None = None,
        **kwargs: Any,
    ):
        kwargs.pop("model_type", None)  # an old checkpoint's "moma" must not shadow the class's own type
        settings = {name: kwargs.pop(name) for name in SETTING_NAMES if name in kwargs}
        settings["method"] = method_of({**settings, "use_attention": kwargs.pop("use_attention", True)},
                                       default=self.methods[0])
        for name, value in DistillationSettings(**settings).settings_dict().items():
            setattr(self, name, value)
        refuse_other_method(type(self).__name__, self.methods, self.method)
        self.student_config = _as_dict(student_config)
        self.teacher_config = _as_dict(teacher_config)
        self.teacher_name_or_path = teacher_name_or_path
        self.teacher_revision = teacher_revision
        self.teacher_weights_sha256 = teacher_weights_sha256
        self.teacher_id2label = {int(k): v for k, v in teacher_id2label.items()} if teacher_id2label else None
        self.global_batch_size = global_batch_size
        if self.w_feature is None:
            self.w_feature = DEFAULT_FEATURE_WEIGHTS.get(self.method, 0.0)
        super().__init__(**kwargs)
        if self.student_config is not None and "id2label" not in kwargs:
            self.id2label = dict(self.build_student_config().id2label)
            self.label2id = {v: k for k, v in self.id2label.items()}
        if self.w_kd is None:
            # MoMA adds KD exactly when it can (same labels); KD and DKD are nothing without it (so a teacher of
            # other labels is refused below); the other baselines are compared pure, as in their papers.
            logit_kd = self.same_label_space if self.method.is_moma else self.method.has_logit_term
            self.w_kd = 1.0 if logit_kd else 0.0
        self.check_context()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs) -> "DistillationConfig":
        """transformers' `from_dict`; called on this base class, it builds the class of the dict's method."""
        if cls is DistillationConfig:
            cls = config_class_for_method(method_of(config_dict))
        return super(DistillationConfig, cls).from_dict(config_dict, **kwargs)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
        """transformers' `get_config_dict`; a config.json of before the split (model type "moma") gets the model
        type of its method, so that loading it through its method's own class is no type mismatch."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == DistillationConfig.model_type:
            config_dict = {**config_dict, "model_type": config_class_for_method(method_of(config_dict)).model_type}
        return config_dict, kwargs

    @property
    def use_attention(self) -> bool:
        """Whether MoMA's batch attention is on: False for the `moma-noattn` ablation (derived from `method`)."""
        return self.method is not Method.MOMA_NOATTN

    @property
    def same_label_space(self) -> bool:
        """True when the teacher has a head for exactly the student's labels, in the same order."""
        if not self.teacher_id2label:
            return False
        return _names(self.teacher_id2label) == _names(self.id2label)

    def check_context(self) -> None:
        """The rules that need more than the settings (`DistillationSettings` checks the rest): the queue holds
        a global batch, and logit KD needs the student's label space."""
        if self.global_batch_size is not None and self.queue_size < self.global_batch_size:
            raise ValueError(
                f"queue_size={self.queue_size} is smaller than the global batch ({self.global_batch_size} = "
                "per-device batch x processes x accumulation): raise queue_size or lower the batch."
            )
        if self.teacher_dtype != "float32" and self.teacher_update is TeacherUpdate.MOMENTUM:
            raise ValueError(
                f"teacher_dtype={self.teacher_dtype} is for frozen teachers: a momentum teacher is an EMA of the "
                "student, which needs float32 weights. Use --teacher_update frozen or --teacher_dtype float32."
            )
        if self.w_kd > 0 and not self.same_label_space:
            raise ValueError(
                f"w_kd={self.w_kd} needs a teacher whose labels equal the student's, but the teacher has "
                f"{_names(self.teacher_id2label) or 'no classifier head'} and the student "
                f"{_names(self.id2label)}. Set w_kd=0 (MoMA's feature term still transfers knowledge), or pick a "
                "feature method (moma, fitnet, rkd, crd) instead of kd/dkd."
            )

    def switched_off_terms(self) -> dict[str, str]:
        """`{loss term: why it is off}` for each term of this method's loss that contributes nothing.

        The terms are those of `method` (`moma`: ce, kd, moma; `kd`/`dkd`: ce and the logit term; `fitnet`,
        `rkd`, `crd`: ce and the feature term; `ce`: ce); a term is off when its weight is 0, and logit KD also
        when the teacher's label space is not the student's (the usual reason it goes off unasked).
        """
        off = {"loss_ce": "w_ce=0"} if self.w_ce == 0 else {}
        if self.method.has_logit_term:
            if not self.same_label_space:
                off["loss_kd"] = self._label_space_mismatch()
            elif self.w_kd == 0:
                off["loss_kd"] = "w_kd=0"
        if self.method.is_moma and self.w_moma == 0:
            off["loss_moma"] = "w_moma=0"
        if self.method in DEFAULT_FEATURE_WEIGHTS and self.w_feature == 0:
            off[f"loss_{self.method}"] = "w_feature=0"
        return off

    def _label_space_mismatch(self) -> str:
        teacher, student = _names(self.teacher_id2label), _names(self.id2label)
        if not teacher:
            name = f" {self.teacher_name_or_path}" if self.teacher_name_or_path else ""
            return f"the teacher{name} has no classifier head, so it gives no logits"
        why = f"the teacher's labels {_short(teacher)} differ from the student's {_short(student)}"
        if student == [str(i) for i in range(len(student))] and len(student) == len(teacher):
            why += (" (the label column holds plain integers, so its classes are named '0', '1', ...; if class i "
                    "is the teacher's class i, give the data those names: class folders, or a ClassLabel column)")
        return why

    def build_student_config(self) -> PretrainedConfig:
        """The student's own config object, rebuilt from `student_config`."""
        return _config_from_dict(self.student_config)

    def build_teacher_config(self) -> PretrainedConfig:
        """The teacher's own config object, rebuilt from `teacher_config`."""
        return _config_from_dict(self.teacher_config)


class MoMAConfig(DistillationConfig):
    """The config of `MoMAForDistillation`: methods `moma` and `moma-noattn` (see `DistillationConfig`)."""

    model_type = "moma-distillation"
    methods = MOMA_METHODS

    def __init__(self, **kwargs: Any):  # transformers would give a subclass without its own __init__ a generated one
        super().__init__(**kwargs)


class BaselineDistillationConfig(DistillationConfig):
    """The config of `BaselineForDistillation`: the baselines `ce` (the default), `kd`, `dkd`, `fitnet`, `rkd`
    and `crd` (see `DistillationConfig`)."""

    model_type = "baseline-distillation"
    methods = BASELINE_METHODS

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)


def config_class_for_method(method: str) -> type[DistillationConfig]:
    """The config class of `method`: `MoMAConfig` or `BaselineDistillationConfig`."""
    method = parse_mode(Method, "method", method)
    return MoMAConfig if method.is_moma else BaselineDistillationConfig


def refuse_other_method(owner: str, methods: tuple[Method, ...], method: Method) -> None:
    """Raise a ValueError when `owner` (a config or model class name) is not for `method`, naming the classes that
    are: the config class and the model class registered for it with `AutoModel` (by `moma_hf.modeling_auto`)."""
    if method in methods:
        return
    right_config = config_class_for_method(method)
    right_model = MODEL_MAPPING[right_config].__name__ if right_config in MODEL_MAPPING else "its model class"
    raise ValueError(f"{owner} is for {', '.join(methods)}, not method '{method}': use {right_model} (config "
                     f"{right_config.__name__}); build_distillation_model and AutoModel pick the class from the "
                     "method.")


def method_of(values: dict[str, Any], default: str = Method.MOMA) -> str:
    """The method a dict of config values stands for; before the redesign, `use_attention: false` with method
    "moma" meant "moma-noattn"."""
    method = values.get("method", default)
    return Method.MOMA_NOATTN if method == Method.MOMA and values.get("use_attention") is False else method


def _as_dict(config: PretrainedConfig | dict | None) -> dict | None:
    return config.to_dict() if isinstance(config, PretrainedConfig) else config


def _names(id2label: dict | None) -> list[str]:
    return [id2label[k] for k in sorted(id2label, key=int)] if id2label else []


def _short(names: list[str], limit: int = 12) -> str:
    more = f", ... {len(names)} in all" if len(names) > limit else ""
    return "[" + ", ".join(map(repr, names[:limit])) + more + "]"


def _config_from_dict(config_dict: dict) -> PretrainedConfig:
    return CONFIG_MAPPING[config_dict["model_type"]].from_dict(dict(config_dict))


AutoConfig.register(DistillationConfig.model_type, DistillationConfig)  # reads the checkpoints of before the split
AutoConfig.register(MoMAConfig.model_type, MoMAConfig)
AutoConfig.register(BaselineDistillationConfig.model_type, BaselineDistillationConfig)
