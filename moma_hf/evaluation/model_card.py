"""Model cards for distilled students, built from facts gathered during training. No network call.

The card's metadata (`library_name`, `base_model` with relation `distillation`, `datasets`, `tags`, `license`,
`model-index`) comes from the trainer's arguments, the model's config and the last evaluation; the body from the
template `model_cards/student_card.md.j2`. A card states only what happened: `base_model` is the teacher's Hub
id (never a local path, and none for `ce`, which has no teacher), loss weights are the resolved numbers, and
the hyper-parameter table lists only what the method used.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
import timm
import torch
import transformers
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..networks.teacher_presets import PRESET_ATTRIBUTE, TeacherPreset, find_preset
from .plots import plot_training_curves

_PACKAGE = Path(__file__).resolve().parents[1]  # moma_hf/


def template_path(name: str = "student_card.md.j2") -> Path:
    """The card template `name`: inside the package when installed from a wheel (`moma_hf/model_cards/`), else
    in the repository's top-level `model_cards/` (an editable install, or the source tree on `sys.path`)."""
    for folder in (_PACKAGE / "model_cards", _PACKAGE.parent / "model_cards"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"Model card template {name!r} is in neither {_PACKAGE / 'model_cards'} nor "
        f"{_PACKAGE.parent / 'model_cards'}: the moma-hf install is incomplete. Reinstall it "
        "(`pip install --force-reinstall moma-hf`, or `pip install -e .` from a checkout)."
    )


TAGS = ["histopathology", "image-classification"]  # plus "knowledge-distillation" and "moma" where they apply
# The settings a reader of a card cares about, in the order shown: the distillation settings under the config's
# names (their values read from the model's config), then the Trainer's. A card shows only the distillation
# settings its method used.
CONFIG_HYPERPARAMETERS = (
    "method", "teacher_update", "projection_dim", "num_attention_heads", "queue_size", "contrastive_temperature",
    "momentum", "w_kd", "w_moma", "kd_temperature", "w_feature",
)
TRAINING_HYPERPARAMETERS = (
    "learning_rate", "optim", "weight_decay", "lr_scheduler_type", "per_device_train_batch_size",
    "gradient_accumulation_steps", "max_steps", "num_train_epochs", "seed", "bf16", "fp16",
)
_MOMA_ONLY = {"teacher_update", "projection_dim", "num_attention_heads", "queue_size", "contrastive_temperature",
              "momentum", "w_moma"}
# The method-specific rows each method shows (the others never took part in its training).
_METHOD_ROWS = {
    "moma": _MOMA_ONLY | {"w_kd", "kd_temperature"},
    "moma-noattn": (_MOMA_ONLY - {"num_attention_heads"}) | {"w_kd", "kd_temperature"},
    "kd": {"w_kd", "kd_temperature"}, "dkd": {"w_kd", "kd_temperature"},
    "fitnet": {"w_feature"}, "rkd": {"w_feature"},
    "crd": {"w_feature", "projection_dim", "queue_size", "contrastive_temperature"},
    "ce": set(),
}
_SPECIFIC_ROWS = set().union(*_METHOD_ROWS.values())
# The share of labeled examples per step, as the trainer logs it; runs saved before the US spelling used the other.
LABELED_FRACTION_KEYS = ("labeled_fraction", "labelled_fraction")


@dataclass
class DistillationModelCardData:
    """Facts about the data and the run that the trainer cannot know; the example scripts fill them in.

    Attributes:
        dataset_id: Hub id of the training dataset, for the `datasets` metadata (None for local data).
        dataset_name: a human name for the data.
        license: licence of the distilled weights (mind the teacher's and the data's terms).
        image_size: training resolution.
        eval_split: name of the split the metrics come from.
        dataset_citation: attribution text for the data, when its licence asks for one.
        extra_tags: tags beyond the standard ones.
        teacher_probe, student_initial_probe, student_probe: linear-probe scores
            (`moma_hf.evaluation.linear_probe`) of the teacher, and of the student before and after distillation,
            when the run measured them.
    """

    dataset_id: str | None = None
    dataset_name: str = "a histopathology patch dataset"
    license: str = "other"
    image_size: int | None = None
    eval_split: str = "validation"
    dataset_citation: str | None = None
    extra_tags: list[str] = field(default_factory=list)
    teacher_probe: dict | None = None
    student_initial_probe: dict | None = None
    student_probe: dict | None = None


