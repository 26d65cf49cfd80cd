"""What the example scripts share: data arguments, `--config file.yaml` parsing, datasets and collators."""

from __future__ import annotations

import difflib
import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from .data import PatchCollator, check_local_source, label_names, load_patch_dataset
from .token_safety import warn_if_token_in_arguments
from .transforms import build_eval_transform, build_train_transform
from .unlabelled import load_unlabelled_patches, mix_labelled_and_unlabelled


@dataclass
class DataArguments:
    """Where the labelled patches come from and how they are augmented."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id, e.g. 1aurent/NCT-CRC-HE."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config name."})
    dataset_revision: str = field(default="main", metadata={"help": "Hub dataset revision."})
    train_dir: str | None = field(default=None, metadata={"help": "Local imagefolder, parquet or tar source."})
    validation_dir: str | None = field(default=None, metadata={"help": "Local source of the evaluation split."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    validation_split: str | None = field(default="validation", metadata={"help": "Split to evaluate on."})
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the class labels."})
    streaming: bool = field(default=False, metadata={"help": "Stream the training data (needs --max_steps)."})
    shuffle_buffer_size: int = field(default=1000, metadata={"help": "Shuffle buffer when streaming."})
    image_size: int | None = field(default=None, metadata={"help": "Crop size; default: the teacher's input."})
    randaugment: str = field(default="rand-n2-m10-mstd0.5", metadata={"help": "timm RandAugment string, or ''."})
    stain_jitter: float = field(default=0.05, metadata={"help": "H&E stain jitter strength (0 turns it off)."})
    max_bad_image_fraction: float = field(default=0.01, metadata={"help": "Stop when more images are corrupt."})
    unlabeled_dir: str | None = field(
        default=None, metadata={"help": "Unlabelled patches to distil on as well: a folder of images (no class "
                                "folders needed), or parquet/tar files without a label column."}
    )
    unlabeled_dataset_name: str | None = field(default=None, metadata={"help": "Unlabelled patches from the Hub."})
    unlabeled_dataset_revision: str = field(
        default="main", metadata={"help": "Revision of --unlabeled_dataset_name (a branch, tag or commit sha)."}
    )
    labeled_fraction: float | None = field(
        default=None, metadata={"help": "Share of labelled examples per batch when unlabelled ones are mixed in; "
                                "default: natural proportions (map-style data only)."}
    )

    def __post_init__(self):
        if not (self.dataset_name or self.train_dir):
            raise ValueError("Give the training data: --dataset_name (Hub id) or --train_dir (local folder/files).")
        if self.unlabeled_dir and self.unlabeled_dataset_name:
            raise ValueError("Give one unlabelled source: --unlabeled_dir or --unlabeled_dataset_name, not both.")

    def source(self, split: str) -> tuple[str, str]:
        """`(source, split)` to pass to `load_patch_dataset` for the train or evaluation split."""
        if self.dataset_name:
            return self.dataset_name, self.train_split if split == "train" else self.validation_split
        local = self.train_dir if split == "train" else self.validation_dir
        return local, self.train_split if split == "train" else self.validation_split


DATA_FLAGS = ("--dataset_name", "--train_dir")


def parse_args(dataclass_types: tuple, argv: list[str] | None = None, default_config: Path | None = None):
    """Parse CLI flags, with `--config file.yaml` (or `--config=file.yaml`) as defaults that explicit flags override.

    Without `--config` and without any training data flag, `default_config` (the bundled demo) gives the
    defaults, so `distill.py --max_steps 20` runs the demo for 20 steps. Flags must be spelled out in full
    (no argparse prefix matching: `--learning_rat` is an error, not `--learning_rate`), and so must YAML keys.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = {a.split("=")[0] for a in argv}
    if default_config is not None and "--config" not in flags and not flags & set(DATA_FLAGS):
        argv = ["--config", str(default_config), *argv]
    if "--config" in {a.split("=")[0] for a in argv}:
        config_path, rest = _pop_config_flag(argv)
        argv = _yaml_to_flags(config_path, _field_names(dataclass_types)) + rest
    warn_if_token_in_arguments(argv)  # the flags of the YAML file are in argv by now
    return HfArgumentParser(dataclass_types, allow_abbrev=False).parse_args_into_dataclasses(args=argv)


