"""Configuration of a MoMA distillation model (student, key pathway, heads, queue, loss weights)."""

from __future__ import annotations

from typing import Any

from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

TEACHER_UPDATES = ("auto", "momentum", "frozen")
MOMA_METHODS = ("moma", "moma-noattn")
BASELINE_METHODS = ("ce", "kd", "dkd", "fitnet", "rkd", "crd")
METHODS = MOMA_METHODS + BASELINE_METHODS
# Weights of the feature term of each feature baseline, as tuned in the CRD authors' benchmark (RepDistiller).
DEFAULT_FEATURE_WEIGHTS = {"fitnet": 100.0, "rkd": 1.0, "crd": 0.8}


class DistillationConfig(PretrainedConfig):
    """Hyper-parameters of MoMA and the recipes of its two networks.

    The student and teacher are stored as their own config dicts (`student_config`, `teacher_config`), so a
    saved `MoMAForDistillation` checkpoint rebuilds both networks without any download.

    Args:
        student_config: `config.to_dict()` of the student image classifier (transformers or TimmWrapper).
        teacher_config: `config.to_dict()` of the teacher (a base model or an image classifier).
        teacher_name_or_path: where the teacher came from (Hub id or path), recorded for model cards.
        teacher_revision: the pinned teacher revision, recorded for model cards.
        projection_dim: D, the size of the contrastive embedding.
        num_attention_heads: heads of the batch-axis attention `A_q` / `A_k`; must divide D.
        queue_size: K, the number of past keys used as negatives.
        contrastive_temperature: T of the InfoNCE term (not `temperature`, which transformers reserves for
            generation).
        momentum: m of the EMA `key <- m * key + (1 - m) * query`.
        teacher_update: "momentum", "frozen" or "auto" (momentum when the backbones have identical shapes).
        use_attention: False gives the `moma-noattn` ablation (heads only, no batch attention).
        attention_residual: the batch attention outputs `normalize(x + attention(x))` instead of
            `normalize(attention(x))`; without it all keys collapse to one direction at initialisation (see
            `BatchAttention`). False reproduces the reference code's default attention.
        w_ce, w_moma: weights of the cross-entropy and contrastive terms.
        w_kd: weight of the logit-KD term; None means 1 when the teacher's labels equal the student's, else 0.
        kd_temperature: T_kd of the logit-KD term.
        teacher_id2label: the teacher's own label names, when it has a classifier head.
        global_batch_size: when known, checked against `queue_size` (the queue must hold one global batch).
        method: "moma" (also "moma-noattn", set by `use_attention`) or a baseline of `BASELINE_METHODS`, which
            `BaselineForDistillation` runs: "ce" (no teacher), "kd", "dkd" (the logit term replaces KD, weighted
            by `w_kd`), "fitnet", "rkd", "crd" (a feature term weighted by `w_feature`).
        w_feature: weight of a feature baseline's term; None takes `DEFAULT_FEATURE_WEIGHTS`.
        shuffle_bn: momentum teachers only. With several processes, the teacher's BatchNorm layers use the
            statistics of a batch shuffled across processes (MoCo's Shuffle-BN) instead of their running
            statistics; see `moma_hf.modules.distributed.shuffled_forward`.
    """

    model_type = "moma"
    sub_configs = {}

    def __init__(
        self,
        student_config: dict | None = None,
        teacher_config: dict | None = None,
        teacher_name_or_path: str | None = None,
        teacher_revision: str | None = None,
        projection_dim: int = 512,
        num_attention_heads: int = 4,
        queue_size: int = 16384,
        contrastive_temperature: float = 0.15,
        momentum: float = 0.999,
        teacher_update: str = "auto",
        use_attention: bool = True,
        attention_residual: bool = True,
        w_ce: float = 1.0,
        w_kd: float | None = None,
        w_moma: float = 1.0,
        kd_temperature: float = 4.0,
        teacher_id2label: dict | None = None,
        global_batch_size: int | None = None,
        shuffle_bn: bool = False,
        method: str = "moma",
        w_feature: float | None = None,
        **kwargs: Any,
    ):
        self.student_config = _as_dict(student_config)
        self.teacher_config = _as_dict(teacher_config)
        self.teacher_name_or_path = teacher_name_or_path
        self.teacher_revision = teacher_revision
        self.projection_dim = projection_dim
        self.num_attention_heads = num_attention_heads
        self.queue_size = queue_size
        self.contrastive_temperature = contrastive_temperature
        self.momentum = momentum
        self.teacher_update = teacher_update
        self.use_attention = use_attention
        self.attention_residual = attention_residual
        self.w_ce = w_ce
        self.w_moma = w_moma
        self.kd_temperature = kd_temperature
        self.teacher_id2label = {int(k): v for k, v in teacher_id2label.items()} if teacher_id2label else None
        self.global_batch_size = global_batch_size
        self.shuffle_bn = shuffle_bn
        self.method = "moma-noattn" if method == "moma" and not use_attention else method
        self.w_feature = DEFAULT_FEATURE_WEIGHTS.get(method, 0.0) if w_feature is None else w_feature
        super().__init__(**kwargs)
        if self.student_config is not None and "id2label" not in kwargs:
            self.id2label = dict(self.build_student_config().id2label)
            self.label2id = {v: k for k, v in self.id2label.items()}
        self.w_kd = self._default_w_kd() if w_kd is None else w_kd
        self.validate_moma()

    def _default_w_kd(self) -> float:
        # MoMA adds KD exactly when it can (same labels); KD and DKD are nothing without it; the other
        # baselines are compared pure, as in their papers.
        if self.method in MOMA_METHODS:
            return 1.0 if self.same_label_space else 0.0
        return 1.0 if self.method in ("kd", "dkd") else 0.0

    @property
    def same_label_space(self) -> bool:
        """True when the teacher has a head for exactly the student's labels, in the same order."""
        if not self.teacher_id2label:
            return False
        return _names(self.teacher_id2label) == _names(self.id2label)

    def validate_moma(self) -> None:
        """Reject settings that cannot work, with the reason and the fix."""
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {METHODS}.")
        if not isinstance(self.num_attention_heads, int) or self.num_attention_heads < 1:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} (--attention_heads) must be a positive "
                             "integer that divides projection_dim: the paper uses 4 heads.")
        if self.projection_dim <= 0 or self.projection_dim % self.num_attention_heads:
            raise ValueError(
                f"projection_dim={self.projection_dim} must be a positive multiple of "
                f"num_attention_heads={self.num_attention_heads}: pick e.g. projection_dim=512, heads=4."
            )
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum={self.momentum} must lie in [0, 1); the paper uses 0.999.")
        if self.contrastive_temperature <= 0 or self.kd_temperature <= 0:
            raise ValueError("contrastive_temperature and kd_temperature must be positive.")
        if self.teacher_update not in TEACHER_UPDATES:
            raise ValueError(f"teacher_update={self.teacher_update!r} must be one of {TEACHER_UPDATES}.")
        if self.global_batch_size is not None and self.queue_size < self.global_batch_size:
            raise ValueError(
                f"queue_size={self.queue_size} is smaller than the global batch ({self.global_batch_size} = "
                "per-device batch x processes x accumulation): raise queue_size or lower the batch."
            )
        if min(self.w_ce, self.w_kd, self.w_moma, self.w_feature) < 0:
            raise ValueError("Loss weights w_ce, w_kd, w_moma and w_feature must be >= 0.")
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
        if self.method in MOMA_METHODS or self.method in ("kd", "dkd"):
            if not self.same_label_space:
                off["loss_kd"] = self._label_space_mismatch()
            elif self.w_kd == 0:
                off["loss_kd"] = "w_kd=0"
        if self.method in MOMA_METHODS and self.w_moma == 0:
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


def _as_dict(config: PretrainedConfig | dict | None) -> dict | None:
    return config.to_dict() if isinstance(config, PretrainedConfig) else config


def _names(id2label: dict | None) -> list[str]:
    return [id2label[k] for k in sorted(id2label, key=int)] if id2label else []


def _short(names: list[str], limit: int = 12) -> str:
    more = f", ... {len(names)} in all" if len(names) > limit else ""
    return "[" + ", ".join(map(repr, names[:limit])) + more + "]"


def _config_from_dict(config_dict: dict) -> PretrainedConfig:
    return CONFIG_MAPPING[config_dict["model_type"]].from_dict(dict(config_dict))


AutoConfig.register("moma", DistillationConfig)