def write_model_card(trainer, output_dir: str | Path, card_data: DistillationModelCardData | None = None) -> Path:
    """Render the student's card into `output_dir/README.md`, with a training-curve plot beside it.

    The facts come from what the run reports publicly: the trained model (`trainer.distillation_model`: its
    config and public properties), `trainer.args` and `trainer.state` (the log history and the step count).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    card_data = card_data or getattr(trainer, "model_card_data", None) or DistillationModelCardData()
    curves = plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
    facts = gather_facts(trainer.distillation_model, trainer.args, trainer.state, card_data)
    facts["training_curves"] = curves.name if curves else None
    facts["confusion_matrix"] = "confusion_matrix.png" if (output_dir / "confusion_matrix.png").exists() else None
    card = ModelCard.from_template(_metadata(facts, card_data), template_path=str(template_path()), **facts)
    path = output_dir / "README.md"
    card.save(path)
    return path


def gather_facts(model, args, state, card_data: DistillationModelCardData) -> dict:
    """Everything the template shows.

    Args:
        model: the trained `DistillationPreTrainedModel`; read through its config (method, teacher, settings) and
            its public `teacher_update` and `student_summary`.
        args: the run's `TrainingArguments` (output folder, Hub id, batch, optimiser settings).
        state: the Trainer's `TrainerState` (`global_step`, `log_history`).
        card_data: what only the caller knows (the data's name, licence, ...).
    """
    config, student = model.config, model.student_summary
    repo_id = args.hub_model_id or Path(args.output_dir).name
    timm_architecture = (config.student_config or {}).get("architecture")
    return dict(
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        dataset_name=card_data.dataset_name,
        eval_split=card_data.eval_split,
        dataset_citation=card_data.dataset_citation,
        labels=[config.id2label[i] for i in sorted(config.id2label)],
        **teacher_facts(config),
        teacher_revision=config.teacher_revision,
        teacher_preset=getattr(teacher_preset(config), "name", None),
        teacher_embedding=teacher_embedding(config),
        linear_probe=probe_line(card_data),
        teacher_update=model.teacher_update,
        same_label_space=config.same_label_space,
        w_kd=config.w_kd,
        method=config.method,
        student_architecture=student["architecture"],
        timm_architecture=timm_architecture,
        student_parameters=f"{student['num_parameters'] / 1e6:.1f}M",
        image_size=card_data.image_size or "?",
        steps=state.global_step,
        global_batch_size=args.global_batch_size,
        labeled_percent=labeled_percent(state.log_history),
        metrics=last_eval_metrics(state.log_history),
        hyperparameters=hyperparameter_rows(config, args, model.teacher_update),
        versions=", ".join(
            f"{name} {version}" for name, version in (
                ("moma-hf", _package_version()), ("transformers", transformers.__version__),
                ("timm", timm.__version__), ("torch", torch.__version__),
                ("huggingface_hub", huggingface_hub.__version__), ("python", platform.python_version()),
            )
        ),
    )


def hub_id(name_or_path: str | None) -> str | None:
    """`name_or_path` as a Hub repo id (without timm's `hf-hub:`), or None for a local folder or no name."""
    if not name_or_path:
        return None
    repo = name_or_path.removeprefix("hf-hub:")
    if os.path.exists(repo) or repo.startswith((".", "~", "/")):
        return None
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return None
    return repo


def teacher_facts(config) -> dict:
    """`distilled`, and the teacher as named in the card: `teacher` (a Hub id, or a local folder's name),
    `teacher_url` (None for a local folder) and `teacher_link` (markdown). A `ce` run names no teacher."""
    name = config.teacher_name_or_path if config.method.uses_teacher else None
    preset = teacher_preset(config)
    repo = preset.hub_id if preset else hub_id(name)
    shown = repo or (Path(name).name if name else None)
    link = f"[`{repo}`](https://huggingface.co/{repo})" if repo else f"`{shown}` (a local model)"
    return dict(distilled=name is not None, teacher=shown, teacher_url=f"https://huggingface.co/{repo}" if repo
                else None, teacher_link=link if name else None)


def teacher_preset(config) -> TeacherPreset | None:
    """The foundation-model preset the run's teacher was loaded by (named in its stored config), or None (no
    preset, or a `ce` run, which distils no teacher)."""
    if not config.method.uses_teacher:
        return None
    return find_preset((config.teacher_config or {}).get(PRESET_ATTRIBUTE))


def teacher_embedding(config) -> str | None:
    """How the teacher's feature was read, for the card: "cls+mean_patch, 2560-d, bfloat16"; None without a
    preset."""
    preset = teacher_preset(config)
    return f"{preset.embedding.value}, {preset.embedding_dim}-d, {config.teacher_dtype}" if preset else None


def probe_line(card_data) -> str | None:
    """"teacher 0.912; student before distillation 0.603; student 0.874" (linear-probe balanced accuracy), from
    what the run measured; None when it measured none."""
    measured = (("teacher", card_data.teacher_probe), ("student before distillation", card_data.student_initial_probe),
                ("student", card_data.student_probe))
    parts = [f"{who} {scores['balanced_accuracy']:.3f}" for who, scores in measured if scores]
    return "; ".join(parts) or None


def last_eval_metrics(log_history: list[dict]) -> dict[str, float]:
    """The metrics of the last evaluation in the Trainer's log, without the `eval_` prefix, timings and counts
    (the image counts are facts about the data, not scores for `model-index`)."""
    not_scores = ("runtime", "samples_per_second", "steps_per_second", "samples", "unreadable_images")
    for entry in reversed(log_history):
        metrics = {k.removeprefix("eval_"): v for k, v in entry.items() if k.startswith("eval_")}
        metrics = {k: v for k, v in metrics.items() if k not in not_scores}
        if metrics:
            return metrics
    return {}


def labeled_percent(log_history: list[dict]) -> float | None:
    """The mean share of labeled training examples over the logged steps, in percent; None when every example was
    labeled (or nothing was logged). Reads `labeled_fraction`, or `labelled_fraction` in older trainer states."""
    shares = [next(entry[k] for k in LABELED_FRACTION_KEYS if k in entry) for entry in log_history
              if any(k in entry for k in LABELED_FRACTION_KEYS)]
    share = sum(shares) / len(shares) if shares else 1.0
    return None if share >= 0.9995 else round(100 * share, 1)


def hyperparameter_rows(config, args, teacher_update: str | None = None) -> list[tuple[str, object, bool]]:
    """`(name, value, differs_from_default)` for the card's hyper-parameter table.

    The distillation settings are shown as the model's `config` holds them, and only the rows its method used; the
    training ones as `args` hold them. Values the model resolved (`w_kd` and `w_feature`, whose defaults are None,
    and `teacher_update`, whose default is "auto") are shown resolved, and bold only when the user set them in
    `args`.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(args) if f.default is not dataclasses.MISSING}
    used = _METHOD_ROWS.get(config.method, _SPECIFIC_ROWS)
    if not config.w_kd:
        used = used - {"kd_temperature"}  # no logit term, no temperature
    rows = []
    for name in (*CONFIG_HYPERPARAMETERS, *TRAINING_HYPERPARAMETERS):
        if name in _SPECIFIC_ROWS and name not in used:
            continue
        given = getattr(args, name, None)
        value = getattr(config, name) if name in CONFIG_HYPERPARAMETERS else given
        if name == "teacher_update" and teacher_update:
            value = teacher_update
        # enums (method, optim, lr_scheduler_type) as their plain values
        value, given, default = (getattr(v, "value", v) for v in (value, given, defaults.get(name)))
        rows.append((name, value, given != default))
    return rows


def _metadata(facts: dict, card_data: DistillationModelCardData) -> ModelCardData:
    metrics = facts["metrics"]
    results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=card_data.dataset_id or "imagefolder",
            dataset_name=card_data.dataset_name,
            dataset_split=card_data.eval_split,
            metric_type=name,
            metric_value=float(value),
        )
        for name, value in metrics.items()
        if name != "loss"
    ]
    # Only a Hub teacher is a base model; a local folder means nothing on the Hub, and `ce` had no teacher.
    teacher = facts["teacher"] if facts["distilled"] and facts["teacher_url"] else None
    tags = TAGS + ["knowledge-distillation"] * facts["distilled"] + ["moma"] * facts["method"].startswith("moma")
    return ModelCardData(
        library_name="transformers",
        license=card_data.license,
        base_model=teacher,
        base_model_relation="distillation" if teacher else None,
        datasets=[card_data.dataset_id] if card_data.dataset_id else None,
        tags=tags + [t for t in card_data.extra_tags if t not in tags],
        pipeline_tag="image-classification",
        model_name=facts["model_name"] if results else None,
        eval_results=results or None,
    )


def _package_version() -> str:
    from .. import __version__

    return __version__
