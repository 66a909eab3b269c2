"""What the report compares under each ``task.kind``: its primary dev metric and the columns
beside it.

- single_label: the error rate (lower is better; Sun et al.'s Table 6), macro-F1, accuracy;
- multi_label: macro-F1 (every class counts alike: the rare labels domain pretraining should
  help), micro-F1, subset accuracy;
- regression: Pearson's r (STS-B's measure, scale-free), Spearman's rho, MSE.

The primary metric's per-seed values feed the mean +- sd column, the data-size view, Welch's
and the paired tests; "delta vs FiT" is the relative error reduction with error = the error
rate, or 1 - the metric for the others (1 - macro-F1, 1 - Pearson).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Column:
    """A metric of metrics.json (``eval_<key>``), as the report shows it."""

    key: str
    header: str  # the report.md column
    scale: float = 100.0  # shown x100 (a share, a correlation) or as is (MSE)
    shown: bool = True  # in report.md; every column is in report.csv

    def show(self, value: float, *, signed: bool = False) -> str:
        """``12.34`` (x100) or ``0.0123``; ``signed``: a difference, ``+1.23 points``."""
        sign = "+" if signed else ""
        if self.scale == 100:
            return f"{100 * value:{sign}.2f}" + (" points" if signed else "")
        return f"{value:{sign}.4f}"


@dataclass(frozen=True)
class Measure:
    primary: Column
    lower_is_better: bool
    plural: str  # "error rates": the per-seed values, in sentences
    short: str  # "error": a difference, in sentences
    others: tuple[Column, ...]

    def error(self, value: float) -> float:
        """What "delta vs FiT" reduces: the value itself, or 1 - it."""
        return value if self.lower_is_better else 1.0 - value

    @property
    def plot_name(self) -> str:
        return "error_rates" if self.primary.key == "error_rate" else self.primary.key


MEASURES = {
    "single_label": Measure(Column("error_rate", "error rate (%)"), True, "error rates", "error",
                            (Column("macro_f1", "macro-F1 (%)"),
                             Column("accuracy", "accuracy (%)", shown=False))),
    "multi_label": Measure(Column("macro_f1", "macro-F1 (%)"), False, "macro-F1 scores",
                           "macro-F1", (Column("micro_f1", "micro-F1 (%)"),
                                        Column("subset_accuracy", "subset accuracy (%)"))),
    "regression": Measure(Column("pearson", "Pearson r (x100)"), False, "Pearson correlations",
                          "Pearson r", (Column("spearman", "Spearman rho (x100)"),
                                        Column("mse", "MSE", scale=1.0))),
}


def kind_of(cfg: Any) -> str:
    """The experiment's ``task.kind`` (an experiment file from before task kinds: single_label)."""
    return cfg.task.get("kind") or "single_label"


def measure(cfg: Any) -> Measure:
    return MEASURES[kind_of(cfg)]
