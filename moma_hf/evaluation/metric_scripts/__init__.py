"""Classification metrics shipped with moma-hf as `evaluate` modules, loaded from their path, so they work offline.

Each metric is a script ``moma_hf/evaluation/metric_scripts/<name>/<name>.py`` holding one
:class:`evaluate.Metric` whose ``_compute`` is plain numpy. ``evaluate.load("accuracy")`` would fetch a script
from the Hub (and the evaluate wheel ships none); :func:`load_metric` instead gives ``evaluate.load`` the
script's local path, which needs no network::

    from moma_hf.evaluation.metric_scripts import load_metric
    load_metric("cohen_kappa").compute(predictions=[0, 1, 2], references=[0, 2, 2], weights="quadratic")

============================  ======================================  =====================================
name                          ``compute`` keyword arguments           result keys
============================  ======================================  =====================================
``accuracy``                  (none)                                  ``accuracy``
``balanced_accuracy``         ``adjusted=False``                      ``balanced_accuracy``
``macro_f1``                  ``average="macro"`` (or ``None``)       ``macro_f1`` (or ``f1``, ``classes``)
``cohen_kappa``               ``weights=None|"linear"|"quadratic"``   ``cohen_kappa``
``confusion_matrix``          ``num_labels=None``                     ``confusion_matrix`` (ndarray)
============================  ======================================  =====================================

``evaluate.load`` copies a script into ``HF_MODULES_CACHE`` (``$HF_HOME/modules``) to import it, and makes a
folder under ``HF_METRICS_CACHE``. When either is not writable (a read-only home in CI), the scripts are
imported from a temporary folder instead, removed when the process exits.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path

__all__ = ["METRIC_NAMES", "METRICS_DIR", "load_metric", "metric_path"]

logger = logging.getLogger(__name__)

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("accuracy", "balanced_accuracy", "macro_f1", "cohen_kappa", "confusion_matrix")

# Created on first need and deleted at interpreter exit (TemporaryDirectory's finaliser).
_temp_cache: tempfile.TemporaryDirectory | None = None


def metric_path(name: str) -> Path:
    """The script of the shipped metric `name` (one of `METRIC_NAMES`)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; moma-hf ships {list(METRIC_NAMES)}.")
    return METRICS_DIR / name / f"{name}.py"


@functools.lru_cache(maxsize=None)
def load_metric(name: str):
    """The shipped metric `name` as an `evaluate.EvaluationModule`, loaded once per process and kept in memory.

    The instance is shared by every caller (call `compute(predictions=..., references=...)` on it, which leaves
    no state behind); it is not meant for concurrent use from several threads.
    """
    import evaluate

    path = metric_path(name)
    if _is_writable(Path(evaluate.config.HF_MODULES_CACHE)) and _is_writable(Path(evaluate.config.HF_METRICS_CACHE)):
        # keep_in_memory: predictions go through an in-memory Arrow buffer, not cache files and their locks.
        return evaluate.load(str(path), keep_in_memory=True)
    return _load_with_temp_cache(path)


def _is_writable(folder: Path) -> bool:
    """Whether files can be created in `folder` (created if missing), which `evaluate.load` needs."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _load_with_temp_cache(path: Path):
    """Load the metric script at `path` like `evaluate.load`, with both caches in a temporary folder.

    The one place that uses `evaluate`'s loader internals (`evaluate.loading.init_dynamic_modules`,
    `evaluation_module_factory`, `import_main_class`), because `evaluate` has no public API for this: `evaluate.load`
    takes a `cache_dir` for the metric's data only, and always copies the script into the global
    `HF_MODULES_CACHE`, which a read-only home cannot take. These are the calls `evaluate.load` itself makes, with
    our folder in place of the global one. `test_metrics_load_offline_with_read_only_caches` runs this path for real,
    so an `evaluate` upgrade that changes them breaks that test, not a training run.
    """
    from evaluate.loading import evaluation_module_factory, import_main_class, init_dynamic_modules

    global _temp_cache
    if _temp_cache is None:
        _temp_cache = tempfile.TemporaryDirectory(prefix="moma_hf_metrics_")
        logger.info(f"The evaluate caches are not writable; metric scripts are imported from {_temp_cache.name}.")
    root = _temp_cache.name
    # A package name of its own, so it cannot collide with an `evaluate_modules` package of a read-only cache.
    modules = init_dynamic_modules(name="moma_hf_evaluate_modules", hf_modules_cache=root)
    module = evaluation_module_factory(str(path), dynamic_modules_path=modules)
    metric_class = import_main_class(module.module_path)
    return metric_class(keep_in_memory=True, cache_dir=root, hash=module.hash)
