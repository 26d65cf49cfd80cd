"""Cohen's kappa: agreement between predictions and references beyond chance, optionally weighted."""

import evaluate
import numpy as np

from moma_hf.evaluation.metric_scripts.base import class_id_info, class_ids

_DESCRIPTION = """
Cohen's kappa compares the observed agreement with the agreement expected by chance from the two label
distributions. With O the confusion matrix of proportions (rows: references, columns: predictions),
E = outer(row sums of O, column sums of O) the matrix expected if predictions were independent of the
references, and W a disagreement weight matrix:

    kappa = 1 - sum(W * O) / sum(W * E)

- `weights=None`: W_ij = 1 for i != j, else 0, which gives kappa = (p_o - p_e) / (1 - p_e) with
  p_o = trace(O) and p_e = trace(E).
- `weights="linear"`: W_ij = |i - j| / (C - 1).
- `weights="quadratic"`: W_ij = (i - j)^2 / (C - 1)^2, the usual choice for ordinal labels such as Gleason
  grades: confusing grades far apart costs more than confusing neighbours.

Class ids are used as ordinal positions (the matrix spans 0 .. max id), so for weighted kappa the ids must
be in the order of the grades. A class absent from both sides therefore still counts in the distance between
its neighbours. (scikit-learn's `cohen_kappa_score` instead measures distances in the sorted list of the
classes that occur; the two agree whenever no class between the smallest and largest id is missing.)

kappa is 1 for perfect agreement, 0 at chance level and negative below it. When there is no expected
disagreement (both sides use one and the same single class) it is undefined and NaN is returned.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids, >= 0.
    references (`list` of `int`): reference (true) class ids, >= 0, as many as `predictions`.
    weights (`str` or `None`, defaults to `None`): `None`, `"linear"` or `"quadratic"`.

Returns:
    cohen_kappa (`float`): in [-1, 1], or NaN when undefined.

Examples:
    >>> metric = load_metric("cohen_kappa")  # moma_hf.evaluation.metric_scripts.load_metric
    >>> metric.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2])  # p_o = 3/4, p_e = 5/16
    {'cohen_kappa': 0.6363636363636364}
    >>> metric.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2], weights="quadratic")
    {'cohen_kappa': 0.8}
"""

_CITATION = """
@article{cohen1960coefficient,
  title={A coefficient of agreement for nominal scales},
  author={Cohen, Jacob},
  journal={Educational and Psychological Measurement},
  volume={20}, number={1}, pages={37--46}, year={1960}
}
@article{cohen1968weighted,
  title={Weighted kappa: nominal scale agreement with provision for scaled disagreement or partial credit},
  author={Cohen, Jacob},
  journal={Psychological Bulletin},
  volume={70}, number={4}, pages={213--220}, year={1968}
}
"""

_POWERS = {None: 0, "linear": 1, "quadratic": 2}


class CohenKappa(evaluate.Metric):
    """Cohen's kappa, plain or linearly/quadratically weighted (a moma-hf metric, computed with numpy)."""

    def _info(self):
        return class_id_info(_DESCRIPTION, _KWARGS_DESCRIPTION, _CITATION)

    def _compute(self, predictions, references, weights=None):
        if weights not in _POWERS:
            raise ValueError(f"weights must be None, 'linear' or 'quadratic', got {weights!r}.")
        predictions, references = class_ids(predictions, references, "cohen_kappa")
        if min(predictions.min(), references.min()) < 0:
            raise ValueError("cohen_kappa needs class ids >= 0 (they are used as ordinal positions).")
        num_classes = int(max(predictions.max(), references.max())) + 1
        counts = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(counts, (references, predictions), 1)
        distance = np.abs(np.subtract.outer(np.arange(num_classes), np.arange(num_classes)))
        power = _POWERS[weights]
        # Unweighted, every disagreement costs 1 (distance**0 would also put 1 on the diagonal). The (C - 1)**power
        # scale of the weights cancels in the ratio, so integer weights serve, and with counts in place of
        # proportions (O = counts / n, E = outer(rows, columns) / n**2) both sums are exact Python integers:
        # kappa is exactly 0 at chance level instead of a rounding error away from it.
        weight = (distance > 0).astype(np.int64) if power == 0 else distance**power
        observed = references.size * int(np.sum(weight * counts))
        margins = np.outer(counts.sum(axis=1).astype(object), counts.sum(axis=0).astype(object))
        expected = int(np.sum(weight.astype(object) * margins))
        if expected == 0:
            return {"cohen_kappa": float("nan")}
        return {"cohen_kappa": 1.0 - observed / expected}
