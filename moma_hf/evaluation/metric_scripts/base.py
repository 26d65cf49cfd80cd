"""What every shipped metric script shares: class ids in, and a `MetricInfo` built from the script's own texts."""

from __future__ import annotations

import datasets
import evaluate
import numpy as np


def class_id_info(description: str, inputs_description: str, citation: str = "") -> evaluate.MetricInfo:
    """The `MetricInfo` of a single-label classification metric: int64 predictions and references, given to
    `_compute` as numpy arrays."""
    return evaluate.MetricInfo(
        description=description,
        citation=citation,
        inputs_description=inputs_description,
        features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        format="numpy",
    )


def class_ids(predictions, references, metric: str, allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`(predictions, references)` as int64 arrays (an empty input arrives as float); raises when there are none,
    unless `allow_empty`, naming `metric`."""
    predictions, references = np.asarray(predictions).astype(np.int64), np.asarray(references).astype(np.int64)
    if references.size == 0 and not allow_empty:
        raise ValueError(f"{metric} needs at least one prediction.")
    return predictions, references
