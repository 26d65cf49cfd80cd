"""Model cards for distilled students, built from facts gathered during training. No network call.

The card's metadata (`library_name`, `base_model` with relation `distillation`, `datasets`, `tags`, `license`,
`model-index`) comes from the trainer's arguments, the MoMA config and the last evaluation; the body from the
template `model_cards/student_card.md.j2`.
"""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
import timm
import torch
import transformers
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .plots import plot_training_curves

TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "student_card.md.j2"
TAGS = ["histopathology", "knowledge-distillation", "moma", "image-classification"]
# The arguments a reader of a distillation card cares about, in the order shown.
CARD_HYPERPARAMETERS = (
    "method", "teacher_update", "projection_dim", "attention_heads", "queue_size", "contrastive_temperature",
    "momentum", "w_ce", "w_kd", "w_moma", "kd_temperature", "learning_rate", "optim", "weight_decay",
    "lr_scheduler_type", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
    "num_train_epochs", "seed", "bf16", "fp16",
)


@dataclass
class MoMAModelCardData:
    """Facts about the data and the run that the trainer cannot know; the example scripts fill them in.

    Attributes:
        dataset_id: Hub id of the training dataset, for the `datasets` metadata (None for local data).
        dataset_name: a human name for the data.
        license: licence of the distilled weights (mind the teacher's and the data's terms).
        image_size: training resolution.
        eval_split: name of the split the metrics come from.
        dataset_citation: attribution text for the data, when its licence asks for one.
        extra_tags: tags beyond the standard ones.
    """

    dataset_id: str | None = None
    dataset_name: str = "a histopathology patch dataset"
    license: str = "other"
    image_size: int | None = None
    eval_split: str = "validation"
    dataset_citation: str | None = None
    extra_tags: list[str] = field(default_factory=list)


def write_model_card(trainer, output_dir: str | Path, card_data: MoMAModelCardData | None = None) -> Path:
    """Render the student's card into `output_dir/README.md`, with a training-curve plot beside it."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    card_data = card_data or getattr(trainer, "model_card_data", None) or MoMAModelCardData()
    curves = plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
    facts = gather_facts(trainer, card_data)
    facts["training_curves"] = curves.name if curves else None
    facts["confusion_matrix"] = "confusion_matrix.png" if (output_dir / "confusion_matrix.png").exists() else None
    card = ModelCard.from_template(_metadata(facts, card_data), template_path=str(TEMPLATE), **facts)
    path = output_dir / "README.md"
    card.save(path)
    return path


def gather_facts(trainer, card_data: MoMAModelCardData) -> dict:
    """Everything the template shows, read from the trainer's arguments, model and history."""
    args, moma = trainer.args, trainer.moma_model
    config, student = moma.config, moma.student
    repo_id = args.hub_model_id or Path(args.output_dir).name
    teacher = config.teacher_name_or_path or "unknown teacher"
    return dict(
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        dataset_name=card_data.dataset_name,
        eval_split=card_data.eval_split,
        dataset_citation=card_data.dataset_citation,
        labels=[config.id2label[i] for i in sorted(config.id2label)],
        teacher=teacher,
        teacher_known=config.teacher_name_or_path is not None,
        teacher_url=teacher if Path(teacher).exists() else f"https://huggingface.co/{teacher.removeprefix('hf-hub:')}",
        teacher_revision=config.teacher_revision,
        teacher_update=moma.teacher_update,
        same_label_space=config.same_label_space,
        method=args.method,
        student_architecture=getattr(student.config, "architecture", None) or type(student).__name__,
        timm_architecture=getattr(student.config, "architecture", None),
        student_parameters=f"{sum(p.numel() for p in student.parameters()) / 1e6:.1f}M",
        image_size=card_data.image_size or "?",
        steps=trainer.state.global_step,
        global_batch_size=args.global_batch_size,
        metrics=last_eval_metrics(trainer.state.log_history),
        hyperparameters=hyperparameter_rows(args),
        versions=", ".join(
            f"{name} {version}" for name, version in (
                ("moma-hf", _package_version()), ("transformers", transformers.__version__),
                ("timm", timm.__version__), ("torch", torch.__version__),
                ("huggingface_hub", huggingface_hub.__version__), ("python", platform.python_version()),
            )
        ),
    )


def last_eval_metrics(log_history: list[dict]) -> dict[str, float]:
    """The metrics of the last evaluation in the Trainer's log, without the `eval_` prefix and timing entries."""
    for entry in reversed(log_history):
        metrics = {k.removeprefix("eval_"): v for k, v in entry.items() if k.startswith("eval_")}
        metrics = {k: v for k, v in metrics.items() if k not in ("runtime", "samples_per_second", "steps_per_second")}
        if metrics:
            return metrics
    return {}


def hyperparameter_rows(args) -> list[tuple[str, object, bool]]:
    """`(name, value, differs_from_default)` for the card's hyper-parameter table."""
    defaults = {f.name: f.default for f in dataclasses.fields(args) if f.default is not dataclasses.MISSING}
    rows = []
    for name in CARD_HYPERPARAMETERS:
        value = getattr(args, name, None)
        value = getattr(value, "value", value)  # enums such as optim and lr_scheduler_type
        default = getattr(defaults.get(name), "value", defaults.get(name))
        rows.append((name, value, value != default))
    return rows


def _metadata(facts: dict, card_data: MoMAModelCardData) -> ModelCardData:
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
    teacher = facts["teacher"].removeprefix("hf-hub:") if facts["teacher_known"] else None
    return ModelCardData(
        library_name="transformers",
        license=card_data.license,
        base_model=teacher,
        base_model_relation="distillation",
        datasets=[card_data.dataset_id] if card_data.dataset_id else None,
        tags=TAGS + [t for t in card_data.extra_tags if t not in TAGS],
        pipeline_tag="image-classification",
        model_name=facts["model_name"] if results else None,
        eval_results=results or None,
    )


def _package_version() -> str:
    from . import __version__

    return __version__
