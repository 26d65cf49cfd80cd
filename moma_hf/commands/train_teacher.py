"""`moma-train-teacher`: train a supervised teacher image classifier on any labeled patch dataset, ready for
distillation.

    moma-train-teacher --model_name_or_path timm/resnet50.a1_in1k --dataset_name 1aurent/NCT-CRC-HE \
        --output_dir nct-teacher --num_train_epochs 5
    python examples/train_teacher.py --config examples/configs/demo_teacher.yaml --overwrite_output_dir  # demo teacher

The model is a Hub id or local path (fine-tuned with a new head for the dataset's labels), a timm architecture
name built from scratch, or a transformers `--model_type` built from scratch with `--config_overrides`.
"""

import sys
from dataclasses import dataclass, field

from transformers import CONFIG_MAPPING, AutoModelForImageClassification, Trainer, TrainingArguments, set_seed
from transformers.models.auto.image_processing_auto import (
    IMAGE_PROCESSOR_MAPPING_NAMES,
    get_image_processor_class_from_name,
)

from moma_hf.commands.parsing import check_streaming_has_max_steps, parse_args
from moma_hf.data.arguments import DataArguments, build_collators, load_datasets
from moma_hf.data.transforms import normalization_from_processor
from moma_hf.evaluation.metrics import evaluate_and_save, make_compute_metrics
from moma_hf.hub import check_push_access, push_student
from moma_hf.networks.students import build_student
from moma_hf.training.bad_image_limit import BadImageLimitCallback
from moma_hf.training.evaluation_loader import EvalCollatorMixin
from moma_hf.training.run_folder import OutputDirArguments, prepare_output_dir
from moma_hf.training.token_safety import TokenSafeArgumentsMixin


@dataclass
class ModelArguments:
    """Which network to train."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Hub id, path or timm architecture."})
    model_type: str | None = field(default=None, metadata={"help": "transformers model type built from scratch."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "With --model_type: 'hidden_size=128,num_hidden_layers=4,...'."}
    )


@dataclass(repr=False)  # keep the redacting repr of TokenSafeArgumentsMixin
class TeacherTrainingArguments(TokenSafeArgumentsMixin, TrainingArguments, OutputDirArguments):
    """`TrainingArguments` whose pickles (`training_args.bin`) hold no Hub token, pushing only the final model."""

    hub_strategy: str = field(default="end", metadata={"help": "'end' pushes the final teacher only (default)."})


def build_model(model_args: ModelArguments, labels: list[str], image_size: int):
    """`(model, image_processor)` for the target labels."""
    id2label = dict(enumerate(labels))
    if model_args.model_name_or_path:
        return build_student(model_args.model_name_or_path, id2label, image_size=image_size)
    if not model_args.model_type:
        raise ValueError("Give --model_name_or_path, or --model_type (with --config_overrides) to build from scratch.")
    config = CONFIG_MAPPING[model_args.model_type](
        id2label=id2label, label2id={v: k for k, v in id2label.items()}, image_size=image_size
    )
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
    model = AutoModelForImageClassification.from_config(config)
    return model, _default_processor(model_args.model_type, image_size)


def _default_processor(model_type: str, image_size: int):
    """The default image processor of a transformers model type, set to `image_size`."""
    names = IMAGE_PROCESSOR_MAPPING_NAMES[model_type]
    name = names.get("torchvision") or names.get("pil") if isinstance(names, dict) else names
    return get_image_processor_class_from_name(name)(size={"height": image_size, "width": image_size})


class TeacherTrainer(EvalCollatorMixin, Trainer):
    """The Trainer, evaluating with the evaluation collator (no augmentation) during training and after it."""


def main(argv: list[str] | None = None) -> int:
    """The `moma-train-teacher` command: train, evaluate and export the teacher; returns the exit code."""
    model_args, data_args, args = parse_args((ModelArguments, DataArguments, TeacherTrainingArguments), argv)
    check_streaming_has_max_steps(data_args, args)
    args.remove_unused_columns = False  # the collator reads the raw image column
    prepare_output_dir(args, args.overwrite_output_dir)  # never mix this run with an earlier one's files
    check_push_access(args)  # a teacher that could not be pushed fails now, not after training
    set_seed(args.seed)
    train_dataset, eval_dataset, labels = load_datasets(data_args, data_args.streaming, args.seed)
    image_size = data_args.image_size or 224
    model, processor = build_model(model_args, labels, image_size)
    train_collator, eval_collator = build_collators(
        data_args, image_size, len(labels), normalization_from_processor(processor)
    )
    trainer = TeacherTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                             data_collator=train_collator, processing_class=processor,
                             compute_metrics=make_compute_metrics(len(labels)),
                             callbacks=[BadImageLimitCallback(train_collator)])
    trainer.eval_data_collator = eval_collator  # also for --eval_strategy steps|epoch during training
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_state()  # trainer_state.json: the log history, with any evaluation made during training
    if eval_dataset is not None:
        evaluate_and_save(trainer, eval_dataset, labels)
    trainer.save_model(_internal_call=True)  # export only: push_student below is the one upload
    if args.push_to_hub:
        trainer.create_model_card()  # as Trainer.push_to_hub would
        push_student(trainer, "Teacher trained with moma-hf (moma-train-teacher)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
