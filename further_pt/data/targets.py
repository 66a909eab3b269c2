"""Labels beyond one class per row: label sets (multi-label) and numeric targets (regression).

``task.kind=multi_label``: each row's label is a list of class names (strings or integers;
``[]`` for a row with none), e.g. ``{"text": "...", "label": ["billing", "urgent"]}``. The
classes are those of the training data (integers in their numeric order, else names sorted),
and a row becomes a multi-hot vector over them. JSON lines, JSON and parquet hold lists;
a CSV cell cannot, so a string there is an error that says so.

``task.kind=regression``: each row's label is a finite number (a number, or a CSV cell
holding one); NaN and infinities are refused, they would poison the MSE loss.

The low-label regime (``data.max_train_examples``) stratifies on one stratum per row
(:func:`label_set_strata`, :func:`target_strata`), drawn by
:func:`stratified_subsample` like classes are:

- a label set by its **rarest label** (its fewest rows in the training file; ties: the
  first class), rows without labels form a stratum of their own: every label that is some
  row's rarest keeps rows in proportion, and rare labels are not left out of a small sample
  the way a random draw leaves them out;
- a target by its **quantile bin**: the rows sorted by target and cut into ``min(10, n)``
  bins of equal size, so the sample spans the target's range in proportion.

Everything here is pure Python on lists: the readers and the value checks of every row are
:mod:`.labelled`'s, which calls :func:`value_problem` for these two shapes.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

from further_pt.errors import ConfigError

#: The role of the label column under each ``task.kind`` (:func:`labelled.value_problem`).
ROLES = {"single_label": "label", "multi_label": "label_set", "regression": "target"}
TARGET_BINS = 10  # quantile bins of a regression target when subsampling


def _a(value: Any) -> str:
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def value_problem(value: Any, role: str) -> str | None:
    """Why a non-null ``value`` cannot be a label set / a target, or ``None`` when it can."""
    if role == "label_set":
        if not isinstance(value, list | tuple):
            return f"holds {_a(value)}, not a list of labels"
        for item in value:
            if isinstance(item, bool) or not isinstance(item, str | int):
                return f"holds a list with {_a(item)} in it, not labels (strings or integers)"
            if isinstance(item, str) and not item.strip():
                return "holds a list with an empty label in it"
        return None
    if isinstance(value, str):
        if not value.strip():
            return "is empty" if not value else "is blank"
        try:
            value = float(value)
        except ValueError:
            return "holds a str, not a number"
    elif isinstance(value, bool) or not isinstance(value, int | float):
        return f"holds {_a(value)}, not a number"
    return None if math.isfinite(value) else "is not a finite number"


def advice(value: Any, role: str) -> str:
    """What to change when a label does not fit ``task.kind`` (said after the bad value)."""
    if value is None:
        return ""
    if role == "label" and isinstance(value, list | tuple):
        return "rows with a list of labels need task.kind=multi_label"
    if role == "label" and isinstance(value, float):
        return "numeric targets need task.kind=regression"
    if role == "label_set" and not isinstance(value, list | tuple):
        return ("task.kind=multi_label reads a list per row (e.g. [\"a\", \"b\"]; [] for none), "
                "from .jsonl, .json or .parquet: a csv cell holds no list")
    return ""


# --------------------------------------------------------------------------- label sets


def label_set_names(values: Sequence[Sequence[Any]], where: str) -> list[str]:
    """The classes of the training label sets: integers in numeric order, else names sorted."""
    seen = {v for row in values for v in row}
    if not seen:
        raise ConfigError(f"{where}: no row has a label (every list is empty); "
                          "task.kind=multi_label needs at least one class")
    if all(isinstance(v, int) for v in seen):
        return [str(v) for v in sorted(seen)]
    return sorted({str(v) for v in seen})


def encode_label_sets(values: Sequence[Sequence[Any]], names: list[str], where: str
                      ) -> list[list[float]]:
    """Multi-hot rows over ``names``; a label training never saw is an error naming the row."""
    index = {name: i for i, name in enumerate(names)}
    rows = []
    for row, labels in enumerate(values):
        vector = [0.0] * len(names)
        for label in labels:
            if str(label) not in index:
                raise ConfigError(f"{where}: row {row + 1} has label {str(label)!r} in its list, "
                                  f"which the training data does not have (labels: "
                                  f"{', '.join(names)})")
            vector[index[str(label)]] = 1.0
        rows.append(vector)
    return rows


def label_set_strata(rows: Sequence[Sequence[float]]) -> list[int]:
    """Each row's stratum: its rarest label's id; rows without labels: ``len(classes)``."""
    counts = [sum(col) for col in zip(*rows, strict=True)] if rows else []
    strata = []
    for vector in rows:
        held = [i for i, x in enumerate(vector) if x]
        strata.append(min(held, key=lambda i: (counts[i], i)) if held else len(vector))
    return strata


def describe_label_sets(kept: Sequence[Sequence[float]], names: Sequence[str], total: int
                        ) -> str:
    """``kept 9 of 60 training examples; rows per label: billing 5, urgent 3, (none) 1``."""
    per_label = [int(sum(col)) for col in zip(*kept, strict=True)] if kept else []
    empty = sum(1 for vector in kept if not any(vector))
    shares = [f"{name} {n}" for name, n in zip(names, per_label, strict=True) if n]
    shares += [f"(none) {empty}"] if empty else []
    return f"kept {len(kept)} of {total} training examples; rows per label: {', '.join(shares)}"


# --------------------------------------------------------------------------- numeric targets


def encode_targets(values: Sequence[Any]) -> list[float]:
    """The targets as floats (a CSV cell's text read as a number; checked when read)."""
    return [float(v) for v in values]


def target_strata(targets: Sequence[float], n: int) -> tuple[list[int], int]:
    """(each row's quantile bin, the number of bins): rows sorted by target (ties: by row)
    and cut into ``min(TARGET_BINS, n, rows)`` bins of (nearly) equal size."""
    bins = max(1, min(TARGET_BINS, n, len(targets)))
    order = sorted(range(len(targets)), key=lambda i: (targets[i], i))
    strata = [0] * len(targets)
    for rank, row in enumerate(order):
        strata[row] = rank * bins // len(targets)
    return strata, bins


def describe_targets(kept: Sequence[float], total: int) -> str:
    """``kept 9 of 60 training examples; targets 0.2 to 4.8, mean 2.51``."""
    return (f"kept {len(kept)} of {total} training examples; targets {min(kept):g} to "
            f"{max(kept):g}, mean {statistics.mean(kept):.3g}")


def stratified_subsample(labels: Sequence[int], n: int, seed: int, *, num_classes: int,
                         where: str, unit: tuple[str, str] = ("class", "classes")) -> list[int]:
    """Sorted row indices of a seeded, stratified sample of ``n`` rows (the low-label regime).

    Each class present gets a share proportional to its size (largest remainder,
    ties to the larger class, then the lower id) and at least one row. Only
    (labels, n, seed) decide the sample, never a model or tokenizer, so every
    starting model of an experiment fine-tunes on the same examples for a seed. ``labels``
    may be strata other than classes (:mod:`.targets`); ``unit`` names them in errors.
    """
    key = "config key 'data.max_train_examples'"
    if n < 1:
        raise ConfigError(f"{key}: {n} must be at least 1")
    by_class: dict[int, list[int]] = {}
    for row, label in enumerate(labels):
        if not 0 <= label < num_classes:
            raise ValueError(f"{where}: row {row} has label id {label}, not in [0, {num_classes})")
        by_class.setdefault(label, []).append(row)
    if n < len(by_class):
        raise ConfigError(f"{key}: {n} is below the {len(by_class)} {unit[1]} of {where}: every "
                          f"{unit[0]} needs an example")
    if n > len(labels):
        raise ConfigError(f"{key}: {n} exceeds the {len(labels)} rows of {where}")
    quota = {c: n * len(rows) / len(labels) for c, rows in by_class.items()}
    take = {c: max(1, int(q)) for c, q in quota.items()}
    while sum(take.values()) < n:  # the largest remainders get one more
        c = max((c for c in take if take[c] < len(by_class[c])),
                key=lambda c: (quota[c] - take[c], len(by_class[c]), -c))
        take[c] += 1
    while sum(take.values()) > n:  # minimums of 1 overshot: the largest surpluses give one back
        c = max((c for c in take if take[c] > 1),
                key=lambda c: (take[c] - quota[c], len(by_class[c]), -c))
        take[c] -= 1
    rng = random.Random(seed)
    chosen = [row for c in sorted(by_class) for row in rng.sample(by_class[c], take[c])]
    return sorted(chosen)


def describe_subsample(labels_kept: Sequence[int], names: Sequence[str], total: int) -> str:
    """The one log line of a subsample: ``kept 40 of 4037 training examples: admin 4, ...``."""
    counts = Counter(labels_kept)
    shares = ", ".join(f"{name} {counts[i]}" for i, name in enumerate(names) if counts[i])
    return f"kept {len(labels_kept)} of {total} training examples: {shares}"
