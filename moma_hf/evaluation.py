"""Classification metrics for `Trainer.compute_metrics` and the evaluation scripts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .plots import plot_confusion_matrix


def confusion_matrix(predictions: np.ndarray, references: np.ndarray, num_labels: int) -> np.ndarray:
    """`(C, C)` counts; rows are true classes, columns predicted ones."""
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(matrix, (np.asarray(references), np.asarray(predictions)), 1)
    return matrix


def classification_metrics(matrix: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro-F1 from a confusion matrix (classes absent from both sides skipped)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    true_positive = np.diag(matrix)
    support, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
    present = (support + predicted) > 0
    recall = np.divide(true_positive, support, out=np.zeros_like(support), where=support > 0)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(predicted), where=predicted > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return {
        "accuracy": float(true_positive.sum() / max(matrix.sum(), 1)),
        "balanced_accuracy": float(recall[support > 0].mean()) if (support > 0).any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
    }


def make_compute_metrics(num_labels: int):
    """A `compute_metrics(eval_prediction)` for the Trainer, from logits `(N, C)` and labels `(N,)`."""

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        matrix = confusion_matrix(np.argmax(logits, axis=-1), eval_prediction.label_ids, num_labels)
        return classification_metrics(matrix)

    return compute_metrics


def evaluate_and_save(trainer, dataset, label_names: list[str]) -> dict[str, float]:
    """Predict `dataset`, log the metrics, and write `eval_results.json` and `confusion_matrix.png` into the
    trainer's `output_dir`."""
    prediction = trainer.predict(dataset, metric_key_prefix="eval")
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    matrix = confusion_matrix(np.argmax(logits, axis=-1), prediction.label_ids, len(label_names))
    metrics = {**prediction.metrics, **{f"eval_{k}": v for k, v in classification_metrics(matrix).items()}}
    trainer.log(metrics)
    if trainer.is_world_process_zero():
        output_dir = Path(trainer.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        trainer.save_metrics("eval", metrics, combined=False)
        plot_confusion_matrix(matrix, label_names, output_dir / "confusion_matrix.png",
                              title=f"accuracy {metrics.get('eval_accuracy', float('nan')):.3f}")
    return metrics
