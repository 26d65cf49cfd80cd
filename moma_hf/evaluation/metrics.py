"""Classification metrics for `Trainer.compute_metrics` and the evaluation scripts, and the files that report them.

The numbers come from the `evaluate` modules shipped in :mod:`moma_hf.evaluation.metric_scripts`. Every evaluation
reports

- ``accuracy``, ``balanced_accuracy``, ``macro_f1``;
- ``cohen_kappa`` (unweighted) and ``quadratic_kappa`` (Cohen's kappa with quadratic weights, for ordinal labels
  such as Gleason grades; class ids must then be in grade order);

and :func:`save_evaluation` writes, into one folder, ``eval_results.json`` (those five with the ``eval_``
prefix), ``per_class_metrics.json``, ``confusion_matrix.json`` and ``confusion_matrix.png``.

Images that could not be decoded reach evaluation with the label ``UNREADABLE`` (-100, see
:class:`~moma_hf.data.collator.PatchCollator`'s ``skip_bad_images``): the metrics leave them out, and
:func:`score_readable` counts them (``eval_samples`` / ``eval_unreadable_images``) and applies the
``--max_bad_image_fraction`` limit to the whole evaluation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..data.collator import UNREADABLE, check_bad_fraction
from .metric_scripts import load_metric
from .plots import plot_confusion_matrix

METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "cohen_kappa", "quadratic_kappa")
logger = logging.getLogger(__name__)


def score_readable(predictions: np.ndarray, references: np.ndarray, max_bad_fraction: float | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Keep the examples with a class id as reference; count the unreadable ones, log them and apply the limit.

    Args:
        predictions, references: `(N,)` class ids; a reference of ``UNREADABLE`` marks an image that could not
            be decoded, any other negative one an example without a label.
        max_bad_fraction: raise :class:`~moma_hf.data.collator.TooManyBadImagesError` when more than this share of
            the `N` images was unreadable; None applies no limit.

    Returns:
        `(predictions (M,), references (M,), {"eval_samples": M, "eval_unreadable_images": N_unreadable})`.
    """
    predictions, references = np.asarray(predictions), np.asarray(references)
    unreadable = int((references == UNREADABLE).sum())
    if unreadable:
        logger.warning("Evaluation skipped %d unreadable image(s) of %d; the metrics count only the other %d.",
                       unreadable, references.size, references.size - unreadable)
    if max_bad_fraction is not None:
        check_bad_fraction(unreadable, references.size, max_bad_fraction, scope=" in this evaluation")
    scored = references >= 0
    counts = {"eval_samples": int(scored.sum()), "eval_unreadable_images": unreadable}
    return predictions[scored], references[scored], counts


def confusion_matrix(predictions: np.ndarray, references: np.ndarray, num_labels: int) -> np.ndarray:
    """`(C, C)` counts; rows are true classes, columns predicted ones."""
    result = load_metric("confusion_matrix").compute(
        predictions=np.asarray(predictions), references=np.asarray(references), num_labels=num_labels
    )
    return np.asarray(result["confusion_matrix"])


def prediction_metrics(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """The `METRIC_KEYS` scores of predicted class ids against reference class ids (no prefix)."""
    inputs = {"predictions": np.asarray(predictions), "references": np.asarray(references)}
    return {
        "accuracy": load_metric("accuracy").compute(**inputs)["accuracy"],
        "balanced_accuracy": load_metric("balanced_accuracy").compute(**inputs)["balanced_accuracy"],
        "macro_f1": load_metric("macro_f1").compute(**inputs)["macro_f1"],
        "cohen_kappa": load_metric("cohen_kappa").compute(**inputs)["cohen_kappa"],
        "quadratic_kappa": load_metric("cohen_kappa").compute(**inputs, weights="quadratic")["cohen_kappa"],
    }


def classification_metrics(matrix: np.ndarray) -> dict[str, float]:
    """The `METRIC_KEYS` scores of a confusion matrix (rows true, columns predicted); it must hold an example.

    Classes absent from both sides count in no average (only in the kappa distances, as ordinal positions).
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    # Back to one (reference, prediction) pair per counted example: the metric modules take pairs.
    rows, columns = np.indices(matrix.shape)
    counts = matrix.ravel()
    return prediction_metrics(np.repeat(columns.ravel(), counts), np.repeat(rows.ravel(), counts))


def per_class_metrics(matrix: np.ndarray, label_names: list[str]) -> dict[str, dict[str, float]]:
    """`{label: {"precision", "recall", "f1", "support"}}` from a confusion matrix (rows true, columns predicted).

    A ratio with nothing to divide by (precision of a class never predicted, recall of a class with no example)
    is reported as 0, as scikit-learn's ``zero_division=0`` does; ``support`` tells these cases apart.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    true_positive, support, predicted = np.diag(matrix), matrix.sum(axis=1), matrix.sum(axis=0)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(predicted), where=predicted > 0)
    recall = np.divide(true_positive, support, out=np.zeros_like(support), where=support > 0)
    total = predicted + support  # 2 TP + FP + FN
    f1 = np.divide(2 * true_positive, total, out=np.zeros_like(total), where=total > 0)
    return {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "support": int(support[i])}
        for i, name in enumerate(label_names)
    }


