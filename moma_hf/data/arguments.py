"""`DataArguments` and what they describe: the training and evaluation datasets, and their collators."""

from __future__ import annotations

from dataclasses import dataclass, field

from .collator import PatchCollator
from .loading import check_local_source, label_names, load_patch_dataset
from .transforms import build_eval_transform, build_train_transform
from .unlabeled import load_unlabeled_patches, mix_labeled_and_unlabeled


@dataclass
class PatchSourceArguments:
    """The flags every job that reads labeled patches shares: a Hub dataset, its columns, the bad-image limit."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id, e.g. 1aurent/NCT-CRC-HE."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config name."})
    dataset_revision: str = field(default="main", metadata={"help": "Hub dataset revision."})
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the class labels."})
    max_bad_image_fraction: float = field(default=0.01, metadata={"help": "Stop when more images are corrupt."})


@dataclass
class DataArguments(PatchSourceArguments):
    """Where the labeled patches come from and how they are augmented."""

    train_dir: str | None = field(default=None, metadata={"help": "Local imagefolder, parquet or tar source."})
    validation_dir: str | None = field(default=None, metadata={"help": "Local source of the evaluation split."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    validation_split: str | None = field(default="validation", metadata={"help": "Split to evaluate on."})
    streaming: bool = field(default=False, metadata={"help": "Stream the training data (needs --max_steps)."})
    shuffle_buffer_size: int = field(default=1000, metadata={"help": "Shuffle buffer when streaming."})
    image_size: int | None = field(default=None, metadata={"help": "Crop size; default: the teacher's input."})
    randaugment: str = field(default="rand-n2-m10-mstd0.5", metadata={"help": "timm RandAugment string, or ''."})
    stain_jitter: float = field(default=0.05, metadata={"help": "H&E stain jitter strength (0 turns it off)."})
    unlabeled_dir: str | None = field(
        default=None, metadata={"help": "Unlabeled patches to distil on as well: a folder of images (no class "
                                "folders needed), or parquet/tar files without a label column."}
    )
    unlabeled_dataset_name: str | None = field(default=None, metadata={"help": "Unlabeled patches from the Hub."})
    unlabeled_dataset_revision: str = field(
        default="main", metadata={"help": "Revision of --unlabeled_dataset_name (a branch, tag or commit sha)."}
    )
    labeled_fraction: float | None = field(
        default=None, metadata={"help": "Share of labeled examples per batch when unlabeled ones are mixed in; "
                                "default: natural proportions (map-style data only)."}
    )

    def __post_init__(self):
        if not (self.dataset_name or self.train_dir):
            raise ValueError("Give the training data: --dataset_name (Hub id) or --train_dir (local folder/files).")
        if self.unlabeled_dir and self.unlabeled_dataset_name:
            raise ValueError("Give one unlabeled source: --unlabeled_dir or --unlabeled_dataset_name, not both.")

    def source(self, split: str) -> tuple[str, str]:
        """`(source, split)` to pass to `load_patch_dataset` for the train or evaluation split."""
        if self.dataset_name:
            return self.dataset_name, self.train_split if split == "train" else self.validation_split
        local = self.train_dir if split == "train" else self.validation_dir
        return local, self.train_split if split == "train" else self.validation_split


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
    unlabeled_source = data_args.unlabeled_dir or data_args.unlabeled_dataset_name
    if unlabeled_source:
        unlabeled = load_unlabeled_patches(unlabeled_source, names, data_args.train_split, streaming=streaming,
                                           shuffle_buffer_size=data_args.shuffle_buffer_size, seed=seed,
                                           image_column=data_args.image_column_name,
                                           revision=data_args.unlabeled_dataset_revision)
        train = mix_labeled_and_unlabeled(train, unlabeled, data_args.labeled_fraction, seed)
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
