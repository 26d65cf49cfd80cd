"""`moma-evaluate`: score an image classifier (a distilled student, a teacher, any Hub model) on a split of a
labeled patch dataset.

    moma-evaluate --model_name_or_path outputs/demo --data_dir examples/demo_data --split validation \
        --output_dir outputs/demo-eval
    moma-evaluate --model_name_or_path you/phikon-to-resnet18-nct --dataset_name 1aurent/NCT-CRC-HE \
        --split test --output_dir eval-nct

The model loads with `AutoModelForImageClassification.from_pretrained` (transformers and timm-wrapped models);
remote code runs only with --trust_remote_code. The data is a Hub dataset (--dataset_name) or a local image folder,
parquet files or webdataset tars (--data_dir), read by `moma_hf.data.loading.load_patch_dataset`. Its label names
must be the model's `id2label` names (all of them, or some of them for a split that lacks classes; the order may
differ). Images are resized to the model's input size (--image_size overrides it) and normalised with its
processor's mean and std, as during evaluation in training. A token for private repos comes from `hf auth login`
or `HF_TOKEN`, never from a flag, which would end up in shell histories and job logs.

Writes into --output_dir (see `moma_hf.evaluation.metrics.save_evaluation`):

- `eval_results.json`: `eval_accuracy`, `eval_balanced_accuracy`, `eval_macro_f1`, `eval_cohen_kappa`,
  `eval_quadratic_kappa`, `eval_samples` (the images scored), `eval_unreadable_images` (files that could not be
  decoded: left out of every metric, each named in a warning), and what was evaluated (`model_name_or_path`,
  `model_revision`, `dataset`, `split`, `image_size`); a larger unreadable share than --max_bad_image_fraction
  stops the evaluation with an error and writes nothing;
- `per_class_metrics.json`: `{label: {precision, recall, f1, support}}`;
- `confusion_matrix.json` (`labels`, `matrix`: rows true, columns predicted) and `confusion_matrix.png`.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

from moma_hf.commands.parsing import parse_args
from moma_hf.data import (
    UNREADABLE,
    PatchCollator,
    PatchSourceArguments,
    build_eval_transform,
    check_local_source,
    label_names,
    load_patch_dataset,
    normalization_from_processor,
)
from moma_hf.evaluation.metrics import confusion_matrix, prediction_metrics, save_evaluation, score_readable
from moma_hf.networks.backbones import input_size as config_input_size

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which classifier to evaluate, and at which input size."""

    model_name_or_path: str = field(metadata={"help": "Hub id or local folder of an image classifier."})
    revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit) of the model."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model repo's own Python code."})
    image_size: int | None = field(default=None, metadata={"help": "Input size; default: the processor's."})
    crop_pct: float = field(default=1.0, metadata={"help": "Resize to image_size / crop_pct, then centre-crop."})


@dataclass
class EvalDataArguments(PatchSourceArguments):
    """Which labeled images to evaluate on."""

    data_dir: str | None = field(default=None, metadata={"help": "Local imagefolder, parquet or tar source."})
    split: str = field(default="test", metadata={"help": "Split to evaluate on."})
    streaming: bool = field(default=False, metadata={"help": "Stream the split instead of downloading it first."})
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate only the first N examples."})

    def __post_init__(self):
        if bool(self.dataset_name) == bool(self.data_dir):
            raise ValueError("Give the data to evaluate on: either --dataset_name (Hub id) or --data_dir (local).")


@dataclass
class EvaluationArguments:
    """Where the results go and how the inference runs."""

    output_dir: str = field(metadata={"help": "Folder for the metrics, per-class results and confusion matrix."})
    batch_size: int = field(default=64, metadata={"help": "Images per forward pass."})
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes decoding the images."})


