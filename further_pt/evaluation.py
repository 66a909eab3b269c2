"""Evaluation: predictions over a dataset and the metrics of a classifier.

Metrics are computed with the ``evaluate`` library from metric modules shipped
in ``further_pt/metric_modules`` and loaded by local path, so they work offline
and give online and offline users the same numbers (``evaluate.load("accuracy")``
fetches its script from the hub). ``evaluate`` is imported lazily: it costs
seconds.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

MODULES = Path(__file__).resolve().parent / "metric_modules"


@cache
def _metric(name: str) -> Any:
    import evaluate

    return evaluate.load(str(MODULES / f"{name}.py"))


def compute_metrics(predictions: list[int], references: list[int], label_names: list[str],
                    prefix: str = "eval_") -> dict[str, Any]:
    """Accuracy, error rate, macro-F1, per-class F1 and the confusion matrix."""
    ids = list(range(len(label_names)))
    accuracy = _metric("accuracy").compute(predictions=predictions,
                                           references=references)["accuracy"]
    per_class = _metric("f1").compute(predictions=predictions, references=references,
                                      labels=ids, average=None)["f1"]
    matrix = _metric("confusion_matrix").compute(predictions=predictions, references=references,
                                                 labels=ids)["confusion_matrix"]
    return {
        f"{prefix}accuracy": accuracy,
        f"{prefix}error_rate": 1.0 - accuracy,
        f"{prefix}macro_f1": sum(per_class) / len(per_class),
        f"{prefix}per_class_f1": dict(zip(label_names, per_class, strict=True)),
        f"{prefix}confusion_matrix": matrix,
        f"{prefix}examples": len(references),
    }


@torch.no_grad()
def predict(classifier: torch.nn.Module, loader: DataLoader, device: torch.device,
            task: str | None = None) -> tuple[list[int], list[int], list[list[float]]]:
    """(predicted ids, reference ids, probabilities) over ``loader``, in order."""
    was_training = classifier.training
    classifier.eval()
    preds, refs, probs = [], [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = classifier(**batch, task=task).float()
        p = logits.softmax(-1)
        preds += p.argmax(-1).tolist()
        probs += p.tolist()
        refs += labels.tolist()
    classifier.train(was_training)
    return preds, refs, probs


def is_better(metric: str, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return new < best if metric == "error_rate" else new > best
