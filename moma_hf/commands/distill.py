"""`moma-distill`: distil a teacher into a small student, evaluate it, write its card, and optionally push it.

    moma-distill --config my_run.yaml                              # YAML defaults, flags override
    accelerate launch -m moma_hf.commands.distill --config my_run.yaml        # several processes / GPUs
    accelerate launch examples/distill.py                          # in the repository: the bundled demo, offline
    moma-distill --teacher_model_name_or_path owkin/phikon \
        --student_model_name_or_path timm/resnet18.a1_in1k --dataset_name 1aurent/NCT-CRC-HE --streaming \
        --max_steps 20000 --output_dir phikon-resnet18-nct --push_to_hub
"""

import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from transformers import set_seed
from transformers.utils import logging

from moma_hf import (
    DistillationTrainer,
    DistillationTrainingArguments,
    Method,
    TeacherUpdate,
    build_distillation_model,
)
from moma_hf.commands.parsing import check_streaming_has_max_steps, parse_args
from moma_hf.commands.probe import check_probe_data, probe_model, write_results
from moma_hf.commands.teacher_cache import cache_facts, cache_teacher_outputs, find_ready_cache
from moma_hf.data.arguments import DataArguments, build_collators, load_datasets
from moma_hf.data.transforms import normalization_from_processor
from moma_hf.evaluation.linear_probe import ProbeSettings
from moma_hf.evaluation.metrics import evaluate_and_save, make_compute_metrics
from moma_hf.evaluation.model_card import DistillationModelCardData
from moma_hf.hub import check_push_access, push_student
from moma_hf.networks.backbones import input_size
from moma_hf.networks.students import SAME_AS_TEACHER, build_student
from moma_hf.networks.teachers import load_teacher
from moma_hf.training.launcher import PREEMPTED_EXIT_CODE, notify_launcher
from moma_hf.training.run_folder import check_output_dir, prepare_output_dir

logger = logging.get_logger("distill")


@dataclass
class CardArguments:
    """Facts for the student's model card that the run cannot discover."""

    license: str = field(default="other", metadata={"help": "Licence of the distilled weights."})
    dataset_display_name: str | None = field(default=None, metadata={"help": "Human name of the dataset."})
    dataset_citation: str | None = field(default=None, metadata={"help": "Attribution text for the data."})


@dataclass
class ProbeArguments(ProbeSettings):
    """When to run the linear probe (`moma-probe`'s protocol, whose settings these fields inherit)."""

    probe_teacher: bool = field(
        default=False, metadata={"help": "Before distilling, linear-probe the teacher's embedding (fitted on the "
                                 "labeled training split, scored on the evaluation split); the card records it."}
    )
    probe_student: bool = field(
        default=False, metadata={"help": "Linear-probe the student's embedding before and after distilling, with "
                                 "the same protocol; the card records both."}
    )


def run_probe(who: str, network, normalization, image_size: int, data_args: DataArguments,
              probe_args: ProbeArguments, args: DistillationTrainingArguments) -> dict | None:
    """Linear-probe `network` on the main process (None on the others): log the scores, write them to
    `OUTPUT_DIR/probe_<who>.json` and return them."""
    if args.process_index != 0:
        return None
    results = probe_model(network, *normalization, image_size, data_args, probe_args,
                          args.per_device_eval_batch_size, args.device, args.dataloader_num_workers)
    path = write_results(args.output_dir, results, f"probe_{who}.json")
    shown = {"student_initial": "student before distillation"}.get(who, who)
    logger.warning(f"Linear probe of the {shown} ({results['protocol']}): balanced accuracy "
                   f"{results['balanced_accuracy']:.4f}, macro-F1 {results['macro_f1']:.4f} ({path.name}).")
    return results


def needs_teacher(args: DistillationTrainingArguments) -> bool:
    """Every method but `ce` distils a teacher; a `same-as-teacher` student is built from one in any case."""
    return args.method.uses_teacher or args.student_model_name_or_path == SAME_AS_TEACHER