def make_compute_metrics(num_labels: int):
    """A `compute_metrics(eval_prediction)` for the Trainer, from logits `(N, C)` and labels `(N,)`."""

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        if logits.shape[-1] != num_labels:
            raise ValueError(f"The model gives {logits.shape[-1]} logits per image for {num_labels} labels.")
        references = np.asarray(eval_prediction.label_ids)
        scored = references >= 0  # unreadable images (and unlabeled examples) are not scored
        return prediction_metrics(np.argmax(logits, axis=-1)[scored], references[scored])

    return compute_metrics


def save_evaluation(output_dir: str | Path, metrics: dict, matrix: np.ndarray, label_names: list[str],
                    write_results: bool = True) -> dict[str, Path]:
    """Write an evaluation's files into `output_dir` and return their paths by kind.

    - ``eval_results.json``: `metrics` as given (only with `write_results`; the Trainer writes its own);
    - ``per_class_metrics.json``: :func:`per_class_metrics`;
    - ``confusion_matrix.json``: ``{"labels": [...], "matrix": [[...]]}``, rows true classes, columns predicted;
    - ``confusion_matrix.png``: :func:`moma_hf.evaluation.plots.plot_confusion_matrix`, titled with the accuracy.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"per_class": output_dir / "per_class_metrics.json", "matrix": output_dir / "confusion_matrix.json"}
    if write_results:
        paths["results"] = output_dir / "eval_results.json"
        _write_json(paths["results"], metrics)
    _write_json(paths["per_class"], per_class_metrics(matrix, label_names))
    _write_matrix_json(paths["matrix"], matrix, label_names)
    accuracy = metrics.get("eval_accuracy", metrics.get("accuracy", float("nan")))
    paths["plot"] = plot_confusion_matrix(matrix, label_names, output_dir / "confusion_matrix.png",
                                          title=f"accuracy {accuracy:.3f}")
    return paths


def evaluate_and_save(trainer, dataset, label_names: list[str]) -> dict[str, float]:
    """Predict `dataset`, log the metrics, and write the :func:`save_evaluation` files into the trainer's
    `output_dir` (``eval_results.json`` through `Trainer.save_metrics`).

    Unreadable images are left out of the metrics and counted (see :func:`score_readable`); the limit is the
    evaluation collator's ``max_bad_fraction``.
    """
    prediction = trainer.predict(dataset, metric_key_prefix="eval")
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    collator = getattr(trainer, "eval_data_collator", None) or trainer.data_collator
    predictions, references, counts = score_readable(np.argmax(logits, axis=-1), prediction.label_ids,
                                                     getattr(collator, "max_bad_fraction", None))
    matrix = confusion_matrix(predictions, references, len(label_names))
    scores = prediction_metrics(predictions, references)
    metrics = {**prediction.metrics, **{f"eval_{k}": v for k, v in scores.items()}, **counts}
    trainer.log(metrics)
    if trainer.is_world_process_zero():
        Path(trainer.args.output_dir).mkdir(parents=True, exist_ok=True)  # save_metrics does not create it
        trainer.save_metrics("eval", metrics, combined=False)
        save_evaluation(trainer.args.output_dir, metrics, matrix, label_names, write_results=False)
    return metrics


def _write_json(path: Path, value) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def _write_matrix_json(path: Path, matrix: np.ndarray, label_names: list[str]) -> None:
    """``{"labels", "matrix"}`` with one matrix row per line, so the file reads as the table it is."""
    rows = ",\n    ".join(json.dumps(row) for row in np.asarray(matrix).tolist())
    with open(path, "w", encoding="utf-8") as f:
        f.write(f'{{\n  "labels": {json.dumps(list(label_names))},\n  "matrix": [\n    {rows}\n  ]\n}}\n')
