"""`moma-probe`: what is this teacher (or student) worth on my data? A linear probe on its frozen embedding.

    moma-probe --model_name_or_path owkin/phikon --train_dir my_patches --validation_dir my_patches \
        --validation_split test --output_dir outputs/phikon-probe
    moma-probe --model_name_or_path outputs/demo --dataset_name 1aurent/NCT-CRC-HE --output_dir probe-student

The model is anything `moma_hf.networks.teachers.load_teacher` loads (a Hub id, an `hf-hub:` timm id, a local
folder, a saved student); remote code runs only with --trust_remote_code. Its embedding is the feature that
distillation reads (`moma_hf.networks.backbones.pooled_features`). Images are resized to the model's input size
(--image_size overrides it) and normalized with the model's own mean and std, without augmentation. The probe
is fitted on the training split (--train_dir/--dataset_name, --train_split) and scored on the evaluation split
(--validation_dir or the Hub dataset's --validation_split); the protocol is `moma_hf.evaluation.linear_probe`'s.
The splits are read map-style: streaming is not supported.

Writes `probe_results.json` into --output_dir: the scores (`balanced_accuracy`, `macro_f1`, `cohen_kappa`,
`accuracy`, `quadratic_kappa`), the protocol and its settings, the model, the data (`[source, split]` of each
split), the feature dimension and the numbers of images fitted on (`train_images`), held out for early stopping
(`validation_images`) and scored (`eval_images`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moma_hf.commands.parsing import parse_args
from moma_hf.data import DataArguments, build_collators, load_datasets
from moma_hf.evaluation.linear_probe import PROBE_PROTOCOL, ProbeSettings, extract_embeddings, run_linear_probe
from moma_hf.networks.teachers import load_teacher

logger = logging.getLogger(__name__)

RESULTS_FILE = "probe_results.json"


@dataclass
class ProbeModelArguments:
    """Which network's embedding to probe."""

    model_name_or_path: str = field(
        metadata={"help": "Teacher or student: Hub id, hf-hub: timm id, or local folder."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model repo's own Python code."})


@dataclass
class ProbeRunArguments:
    """Where the results go and how the embedding pass runs."""

    output_dir: str = field(metadata={"help": f"Folder for {RESULTS_FILE}."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Images per forward pass."})
    dataloader_num_workers: int = field(default=2, metadata={"help": "DataLoader processes decoding images."})


def main(argv: list[str] | None = None) -> int:
    """The `moma-probe` command: probe and write `probe_results.json`; returns the exit code."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run(argv)
    return 0


def run(argv: list[str] | None = None) -> dict:
    """Probe the model named by the flags, write `probe_results.json` and return its content."""
    model_args, data_args, settings, run_args = parse_args(
        (ProbeModelArguments, DataArguments, ProbeSettings, ProbeRunArguments), argv)
    check_probe_data(data_args)
    teacher = load_teacher(model_args.model_name_or_path, model_args.model_revision,
                           trust_remote_code=model_args.trust_remote_code)
    image_size = data_args.image_size or teacher.input_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = probe_model(teacher.model, teacher.mean, teacher.std, image_size, data_args, settings,
                          run_args.per_device_eval_batch_size, device, num_workers=run_args.dataloader_num_workers)
    train_source, eval_source = data_args.source("train"), data_args.source("validation")
    results.update(model_name_or_path=model_args.model_name_or_path, model_revision=model_args.model_revision,
                   train_data=list(train_source), eval_data=list(eval_source))
    path = write_results(run_args.output_dir, results)
    logger.info("Linear probe of %s: balanced accuracy %.4f, macro-F1 %.4f, kappa %.4f. Wrote %s",
                model_args.model_name_or_path, results["balanced_accuracy"], results["macro_f1"],
                results["cohen_kappa"], path)
    return results


def check_probe_data(data_args: DataArguments) -> None:
    """Raise for data flags the probe cannot use: a stream, or no evaluation split."""
    if data_args.streaming:
        raise ValueError("The linear probe reads its splits map-style; --streaming is not supported. Drop the flag "
                         "(the splits are downloaded, or read from local files, once).")
    if not (data_args.validation_dir or data_args.dataset_name) or not data_args.validation_split:
        raise ValueError("The probe scores on an evaluation split: give --validation_dir (a local source) or a "
                         "--dataset_name with a --validation_split.")


def probe_model(model, mean, std, image_size: int, data_args: DataArguments, settings: ProbeSettings,
                batch_size: int, device: torch.device | str, num_workers: int = 0) -> dict:
    """Linear-probe `model`'s embedding on the labeled splits `data_args` names.

    Args:
        model: a loaded teacher or student (any model `pooled_features` reads); it is moved to `device`, and its
            train/eval mode is restored afterwards.
        mean, std: the model's RGB normalization; image_size: its square input size in pixels.
        data_args: the training split fits the probe, the evaluation split scores it; unlabeled sources are
            ignored, streaming is refused.
        settings: the probe protocol; batch_size, num_workers: of the embedding pass.

    Returns:
        `run_linear_probe`'s scores and counts, with `feature_dim`, `label_names`, `image_size`, `protocol`
        (`PROBE_PROTOCOL`) and `settings` (the `ProbeSettings` fields).
    """
    check_probe_data(data_args)
    data_args = dataclasses.replace(data_args, unlabeled_dir=None, unlabeled_dataset_name=None)
    train, evaluation, names = load_datasets(data_args, streaming=False, seed=settings.probe_seed)
    model.to(device)
    features = []
    for dataset in (train, evaluation):
        # The evaluation collator: resize and normalize only, unreadable images marked (and left out).
        collator = build_collators(data_args, image_size, len(names), (mean, std))[1]
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator,
                                             num_workers=num_workers, pin_memory=torch.device(device).type == "cuda")
        features.append(extract_embeddings(model, loader, device))
    (train_x, train_y), (eval_x, eval_y) = features
    results = run_linear_probe(train_x, train_y, eval_x, eval_y, len(names), settings)
    return {**results, "feature_dim": int(train_x.shape[1]), "label_names": list(names), "image_size": image_size,
            "protocol": PROBE_PROTOCOL, "settings": dataclasses.asdict(settings)}


def write_results(output_dir: str | Path, results: dict, file_name: str = RESULTS_FILE) -> Path:
    """Write `results` as `file_name` (`probe_results.json`) in `output_dir` (created); return the file's path."""
    path = Path(output_dir) / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    sys.exit(main())
