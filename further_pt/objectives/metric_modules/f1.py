"""F1 per class and macro-averaged (``average="macro"`` / ``None``), as the hub's ``f1``.

A class with no prediction and no reference counts F1 = 0 in the macro average
when it is listed in ``labels`` (scikit-learn's ``zero_division=0``).
"""

import datasets
import evaluate
import numpy as np


class F1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="F1 = 2PR / (P + R) per class; macro = their unweighted mean.",
            citation="",
            inputs_description="predictions, references: lists of int class ids; labels: ids",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, labels=None, average="macro") -> dict:
        p, r = np.asarray(predictions), np.asarray(references)
        labels = sorted(set(r.tolist()) | set(p.tolist())) if labels is None else list(labels)
        scores = []
        for label in labels:
            tp = float(((p == label) & (r == label)).sum())
            fp = float(((p == label) & (r != label)).sum())
            fn = float(((p != label) & (r == label)).sum())
            scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        if average is None:
            return {"f1": scores}
        return {"f1": float(np.mean(scores)) if scores else 0.0}
