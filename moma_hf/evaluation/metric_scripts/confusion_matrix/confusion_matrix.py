"""The confusion matrix of single-label classification: counts of (reference, prediction) pairs."""

import evaluate
import numpy as np

from moma_hf.evaluation.metric_scripts.base import class_id_info, class_ids

_DESCRIPTION = """
The confusion matrix M has one row per reference (true) class and one column per predicted class:
M[i, j] is the number of examples of class i predicted as class j. Its diagonal holds the correct
predictions, its row sums the class supports and its total the number of examples.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids, in [0, num_labels).
    references (`list` of `int`): reference (true) class ids, in [0, num_labels), as many as `predictions`.
    num_labels (`int`, optional): the number of classes C, which fixes the shape (C, C) even when the last
        classes never occur; defaults to the largest id + 1.

Returns:
    confusion_matrix (`numpy.ndarray` of `int64`, shape (C, C)): rows are references, columns predictions.

Examples:
    >>> metric = load_metric("confusion_matrix")  # moma_hf.evaluation.metric_scripts.load_metric
    >>> metric.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2], num_labels=3)["confusion_matrix"]
    array([[1, 0, 0],
           [0, 1, 1],
           [0, 0, 1]])
"""

_CITATION = ""


class ConfusionMatrix(evaluate.Metric):
    """Confusion matrix of single-label classification (a moma-hf metric, computed with numpy)."""

    def _info(self):
        return class_id_info(_DESCRIPTION, _KWARGS_DESCRIPTION, _CITATION)

    def _compute(self, predictions, references, num_labels=None):
        predictions, references = class_ids(predictions, references, "confusion_matrix", allow_empty=True)
        if num_labels is None:
            if references.size == 0:
                raise ValueError("confusion_matrix needs num_labels when there are no predictions.")
            num_labels = int(max(predictions.max(), references.max())) + 1
        for name, ids in (("predictions", predictions), ("references", references)):
            outside = np.unique(ids[(ids < 0) | (ids >= num_labels)])
            if outside.size:
                raise ValueError(f"{name} hold class ids outside [0, {num_labels}): {outside[:10].tolist()}.")
        matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
        np.add.at(matrix, (references, predictions), 1)
        return {"confusion_matrix": matrix}