def load_run_teacher(args: DistillationTrainingArguments, weights: bool = True):
    """The run's `Teacher`, or None for a `ce` run, whose teacher (from a config file, say) is not loaded.

    With `weights=False` only its config and processor load (see `load_teacher`).
    """
    if not needs_teacher(args):
        if args.teacher_model_name_or_path:
            logger.info(f"--method ce trains without a teacher: {args.teacher_model_name_or_path} is not loaded.")
            args.teacher_model_name_or_path = None  # so no config, card or saved argument names an unused teacher
        return None
    return load_teacher(args.teacher_model_name_or_path, args.teacher_model_revision, token=args.hub_token,
                        trust_remote_code=args.trust_remote_code, model_init_kwargs=args.teacher_model_init_kwargs,
                        dtype=args.teacher_dtype, weights=weights)


def reads_teacher_weights_first(args: DistillationTrainingArguments, probe_args: ProbeArguments) -> bool:
    """Whether the run reads the teacher's weights at the start: always, unless a teacher-feature cache may serve
    its outputs (`use_feature_cache` loads them only to build one); a same-as-teacher student (the teacher's
    weights are its start) and `--probe_teacher` read them in any case."""
    return (not args.cache_teacher_features or probe_args.probe_teacher
            or args.student_model_name_or_path == SAME_AS_TEACHER)


def use_feature_cache(model, teacher, train_dataset, collator, args: DistillationTrainingArguments,
                      data_args: DataArguments, image_size: int):
    """`--cache_teacher_features`: the training set read through the cache, and no teacher left in `model`.

    A complete cache of this run on disk serves as it is: a teacher loaded without weights (`weights=False`)
    never reads them. Otherwise the frozen teacher's weights load, the cache is built, and the teacher is
    released before training (`release_teacher`: memory freed). A momentum teacher or `ce` is refused by
    `cache_teacher_outputs`. The caller must drop its own reference to `teacher`.
    """
    facts = cache_facts(args, data_args, image_size)
    frozen = model.teacher_update == TeacherUpdate.FROZEN
    if frozen and find_ready_cache(train_dataset, collator, args, facts):
        model.release_teacher()
    elif frozen and teacher.weights_sha256 is None:  # loaded without weights: the cache must be built first
        teacher = load_run_teacher(args)
        model.config.teacher_weights_sha256 = teacher.weights_sha256
        model.attach_teacher(teacher.model)
    train_dataset = cache_teacher_outputs(model, train_dataset, collator, args, facts)
    model.release_teacher()
    return train_dataset


def build_model(args: DistillationTrainingArguments, teacher, labels: list[str], image_size: int | None):
    """`(distillation model, student's image processor, image size)`; logs every loss term that is off, and why.

    Without `--image_size` the size is the teacher's input, or with no teacher the student's own.
    """
    image_size = image_size or (teacher.input_size if teacher else None)
    student, processor = build_student(args.student_model_name_or_path, dict(enumerate(labels)), teacher=teacher,
                                       image_size=image_size, token=args.hub_token,
                                       trust_remote_code=args.trust_remote_code)
    distils = args.method.uses_teacher  # a `ce` run loads a teacher only as a same-as-teacher student's weights
    if distils:  # provenance in the exported student's config.json: a name, never a class
        student.config.distilled_from = {"teacher": args.teacher_model_name_or_path,
                                         "revision": args.teacher_model_revision,
                                         "preset": teacher.preset.name if teacher.preset else None}
    model = build_distillation_model(student, teacher.model if distils else None,
                                     teacher.id2label if distils else None, **args.distillation_config_kwargs(),
                                     teacher_weights_sha256=teacher.weights_sha256 if distils else None)
    if args.process_index == 0:
        for term, reason in model.config.switched_off_terms().items():
            logger.warning(f"{term} is off for this run: {reason}.")
    return model, processor, image_size or input_size(student)


