"""Accuracy: the fraction of predictions equal to their reference label."""

import evaluate
import numpy as np

from moma_hf.evaluation.metric_scripts.base import class_id_info, class_ids

_DESCRIPTION = """
Accuracy is the proportion of examples whose predicted class equals the reference class:
accuracy = (number of correct predictions) / (number of predictions). It lies in [0, 1].
On imbalanced data it mostly reflects the large classes; see `balanced_accuracy` and `macro_f1`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): reference (true) class ids, as many as `predictions`.

Returns:
    accuracy (`float`): in [0, 1].

Examples:
    >>> accuracy = load_metric("accuracy")  # moma_hf.evaluation.metric_scripts.load_metric
    >>> accuracy.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2])
    {'accuracy': 0.75}
"""

_CITATION = ""


class Accuracy(evaluate.Metric):
    """Accuracy of single-label classification (a moma-hf metric, computed with numpy)."""

    def _info(self):
        return class_id_info(_DESCRIPTION, _KWARGS_DESCRIPTION, _CITATION)

    def _compute(self, predictions, references):
        predictions, references = class_ids(predictions, references, "accuracy")
        return {"accuracy": float(np.mean(predictions == references))}