def _pop_config_flag(argv: list[str]) -> tuple[Path, list[str]]:
    """`(the path given to --config, argv without it)`, for `--config PATH` and `--config=PATH` alike."""
    index = next(i for i, a in enumerate(argv) if a.split("=")[0] == "--config")
    if "=" in argv[index]:
        return Path(argv[index].split("=", 1)[1]), argv[:index] + argv[index + 1 :]
    if index + 1 == len(argv) or argv[index + 1].startswith("--"):
        raise ValueError("--config needs the path of a YAML file: --config run.yaml")
    return Path(argv[index + 1]), argv[:index] + argv[index + 2 :]


def _field_names(dataclass_types: tuple) -> set[str]:
    return {f.name for t in dataclass_types for f in fields(t) if f.init}


def _yaml_to_flags(path: Path, known: set[str]) -> list[str]:
    """The flags a YAML file of `flag_name: value` pairs stands for; raise naming the file for anything else."""
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"The config file {path} holds a {type(values).__name__}; it must hold a mapping of flag "
                         "names to values, one per line, such as 'learning_rate: 0.05'.")
    unknown = [key for key in values if str(key).replace("-", "_") not in known]
    if unknown:
        hints = {key: difflib.get_close_matches(str(key), sorted(known), n=1) for key in unknown}
        named = ", ".join(f"{key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") for key, hint in hints.items())
        raise ValueError(f"The config file {path} has unknown keys: {named}. Its keys are the script's flag names "
                         "without '--'; see --help.")
    flags = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (dict, list)) and key not in ("report_to",):
            value = json.dumps(value)
        if isinstance(value, list):
            flags += [f"--{key}", *map(str, value)]
        else:
            flags += [f"--{key}", str(value)]
    return flags


def load_datasets(data_args: DataArguments, streaming: bool, seed: int = 42):
    """`(train_dataset, eval_dataset or None, label_names)`; the evaluation split is always map-style."""
    common = dict(image_column=data_args.image_column_name, label_column=data_args.label_column_name)
    for flag in ("train_dir", "validation_dir", "unlabeled_dir"):
        check_local_source(getattr(data_args, flag), f"--{flag}")
    source, split = data_args.source("train")
    hub = dict(name=data_args.dataset_config_name, revision=data_args.dataset_revision)
    train = load_patch_dataset(source, split, streaming=streaming, shuffle_buffer_size=data_args.shuffle_buffer_size,
                               seed=seed, **hub, **common)
    names = label_names(train)
    unlabelled_source = data_args.unlabeled_dir or data_args.unlabeled_dataset_name
    if unlabelled_source:
        unlabelled = load_unlabelled_patches(unlabelled_source, names, data_args.train_split, streaming=streaming,
                                             shuffle_buffer_size=data_args.shuffle_buffer_size, seed=seed,
                                             image_column=data_args.image_column_name,
                                             revision=data_args.unlabeled_dataset_revision)
        train = mix_labelled_and_unlabelled(train, unlabelled, data_args.labeled_fraction, seed)
    evaluation = None
    eval_source, eval_split = data_args.source("validation")
    if eval_source and eval_split:
        evaluation = load_patch_dataset(eval_source, eval_split, streaming=False, **hub, **common)
        if label_names(evaluation) != names:
            raise ValueError(
                f"The evaluation labels {label_names(evaluation)} differ from the training labels {names}: both "
                "splits must share one label set (same class folders / ClassLabel names)."
            )
    return train, evaluation, names


def build_collators(data_args: DataArguments, image_size: int, num_labels: int, student_norm, teacher_norm=None,
                    seed: int = 0):
    """`(train_collator, eval_collator)`: augmentation and two normalisations for training, resize for eval.

    `seed` seeds the training augmentation (see `PatchCollator`); pass the run's `--seed`.
    `teacher_norm` is dropped when it equals `student_norm`, so the teacher reuses the student's tensor.
    """
    if teacher_norm is not None and [list(x) for x in teacher_norm] == [list(x) for x in student_norm]:
        teacher_norm = None
    common = dict(num_labels=num_labels, max_bad_fraction=data_args.max_bad_image_fraction)
    train = PatchCollator(
        build_train_transform(image_size, randaugment=data_args.randaugment or None,
                              stain_jitter=data_args.stain_jitter),
        student_norm, teacher_norm, seed=seed, **common,
    )
    # Evaluation scores only real images: an unreadable one is marked, not replaced by a copy of another.
    evaluation = PatchCollator(build_eval_transform(image_size), student_norm, None, skip_bad_images=True, **common)
    return train, evaluation