def main(argv: list[str] | None = None) -> int:
    """The `moma-evaluate` command: evaluate and write the result files; returns the exit code."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run(argv)
    return 0


def run(argv: list[str] | None = None) -> dict:
    """Evaluate, write the result files and return the `eval_results.json` content."""
    model_args, data_args, eval_args = parse_args((ModelArguments, EvalDataArguments, EvaluationArguments), argv)
    model, processor = load_classifier(model_args)
    model_labels = model_label_names(model)
    dataset = load_split(data_args)
    to_model_ids = label_mapping(label_names(dataset), model_labels)
    image_size = model_args.image_size or input_size(processor, model)
    collator = PatchCollator(build_eval_transform(image_size, crop_pct=model_args.crop_pct),
                             normalization_from_processor(processor if processor is not None else model),
                             num_labels=len(to_model_ids), max_bad_fraction=data_args.max_bad_image_fraction,
                             skip_bad_images=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=eval_args.batch_size, collate_fn=collator,
                                         num_workers=eval_args.num_workers, pin_memory=torch.cuda.is_available())
    predictions, references, counts = score_readable(*predict(model, loader, to_model_ids),
                                                     data_args.max_bad_image_fraction)
    matrix = confusion_matrix(predictions, references, len(model_labels))
    results = {f"eval_{name}": value for name, value in prediction_metrics(predictions, references).items()}
    results.update(**counts, model_name_or_path=model_args.model_name_or_path,
                   model_revision=model_args.revision, dataset=data_args.dataset_name or data_args.data_dir,
                   split=data_args.split, image_size=image_size)
    paths = save_evaluation(eval_args.output_dir, results, matrix, model_labels)
    logger.info("%s", json.dumps({k: v for k, v in results.items() if k.startswith("eval_")}, indent=2))
    logger.info("Wrote %s", ", ".join(str(p) for p in paths.values()))
    return results


def load_classifier(args: ModelArguments):
    """`(model in eval mode, image processor or None)`; a model without a saved processor gets None."""
    common = dict(revision=args.revision, trust_remote_code=args.trust_remote_code)
    model = AutoModelForImageClassification.from_pretrained(args.model_name_or_path, **common).eval()
    try:
        processor = AutoImageProcessor.from_pretrained(args.model_name_or_path, **common)
    except (OSError, ValueError) as err:  # no preprocessor_config.json: normalise with the model's config
        logger.warning("No image processor for %s (%s); using the model config's normalisation.",
                       args.model_name_or_path, err)
        processor = None
    return model, processor


def model_label_names(model) -> list[str]:
    """The model's class names, in the order of its logits (`config.id2label`)."""
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    return [id2label[i] for i in range(model.config.num_labels)]


def load_split(args: EvalDataArguments):
    """The split to evaluate on, as a `load_patch_dataset` dataset (optionally its first `max_samples`)."""
    check_local_source(args.data_dir, "--data_dir")
    dataset = load_patch_dataset(
        args.dataset_name or args.data_dir, args.split, streaming=args.streaming, name=args.dataset_config_name,
        revision=args.dataset_revision if args.dataset_name else None, image_column=args.image_column_name,
        label_column=args.label_column_name,
    )
    if args.max_samples is not None:
        dataset = dataset.take(args.max_samples) if args.streaming else dataset.select(
            range(min(args.max_samples, len(dataset))))
    return dataset


def label_mapping(dataset_labels: list[str], model_labels: list[str]) -> np.ndarray:
    """For each dataset label id, the model's id of the same name; raises when a dataset label is not a model class.

    The names are matched, not the positions, so a split whose class order differs from the model's (or that lacks
    some of its classes) is still scored correctly.
    """
    unknown = [name for name in dataset_labels if name not in model_labels]
    if unknown:
        hint = (" The model's config has no class names (LABEL_i): save it with the id2label of its training data."
                if all(name == f"LABEL_{i}" for i, name in enumerate(model_labels)) else "")
        raise ValueError(
            f"The dataset's labels {dataset_labels} do not match the model's id2label {model_labels}: "
            f"{unknown} are not classes of the model. Evaluate a model trained on these classes, or give the dataset "
            f"the model's label names (class folder names, or the ClassLabel names of --label_column_name).{hint}"
        )
    if dataset_labels != model_labels:
        logger.info("Dataset labels %s matched by name to the model's %s.", dataset_labels, model_labels)
    return np.array([model_labels.index(name) for name in dataset_labels], dtype=np.int64)


def input_size(processor, model) -> int:
    """The square input size the model expects, from its image processor or, failing that, its config."""
    data_config = getattr(processor, "data_config", None) or {}  # timm models (TimmWrapperImageProcessor)
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    candidates = (
        (data_config.get("input_size") or [None])[-1],
        _side(crop),
        _side(getattr(processor, "size", None)),
        config_input_size(model, default=0),  # the config's timm `pretrained_cfg` or `image_size`
    )
    for size in candidates:
        if size:
            return int(size)
    raise ValueError("Cannot tell the model's input size from its processor or config; pass --image_size.")


def _side(size) -> int | None:
    """One side of a square size given as an int, a (h, w) pair or a transformers size dict."""
    if size is None or isinstance(size, int):
        return size
    if isinstance(size, (list, tuple)):
        return size[-1]
    return size.get("height") or size.get("shortest_edge")


@torch.no_grad()
def predict(model, loader, to_model_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(predicted model ids, reference model ids)` over `loader`, on CUDA when there is one; an unreadable
    image keeps its `UNREADABLE` reference."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    predictions, references = [], []
    for batch in loader:
        logits = model(pixel_values=batch["pixel_values"].to(device, non_blocking=True)).logits
        predictions.append(logits.argmax(dim=-1).cpu().numpy())
        labels = batch["labels"].numpy()
        references.append(np.where(labels == UNREADABLE, UNREADABLE, to_model_ids[np.maximum(labels, 0)]))
    if not predictions:
        raise ValueError("The evaluation split has no examples.")
    return np.concatenate(predictions), np.concatenate(references)


if __name__ == "__main__":
    sys.exit(main())
