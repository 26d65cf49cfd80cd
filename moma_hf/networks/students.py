"""Build the student image classifier for the target labels, in a format that `from_pretrained` loads as is.

A student is one of:
- a Hub id or local path of a pretrained image classifier (transformers, or timm through TimmWrapper): its
  head is replaced by one for the target labels;
- a timm architecture name (`resnet18`, `efficientnet_b0`) built from scratch, with no download;
- `same-as-teacher`: the teacher's architecture and backbone weights with a new head (the paper's setting).
"""

from __future__ import annotations

import difflib

import timm
import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    PreTrainedModel,
    TimmWrapperConfig,
    TimmWrapperImageProcessor,
)

from .backbones import backbone_tensors
from .model_names import ModelLoadError, check_hub_model
from .teacher_presets import instantiate
from .teachers import Teacher

SAME_AS_TEACHER = "same-as-teacher"
# pretrained_cfg keys that describe preprocessing; the others would claim ImageNet weights the student lacks.
_PREPROCESSING_KEYS = ("interpolation", "crop_mode", "mean", "std", "first_conv", "classifier")


def build_student(
    name_or_path: str,
    id2label: dict[int, str],
    *,
    teacher: Teacher | None = None,
    image_size: int | None = None,
    revision: str = "main",
    token: str | bool | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, object]:
    """Build the student and its image processor.

    Args:
        name_or_path: Hub id / path, timm architecture name, or "same-as-teacher".
        id2label: the target dataset's labels; the classifier head always gets these.
        teacher: needed for "same-as-teacher".
        image_size: training resolution, written into a timm student's preprocessing config.

    Returns:
        `(model, image_processor)`.
    """
    labels = dict(id2label=dict(id2label), label2id={v: k for k, v in id2label.items()}, num_labels=len(id2label))
    if name_or_path == SAME_AS_TEACHER:
        if teacher is None:
            raise ValueError("student 'same-as-teacher' needs a teacher: set --teacher_model_name_or_path.")
        return _without_remote_code_refs(_same_as_teacher(teacher, labels)), teacher.processor
    if "/" not in name_or_path and timm.is_model(name_or_path):
        return _timm_from_scratch(name_or_path, labels, image_size)
    hub = dict(revision=revision, token=token, trust_remote_code=trust_remote_code)
    repo = name_or_path.removeprefix("hf-hub:")
    _check_student_name(repo, revision, token)
    model = AutoModelForImageClassification.from_pretrained(
        repo, ignore_mismatched_sizes=True, dtype=torch.float32, **labels, **hub
    )
    return _without_remote_code_refs(model), AutoImageProcessor.from_pretrained(repo, **hub)


def save_student(student: PreTrainedModel, output_dir: str) -> None:
    """Save the student with `save_pretrained`; a timm student (TimmWrapper) in timm's own layout.

    Besides transformers, timm's loader (`timm.create_model("hf-hub:...")` / `"local-dir:..."`) must read a timm
    student, so its `config.json` gets `model_args: {}` (timm calls `model_args.get`, which a null fails) and its
    weights are saved without the wrapper's `timm_model.` prefix (transformers adds the prefix back on load, but
    only strips it on save for a model that `from_pretrained` built, not for one built from a config).
    """
    if getattr(student.config, "model_type", None) != "timm_wrapper":
        student.save_pretrained(output_dir)
        return
    if student.config.model_args is None:
        student.config.model_args = {}
    state_dict = {key.removeprefix("timm_model."): value for key, value in student.state_dict().items()}
    student.save_pretrained(output_dir, state_dict=state_dict)


def _without_remote_code_refs(model: PreTrainedModel) -> PreTrainedModel:
    """Drop `auto_map` from the config of a student built from transformers' own classes.

    A source config's `auto_map` points at modelling code in the source repo; the exported student does not ship
    that code, so its config must not refer to it (it loads through its `model_type` instead). A student whose
    class is remote code (`trust_remote_code`) keeps it: transformers saves that code beside the weights.
    """
    if type(model).__module__.startswith("transformers.") and getattr(model.config, "auto_map", None) is not None:
        del model.config.auto_map
    return model


def _check_student_name(repo: str, revision: str, token: str | bool | None) -> None:
    """Fail at once for a name that is no model anywhere; for a bare name, suggest the nearest timm architectures."""
    try:
        check_hub_model(repo, revision, token, "Student", "the student's revision")
    except ModelLoadError as error:
        if "/" in repo:
            raise
        nearest = difflib.get_close_matches(repo, timm.list_models(), n=5, cutoff=0.6)
        raise ModelLoadError(
            f"Student {repo!r} is neither a timm architecture (nearest names: {', '.join(nearest) or 'none'}; "
            f"see timm.list_models()) nor a loadable model: {error}"
        ) from error


def _timm_from_scratch(architecture: str, labels: dict, image_size: int | None):
    default_cfg = timm.models.get_pretrained_cfg(architecture)
    cfg = {k: v for k, v in (default_cfg.to_dict() if default_cfg else {}).items() if k in _PREPROCESSING_KEYS}
    size = image_size or (default_cfg.input_size[-1] if default_cfg else 224)
    cfg.update(input_size=(3, size, size), crop_pct=1.0, num_classes=labels["num_labels"])
    cfg.setdefault("mean", timm.data.IMAGENET_DEFAULT_MEAN)
    cfg.setdefault("std", timm.data.IMAGENET_DEFAULT_STD)
    config = TimmWrapperConfig(architecture=architecture, pretrained_cfg=cfg, **labels)
    model = AutoModelForImageClassification.from_config(config)
    return model, TimmWrapperImageProcessor(pretrained_cfg=cfg, architecture=architecture)


@torch.no_grad()
def _same_as_teacher(teacher: Teacher, labels: dict) -> PreTrainedModel:
    """The teacher's architecture with a fresh head for the target labels, backbone copied from the teacher."""
    # A timm config keeps its classes as `label_names` (and `num_classes`), which from_dict prefers to an `id2label`
    # in the dict: drop them, and pass the student's labels as keyword arguments, which win over both.
    settings = {k: v for k, v in teacher.model.config.to_dict().items() if k not in ("label_names", "num_classes")}
    config = teacher.model.config.__class__.from_dict(settings, **labels)
    student = instantiate(AutoModelForImageClassification.from_config, config)  # a preset's classes too
    source, target = backbone_tensors(teacher.model), backbone_tensors(student)
    if [s.shape for s in source] != [t.shape for t in target]:
        raise ValueError(
            f"Cannot initialise a '{SAME_AS_TEACHER}' student from {teacher.name_or_path}: its backbone does not "
            "match the classifier built from its config. Pass the student explicitly."
        )
    for s, t in zip(source, target):
        t.copy_(s)
    for s, t in zip(backbone_tensors(teacher.model, buffers=True), backbone_tensors(student, buffers=True)):
        t.copy_(s)
    return student.float()
