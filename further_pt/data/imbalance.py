"""Imbalanced classes: the per-class weights of a weighted cross-entropy (``train.class_weights``).

A rare class contributes little to a mean loss and a classifier can ignore it at small cost;
weighting each example's loss by its class restores its say. ``balanced`` is scikit-learn's
``class_weight="balanced"``: ``n_samples / (n_classes * count_c)``, counted on the training
rows the run actually uses (after ``data.invalid_rows=skip`` and ``data.max_train_examples``),
so a class of average size gets 1. A mapping ``{label: weight}`` names classes by label; a
class it leaves out keeps weight 1, as in scikit-learn.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

from further_pt.config.validate import CLASS_WEIGHTS, check_class_weights
from further_pt.errors import ConfigError


def class_weights(setting: Any, names: Sequence[str], labels: Sequence[int]
                  ) -> list[float] | None:
    """The weight of each class id (``names`` order) for ``setting``; None for null.

    ``labels`` are the training rows' class ids. ``balanced`` gives a class absent from
    them (a ``ClassLabel`` name no row has) 0: it has no example to weigh. A mapping's
    labels are checked by :func:`check_labels`.
    """
    if setting is None:
        return None
    check_class_weights(setting)
    if setting == "balanced":
        counts = Counter(labels)
        return [len(labels) / (len(names) * counts[i]) if counts[i] else 0.0
                for i in range(len(names))]
    given = {str(label): float(weight) for label, weight in setting.items()}
    return [given.get(name, 1.0) for name in names]


def check_labels(setting: Any, classes: Collection[str], where: str) -> None:
    """A mapping's label that is no class of ``where`` (the training data): an error naming
    the key and the classes. With several tasks, ``classes`` is every task's."""
    if setting is None or isinstance(setting, str):
        return
    unknown = sorted({str(label) for label in setting} - set(classes))
    if unknown:
        raise ConfigError(f"config key '{CLASS_WEIGHTS}.{unknown[0]}': {where} has no class "
                          f"{unknown[0]!r} (classes: {', '.join(classes)})")


def describe(weights: Sequence[float], names: Sequence[str]) -> str:
    """The log line's part: ``neg 0.625, pos 2.5``."""
    return ", ".join(f"{name} {w:.4g}" for name, w in zip(names, weights, strict=True))
