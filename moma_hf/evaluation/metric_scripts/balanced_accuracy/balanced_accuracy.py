"""Balanced accuracy: the mean of the per-class recalls, over the classes present in the references."""

import evaluate
import numpy as np

from moma_hf.evaluation.metric_scripts.base import class_id_info, class_ids

_DESCRIPTION = """
Balanced accuracy is the average, over the classes that occur in `references`, of each class's recall
(the fraction of that class's examples predicted as that class). Each class weighs the same whatever its
size, so a model that ignores a rare class is penalised. A class that is only predicted, never a reference,
has no recall and is left out (its false positives still lower the recall of the true classes).

With `adjusted=True` the score is rescaled so that chance level (recall 1/K for each of K classes) gives 0
and perfect prediction gives 1: (score - 1/K) / (1 - 1/K). It is then negative for worse than chance, and
NaN (undefined) when the references hold a single class.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): reference (true) class ids, as many as `predictions`.
    adjusted (`bool`, defaults to `False`): rescale so that chance level is 0.

Returns:
    balanced_accuracy (`float`): in [0, 1] (or [-1/(K-1), 1] when adjusted).

Examples:
    >>> metric = load_metric("balanced_accuracy")  # moma_hf.evaluation.metric_scripts.load_metric
    >>> metric.compute(predictions=[0, 0, 0, 1], references=[0, 0, 0, 1])
    {'balanced_accuracy': 1.0}
    >>> metric.compute(predictions=[0, 0, 0, 0], references=[0, 0, 0, 1])  # recalls 1 and 0
    {'balanced_accuracy': 0.5}
"""

_CITATION = """
@inproceedings{brodersen2010balanced,
  title={The balanced accuracy and its posterior distribution},
  author={Brodersen, Kay H. and Ong, Cheng Soon and Stephan, Klaas E. and Buhmann, Joachim M.},
  booktitle={20th International Conference on Pattern Recognition},
  pages={3121--3124},
  year={2010}
}
"""


class BalancedAccuracy(evaluate.Metric):
    """Balanced accuracy of single-label classification (a moma-hf metric, computed with numpy)."""

    def _info(self):
        return class_id_info(_DESCRIPTION, _KWARGS_DESCRIPTION, _CITATION)

    def _compute(self, predictions, references, adjusted=False):
        predictions, references = class_ids(predictions, references, "balanced_accuracy")
        classes, counts = np.unique(references, return_counts=True)
        # Correct predictions per reference class: the classes of the correct examples, counted.
        correct = np.array([np.sum(predictions[references == c] == c) for c in classes])
        score = float(np.mean(correct / counts))
        if adjusted:
            chance = 1.0 / len(classes)
            # One reference class: chance level is already 1, so no rescaling is defined.
            score = (score - chance) / (1.0 - chance) if len(classes) > 1 else float("nan")
        return {"balanced_accuracy": score}
