"""Macro-F1: the unweighted mean of the per-class F1 scores."""

import evaluate
import numpy as np

from moma_hf.evaluation.metric_scripts.base import class_id_info, class_ids

_DESCRIPTION = """
For each class c, F1 is the harmonic mean of its precision and recall, which simplifies to
F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c). Macro-F1 is the plain mean of F1_c over the classes that occur in
`references` or in `predictions` (a class absent from both has no F1 and is left out; a class that is
predicted but never a reference has F1 = 0). Every class counts the same, whatever its size.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): reference (true) class ids, as many as `predictions`.
    average (`str` or `None`, defaults to `"macro"`): `"macro"` returns the mean; `None` returns the
        per-class scores (and the classes they belong to) instead.

Returns:
    macro_f1 (`float`): in [0, 1], when `average="macro"`.
    f1 (`list` of `float`) and classes (`list` of `int`): per-class F1, when `average=None`.

Examples:
    >>> metric = load_metric("macro_f1")  # moma_hf.evaluation.metric_scripts.load_metric
    >>> metric.compute(predictions=[0, 1, 1, 1], references=[0, 1, 1, 0])  # F1: 2/3 (class 0), 4/5 (class 1)
    {'macro_f1': 0.7333333333333334}
"""

_CITATION = """
@book{vanrijsbergen1979information,
  title={Information Retrieval},
  author={van Rijsbergen, C. J.},
  edition={2nd},
  publisher={Butterworths},
  year={1979}
}
"""


class MacroF1(evaluate.Metric):
    """Macro-averaged F1 of single-label classification (a moma-hf metric, computed with numpy)."""

    def _info(self):
        return class_id_info(_DESCRIPTION, _KWARGS_DESCRIPTION, _CITATION)

    def _compute(self, predictions, references, average="macro"):
        if average not in ("macro", None):
            raise ValueError(f"average must be 'macro' or None, got {average!r}.")
        predictions, references = class_ids(predictions, references, "macro_f1")
        classes = np.union1d(references, predictions)
        correct = predictions == references
        true_positive = np.array([np.sum(correct & (references == c)) for c in classes])
        # FP_c + FN_c + 2 TP_c = (times c is predicted) + (times c is a reference): never 0 for these classes.
        total = np.array([np.sum(predictions == c) + np.sum(references == c) for c in classes])
        f1 = 2 * true_positive / total
        if average is None:
            return {"f1": f1.tolist(), "classes": classes.tolist()}
        return {"macro_f1": float(np.mean(f1))}
