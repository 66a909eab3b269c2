"""Paired comparisons for the report: each variant against BERT-FiT, seed by seed.

At a seed, every row of the grid fine-tunes on the same stratified subsample with the
same seed (the experiment draws the sample from the seed, not from the model). Two
rows' error rates at one seed therefore share the sample's luck, and the spread of
their *difference* across seeds is much smaller than either row's own spread: at 400
labels the seed-to-seed spread is 1-2 points, which hides effects of that size from an
unpaired comparison of means but not from a paired one.

Per training size and variant: the per-seed differences d_s = error(variant, s) -
error(FiT, s) (negative = fewer errors), their mean with a 95% t interval
(mean +- t(0.975, n-1) * sd / sqrt(n)), the paired t-test (scipy ``ttest_rel``) and the
Wilcoxon signed-rank test (``wilcoxon``, exact for small n; differences of zero are
dropped as in its default ``zero_method``), and how many seeds the variant won. A multi-label
or regression task pairs its primary metric instead (macro-F1, Pearson: higher is better,
:mod:`.measures`); ``metric`` in paired.csv names it.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from further_pt.errors import SetupError


def stats() -> Any:
    """``scipy.stats``, a dependency of further_pt: the report's intervals and tests need it,
    so a missing scipy is a one-line error, never a report that silently leaves them out."""
    try:
        from scipy import stats as scipy_stats
    except ImportError as exc:
        raise SetupError(f"the report's paired intervals and tests need scipy ({exc}); it is a "
                         "dependency of further_pt: pip install scipy") from None
    return scipy_stats


PAIRED_COLUMNS = ("train_size", "variant", "key", "seeds", "mean_diff", "ci_low", "ci_high",
                  "p_t", "p_wilcoxon", "wins", "median_diff", "mean_diff_without_extreme",
                  "extreme_seed", "diffs", "metric")


def paired_rows(errors: dict[tuple[Any, str], dict[int, float]], keys: dict[Any, list[str]],
                label: Any, *, lower_is_better: bool = True, metric: str = "error_rate"
                ) -> list[dict[str, Any]]:
    """One row per (size, variant other than FiT) with a paired comparison to FiT.

    ``errors[(size, key)][seed]`` is a stage's dev error rate (or the ``metric`` given);
    ``keys[size]`` the rows fine-tuned at that size; ``label(key)`` a row's display name.
    Only seeds both rows finished are paired; a win is a seed where the variant did better.
    """
    found = []
    for size, here in keys.items():
        fit = errors.get((size, "fit"), {})
        for key in here:
            if key == "fit":
                continue
            mine = errors.get((size, key), {})
            seeds = sorted(set(fit) & set(mine))
            diffs = [mine[s] - fit[s] for s in seeds]
            found.append({"train_size": size, "variant": label(key), "key": key,
                          "seeds": len(seeds), "metric": metric,
                          "wins": sum(d < 0 if lower_is_better else d > 0 for d in diffs),
                          "diffs": diffs, **summarise(diffs), **robust(diffs, seeds)})
    return found


def summarise(diffs: list[float]) -> dict[str, float | None]:
    """Mean, 95% t interval, paired t and Wilcoxon p-values of per-seed differences."""
    n = len(diffs)
    out: dict[str, float | None] = {"mean_diff": statistics.mean(diffs) if diffs else None,
                                    "ci_low": None, "ci_high": None, "p_t": None,
                                    "p_wilcoxon": None}
    if n < 2:
        return out
    st = stats()
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = float(st.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    out.update(ci_low=mean - half, ci_high=mean + half)
    if sd > 0:  # t is undefined when every seed moved by the same amount
        out["p_t"] = float(st.ttest_rel(diffs, [0.0] * n).pvalue)
    if any(d != 0 for d in diffs):
        out["p_wilcoxon"] = float(st.wilcoxon(diffs).pvalue)
    return out


def robust(diffs: list[float], seeds: list[int]) -> dict[str, Any]:
    """What one unstable run cannot carry: the median difference, and the mean without the
    most extreme pair (the seed whose difference is largest in size; the first such seed on
    a tie). The latter is None below 3 paired seeds (dropping one would leave one)."""
    if len(diffs) < 3:
        return {"median_diff": statistics.median(diffs) if diffs else None,
                "mean_diff_without_extreme": None, "extreme_seed": None}
    worst = max(range(len(diffs)), key=lambda i: abs(diffs[i]))
    return {"median_diff": statistics.median(diffs),
            "mean_diff_without_extreme": statistics.mean(diffs[:worst] + diffs[worst + 1:]),
            "extreme_seed": seeds[worst]}


def _p(value: float | None) -> str:
    return "-" if value is None else (f"{value:.3f}" if value >= 0.001 else "<0.001")


def markdown(rows: list[dict[str, Any]], size_label: Any, measure: Any = None) -> str:
    """The paired section of report.md (empty when no row has two paired seeds); ``measure``
    (:class:`.measures.Measure`): a task kind's primary metric, else the error rate."""
    shown = [r for r in rows if r["seeds"] >= 2]
    if not shown:
        return ""
    what = ("Error-rate difference, variant minus BERT-FiT, in points (negative: fewer errors)"
            if measure is None or measure.primary.key == "error_rate" else
            f"{measure.short} difference, variant minus BERT-FiT" + (
                " (x100)" if measure.primary.scale == 100 else "") + " (positive: better)")
    won = ("made fewer errors" if measure is None or measure.lower_is_better
           else f"had the higher {measure.short}")
    lines = [
        "", "## Paired against BERT-FiT (same subsample, same seed)", "",
        f"{what}, over the seeds both finished; 95% interval from the t distribution; "
        "p-values of the paired t-test and the Wilcoxon signed-rank test; wins = seeds where "
        f"the variant {won}; the median, and the mean without the most extreme pair (its seed "
        "in brackets), say whether one run carries the mean.",
        "", "| model | training examples | seeds | mean difference | 95% interval | paired t p "
        "| Wilcoxon p | wins | median | mean without the most extreme pair |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in shown:
        interval = ("-" if r["ci_low"] is None else
                    f"[{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}]")
        lines.append(
            f"| {r['variant']} | {size_label(r['train_size'])} | {r['seeds']} | "
            f"{100 * r['mean_diff']:+.2f} | {interval} | {_p(r['p_t'])} | "
            f"{_p(r['p_wilcoxon'])} | {r['wins']}/{r['seeds']} | "
            f"{_signed(r['median_diff'])} | {_without(r)} |")
    return "\n".join(lines) + "\n"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.2f}"


def _without(r: dict[str, Any]) -> str:
    if r["mean_diff_without_extreme"] is None:
        return "-"
    return f"{_signed(r['mean_diff_without_extreme'])} (seed {r['extreme_seed']})"
