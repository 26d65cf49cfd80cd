"""Distil a teacher into a small student with MoMA, evaluate it, write its card, and optionally push it.

    accelerate launch examples/distill.py                          # the bundled demo, offline
    accelerate launch examples/distill.py --config my_run.yaml     # YAML defaults, flags override
    accelerate launch examples/distill.py --teacher_model_name_or_path owkin/phikon \
        --student_model_name_or_path timm/resnet18.a1_in1k --dataset_name 1aurent/NCT-CRC-HE --streaming \
        --max_steps 20000 --output_dir phikon-resnet18-nct --push_to_hub
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import set_seed
from transformers.utils import logging

from moma_hf import MoMATrainer, MoMATrainingArguments
from moma_hf.cli import DataArguments, build_collators, load_datasets, parse_args
from moma_hf.evaluation import evaluate_and_save, make_compute_metrics
from moma_hf.feature_cache import attach_feature_cache
from moma_hf.hub import check_push_access, push_student
from moma_hf.model_card import MoMAModelCardData
from moma_hf.modeling_baselines import distillation_model_class
from moma_hf.students import build_student
from moma_hf.teachers import load_teacher
from moma_hf.transforms import normalization_from_processor

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what schedulers expect from a job that stopped on their signal
logger = logging.get_logger("distill")


@dataclass
class CardArguments:
    """Facts for the student's model card that the run cannot discover."""

    license: str = field(default="other", metadata={"help": "Licence of the distilled weights."})
    dataset_display_name: str | None = field(default=None, metadata={"help": "Human name of the dataset."})
    dataset_citation: str | None = field(default=None, metadata={"help": "Attribution text for the data."})


def main(argv=None) -> int:
    """Run the distillation job; returns the process exit code."""
    data_args, card_args, args = parse_args((DataArguments, CardArguments, MoMATrainingArguments), argv, DEMO_CONFIG)
    if data_args.streaming and args.max_steps <= 0:
        raise ValueError("--streaming needs --max_steps: a stream has no length to derive the number of steps from.")
    if not args.teacher_model_name_or_path:
        raise ValueError("Give a teacher with --teacher_model_name_or_path (Hub id or local folder).")
    check_push_access(args)  # a student that could not be pushed fails now, not after training
    set_seed(args.seed)
    teacher = load_teacher(args.teacher_model_name_or_path, args.teacher_model_revision, token=args.hub_token,
                           trust_remote_code=args.trust_remote_code, model_init_kwargs=args.teacher_model_init_kwargs)
    train_dataset, eval_dataset, labels = load_datasets(data_args, data_args.streaming, args.seed)
    image_size = data_args.image_size or teacher.input_size
    student, processor = build_student(args.student_model_name_or_path, dict(enumerate(labels)), teacher=teacher,
                                       image_size=image_size, token=args.hub_token,
                                       trust_remote_code=args.trust_remote_code)
    model = distillation_model_class(args.method).from_student_and_teacher(
        student, None if args.method == "ce" else teacher.model, teacher.id2label, **args.moma_config_kwargs()
    )
    train_collator, eval_collator = build_collators(
        data_args, image_size, len(labels), normalization_from_processor(processor), (teacher.mean, teacher.std),
        seed=args.seed,
    )
    if args.cache_teacher_features:
        facts = {"teacher": args.teacher_model_name_or_path, "teacher_revision": args.teacher_model_revision,
                 "image_size": image_size, "randaugment": data_args.randaugment, "stain_jitter": data_args.stain_jitter}
        train_dataset = attach_feature_cache(model, train_dataset, train_collator, args, facts)
    card = MoMAModelCardData(
        dataset_id=data_args.dataset_name, license=card_args.license, image_size=image_size,
        dataset_name=card_args.dataset_display_name or data_args.dataset_name or Path(data_args.train_dir).name,
        eval_split=data_args.validation_split, dataset_citation=card_args.dataset_citation,
    )
    trainer = MoMATrainer(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=train_collator, eval_data_collator=eval_collator, processing_class=processor,
        compute_metrics=make_compute_metrics(len(labels)), model_card_data=card,
    )
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    if trainer.stopped_by_signal:
        checkpoint = Path(args.output_dir) / f"checkpoint-{trainer.state.global_step}"
        if trainer.is_world_process_zero():
            logger.warning(f"Stopped by SIGTERM; {checkpoint} holds the whole state. Continue with the same "
                           f"command plus --resume_from_checkpoint {checkpoint}")
        return PREEMPTED_EXIT_CODE
    trainer.save_metrics("train", result.metrics)  # train_results.json: runtime, samples per second, loss
    trainer.save_state()  # trainer_state.json: the log history (loss terms, data_wait_fraction) for later reading
    if eval_dataset is not None:
        evaluate_and_save(trainer, eval_dataset, labels)
    trainer.save_model(_internal_call=True)  # export only: push_student below is the one upload
    trainer.create_model_card()
    if args.push_to_hub:
        push_student(trainer, f"MoMA student distilled from {args.teacher_model_name_or_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
