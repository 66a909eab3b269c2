"""Confusion matrix: rows are references, columns predictions, in ``labels`` order."""

import datasets
import evaluate
import numpy as np


class ConfusionMatrix(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="counts[i][j] = examples of class labels[i] predicted as labels[j]",
            citation="",
            inputs_description="predictions, references: lists of int class ids; labels: ids",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, labels=None) -> dict:
        p, r = np.asarray(predictions), np.asarray(references)
        labels = sorted(set(r.tolist()) | set(p.tolist())) if labels is None else list(labels)
        index = {label: i for i, label in enumerate(labels)}
        counts = np.zeros((len(labels), len(labels)), dtype=np.int64)
        for ref, pred in zip(r.tolist(), p.tolist(), strict=True):
            counts[index[ref], index[pred]] += 1
        return {"confusion_matrix": counts.tolist()}
