"""The dev metrics of multi-label classification and regression (single-label's are
:func:`.evaluation.compute_metrics`').

Multi-label, from the (row, class) decisions at a threshold: per-class F1 = 2TP / (2TP + FP +
FN), 0 for a class with neither a prediction nor a reference (scikit-learn's
``zero_division=0``); macro-F1 their mean over every training class; micro-F1 the same
formula on the counts summed over classes; subset accuracy the share of rows whose
predicted set is exactly the true one (scikit-learn's ``accuracy_score`` on label sets);
Hamming loss the share of wrong (row, class) decisions. ``threshold="tune"`` picks, from
0.05 to 0.95 in steps of 0.05, the threshold with the best ``eval.metric`` on the dev set
(ties: the one nearest 0.5): the dev metrics are then those of a threshold chosen on dev,
optimistic as the best epoch's are; the saved model predicts with it.

Regression: Pearson's r and Spearman's rho (scipy, a dependency of further_pt; a constant
prediction or reference has no correlation: 0, not NaN, so the best epoch can still be
chosen), the mean squared and absolute errors.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))


def multi_label(probabilities: Any, references: Any, names: Sequence[str], *, prefix: str,
                threshold: float | str, metric: str) -> dict[str, Any]:
    """Micro/macro-F1, subset accuracy, Hamming loss and per-class F1 at ``threshold``
    (``"tune"``: the best of :data:`THRESHOLDS` by ``metric``); ``{prefix}threshold`` says which."""
    probs = np.asarray(probabilities, dtype=np.float64).reshape(-1, len(names))
    truth = np.asarray(references, dtype=np.float64).reshape(-1, len(names)) > 0.5
    if threshold == "tune":
        found = {t: _label_sets(probs >= t, truth) for t in THRESHOLDS}
        threshold = max(THRESHOLDS, key=lambda t: (found[t][metric], -abs(t - 0.5), -t))
    values = _label_sets(probs >= float(threshold), truth)
    per_class = values.pop("per_class_f1")
    return {**{f"{prefix}{k}": v for k, v in values.items()},
            f"{prefix}per_label_f1": dict(zip(names, per_class, strict=True)),
            f"{prefix}threshold": float(threshold), f"{prefix}examples": len(truth)}


def _label_sets(pred: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    tp = (pred & truth).sum(0).astype(np.float64)
    wrong = (pred & ~truth).sum(0) + (~pred & truth).sum(0)
    per_class = np.divide(2 * tp, 2 * tp + wrong, out=np.zeros_like(tp), where=tp > 0)
    micro = 2 * tp.sum() / (2 * tp.sum() + wrong.sum()) if tp.sum() else 0.0
    return {"micro_f1": float(micro), "macro_f1": float(per_class.mean()),
            "subset_accuracy": float((pred == truth).all(1).mean()),
            "hamming_loss": float((pred != truth).mean()),
            "per_class_f1": [float(x) for x in per_class]}


def regression(values: Any, references: Any, *, prefix: str) -> dict[str, Any]:
    """Pearson, Spearman (0 where either side is constant), MSE and MAE."""
    from scipy import stats

    pred = np.asarray(values, dtype=np.float64).reshape(-1)
    ref = np.asarray(references, dtype=np.float64).reshape(-1)
    varies = len(pred) > 1 and np.ptp(pred) > 0 and np.ptp(ref) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pearson = float(stats.pearsonr(pred, ref)[0]) if varies else 0.0
        spearman = float(stats.spearmanr(pred, ref)[0]) if varies else 0.0
    return {f"{prefix}pearson": pearson, f"{prefix}spearman": spearman,
            f"{prefix}mse": float(np.mean((pred - ref) ** 2)),
            f"{prefix}mae": float(np.mean(np.abs(pred - ref))), f"{prefix}examples": len(ref)}