def main(argv: list[str] | None = None, default_config: Path | None = None) -> int:
    """Run the distillation job; returns the process exit code.

    `default_config` is a YAML file used when no data flag and no `--config` is given (`examples/distill.py`
    passes the bundled demo's).
    """
    data_args, card_args, probe_args, args = parse_args(
        (DataArguments, CardArguments, ProbeArguments, DistillationTrainingArguments), argv, default_config)
    check_streaming_has_max_steps(data_args, args)
    if probe_args.probe_teacher or probe_args.probe_student:
        check_probe_data(data_args)  # a stream or a missing evaluation split fails now, not after loading
    if needs_teacher(args) and not args.teacher_model_name_or_path:
        raise ValueError(f"--method {args.method} needs a teacher: give --teacher_model_name_or_path (Hub id or local "
                         "folder), or use --method ce to train the student on its labels alone.")
    check_output_dir(args, args.overwrite_output_dir)  # refuse a used folder now, not after minutes of loading
    check_push_access(args)  # a student that could not be pushed fails now, not after training
    set_seed(args.seed)
    teacher = load_run_teacher(args, weights=reads_teacher_weights_first(args, probe_args))
    train_dataset, eval_dataset, labels = load_datasets(data_args, data_args.streaming, args.seed)
    model, processor, image_size = build_model(args, teacher, labels, data_args.image_size)
    student_norm = normalization_from_processor(processor)
    train_collator, eval_collator = build_collators(
        data_args, image_size, len(labels), student_norm,
        (teacher.mean, teacher.std) if model.teacher is not None else None, seed=args.seed,
    )
    prepare_output_dir(args, args.overwrite_output_dir)  # with --overwrite_output_dir: delete the old run now
    probe = partial(run_probe, image_size=image_size, data_args=data_args, probe_args=probe_args, args=args)
    probes = {}
    if probe_args.probe_teacher and model.teacher is not None:
        probes["teacher_probe"] = probe("teacher", teacher.model, (teacher.mean, teacher.std))
    if probe_args.probe_student:
        probes["student_initial_probe"] = probe("student_initial", model.student, student_norm)
    if args.cache_teacher_features:
        train_dataset = use_feature_cache(model, teacher, train_dataset, train_collator, args, data_args, image_size)
        teacher = None  # the model released its teacher: no reference may keep its weights alive
    card = DistillationModelCardData(
        dataset_id=data_args.dataset_name, license=card_args.license, image_size=image_size,
        dataset_name=card_args.dataset_display_name or data_args.dataset_name or Path(data_args.train_dir).name,
        eval_split=data_args.validation_split, dataset_citation=card_args.dataset_citation, **probes,
    )
    trainer = DistillationTrainer(
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
        trainer.accelerator.end_training()  # leave the process group together, as at the end of a finished run
        notify_launcher()  # so that `accelerate launch` exits 143 too, not 1 (see moma_hf/launcher.py)
        return PREEMPTED_EXIT_CODE
    trainer.save_metrics("train", result.metrics)  # train_results.json: runtime, samples per second, loss
    trainer.save_state()  # trainer_state.json: the log history (loss terms, data_wait_fraction) for later reading
    if eval_dataset is not None:
        evaluate_and_save(trainer, eval_dataset, labels)
    if probe_args.probe_student:
        card.student_probe = probe("student", model.student, student_norm)
    export(trainer, args)
    # Leave the process group together: a rank that exits while gloo's or NCCL's threads still run can abort
    # ("terminate called without an active exception") and fail a finished run's launch.
    trainer.accelerator.end_training()
    return 0


def export(trainer: DistillationTrainer, args: DistillationTrainingArguments) -> None:
    """Save the student and its card, and push them when asked."""
    trainer.save_model(_internal_call=True)  # export only: push_student below is the one upload
    trainer.create_model_card()
    if args.push_to_hub:
        message = (f"Student distilled from {args.teacher_model_name_or_path} ({args.method})"
                   if args.method.uses_teacher else f"Student trained on its labels alone ({Method.CE})")
        push_student(trainer, message)


if __name__ == "__main__":
    sys.exit(main())
