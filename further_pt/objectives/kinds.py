"""Task kinds (``task.kind``): what a row's label is, and what that makes of the labels read, the
training subsample, the classifier's outputs, its loss and the predictions written.

- ``single_label``: one class per row; one logit per class, softmax, cross-entropy;
- ``multi_label``: a list of classes per row; one logit per class, a sigmoid each, binary
  cross-entropy;
- ``regression``: a number per row; one output, as is, mean squared error.

The saved config's ``problem_type`` says which (``multi_label_classification``,
``regression``), so ``AutoModelForSequenceClassification`` and ``pipeline("text-
classification", top_k=None)`` apply a sigmoid per class, or nothing, as for HF's own models.
A multi-label class is predicted when its probability reaches ``task.threshold``
(:mod:`.scoring` tunes it on dev with ``task.threshold=tune``). The metrics of each kind
are :func:`.evaluation.compute`'s; the labels' shapes and checks are
:mod:`further_pt.data.targets`'.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import torch
import torch.nn.functional as F

from further_pt.config.tasks import EVAL_METRICS
from further_pt.data import labelled, targets

#: ``eval.metric``'s choices per kind (``auto`` is the first; validation resolves it).
METRICS = EVAL_METRICS
KINDS = tuple(METRICS)
PROBLEM_TYPES = {"single_label": None, "multi_label": "multi_label_classification",
                 "regression": "regression"}


def resolve_metric(kind: str, metric: str) -> str:
    """``eval.metric``: ``auto`` is the kind's first metric (accuracy, micro_f1, pearson)."""
    return METRICS[kind][0] if metric == "auto" else metric


def read(ds: datasets.Dataset, column: str, path: str, kind: str,
         names: list[str] | None = None) -> tuple[list[str], list[Any]]:
    """(names, encoded labels) of ``ds[column]``; ``names`` None: those of this (training) data.

    Encoded: class ids (single_label), multi-hot rows of floats (multi_label: the classes of
    a hub dataset's ``Sequence(ClassLabel)`` are its names, in its order), floats
    (regression, whose one output is named after the label column). A label training never
    saw is a ConfigError naming the file and row.
    """
    if kind == "single_label":
        names = names or labelled.label_names(ds, column, path)
        return names, labelled.encode_labels(ds, column, names, path)
    labelled.check_labels(ds, column, path, targets.ROLES[kind])
    values = list(ds[column])
    inner = getattr(ds.features.get(column), "feature", None)
    if kind == "multi_label" and isinstance(inner, datasets.ClassLabel):
        values = [[inner.int2str(i) for i in row] for row in values]  # a hub dataset's names,
        names = names or list(inner.names)  # in its own order
    if kind == "multi_label":
        names = names or targets.label_set_names(values, path)
        return names, targets.encode_label_sets(values, names, path)
    return names or [column], targets.encode_targets(values)


def sample(values: Sequence[Any], n: int, seed: int, *, kind: str, num_names: int,
           where: str) -> list[int]:
    """The seeded, stratified ``data.max_train_examples`` rows (:mod:`.targets` for the strata
    of label sets and targets): the same rows for a seed whatever the model."""
    if kind == "single_label":
        return targets.stratified_subsample(values, n, seed, num_classes=num_names,
                                             where=where)
    if kind == "multi_label":
        strata = targets.label_set_strata(values)
        return targets.stratified_subsample(
            strata, n, seed, num_classes=num_names + 1, where=where,
            unit=("stratum", "label strata (rows' rarest labels)"))
    strata, bins = targets.target_strata(values, n)
    return targets.stratified_subsample(strata, n, seed, num_classes=bins, where=where,
                                         unit=("bin", "target bins"))


def describe(kept: Sequence[Any], names: Sequence[str], total: int, kind: str) -> str:
    """The log line of a subsample."""
    if kind == "single_label":
        return targets.describe_subsample(kept, names, total)
    if kind == "multi_label":
        return targets.describe_label_sets(kept, names, total)
    return targets.describe_targets(kept, total)


def num_outputs(kind: str, names: Sequence[str]) -> int:
    return 1 if kind == "regression" else len(names)


def loss(kind: str, logits: torch.Tensor, labels: torch.Tensor,
         weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, tuple[Any, Any]]]:
    """The training loss and the running metric logged beside it (summed on the device):
    accuracy; the share of (row, class) decisions right at 0.5; the mean absolute error.
    ``weight``: single-label class weights (``train.class_weights``), torch's weighted mean."""
    if kind == "single_label":
        correct = (logits.detach().argmax(-1) == labels).sum()
        return (F.cross_entropy(logits, labels, weight=weight),
                {"accuracy": (correct, labels.shape[0])})
    if kind == "multi_label":
        right = ((logits.detach() > 0) == (labels > 0.5)).sum()
        return (F.binary_cross_entropy_with_logits(logits, labels),
                {"label_accuracy": (right, labels.numel())})
    values = logits.squeeze(-1)
    error = (values.detach() - labels).abs().sum()
    return F.mse_loss(values, labels), {"abs_error": (error, labels.shape[0])}


def scores(kind: str, logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities (softmax; sigmoid per class), or the predicted values (N,)."""
    logits = logits.float()
    if kind == "single_label":
        return logits.softmax(-1)
    if kind == "multi_label":
        return logits.sigmoid()
    return logits[:, 0]


def predicted(kind: str, score: Any, names: Sequence[str], threshold: float) -> dict[str, Any]:
    """What predict writes for one row: the class, the label set or the value; probabilities."""
    if kind == "regression":
        return {"prediction": float(score)}
    probabilities = dict(zip(names, [round(p, 6) for p in score], strict=True))
    if kind == "multi_label":
        chosen = [n for n, p in zip(names, score, strict=True) if p >= threshold]
        return {"prediction": chosen, "probabilities": probabilities}
    best = max(range(len(names)), key=lambda i: score[i])
    return {"prediction": names[best], "probabilities": probabilities}
