"""Report: the experiment's Table 6 (report.md, report.csv) and its plots (PNG).

One row per variant and training-set size: dev error rate mean +- sample sd
over seeds, macro-F1 mean, the relative error reduction against FiT at the same
size (Sun et al.'s "Avg. delta": ``(err_FiT - err_variant) / err_FiT``), the
pretraining steps and wall time of the stage that produced its encoder, and the
forgetting column: the MLM loss of that encoder on the held-out general text
(lower = less forgotten), and the held-out in-domain column: its MLM loss and perplexity on
in-domain documents no variant trained on (:mod:`.heldout`). A variant pretrained for several
lengths gets the steps curve (:func:`steps_markdown`). With several ``train_sizes`` the report
adds the data-size view (Sun et al. 2019, sec. 5.5, Fig. 4): error per variant and size,
which differences from FiT exceed FiT's seed spread, and ``data_size.png``.
Plots: a bar chart of the error rates, the MLM-loss curves of the pretraining
runs, and ``plot_schedule`` / ``plot_run`` for any recipe or run. A multi-label or
regression task (``task.kind``) is reported by its own metrics instead of the error rate
and macro-F1: macro-F1, micro-F1 and subset accuracy; Pearson, Spearman and MSE
(:mod:`.measures`).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any

import yaml

from further_pt.files import atomic_write_text
from further_pt.study import heldout, measures, paired, plots
from further_pt.study.variants import (
    finetune_stage,
    keys_at,
    label,
    pretrained,
    read_jsonl,
    size_label,
    variant_keys,
)

P_VALUE = 0.05  # Welch's t-test level of the data-size sentences


def rows(out: Path, cfg: Any, stages: dict[str, Any], forgetting: dict[str, float | None],
         train_rows: int | None = None, in_domain: dict[str, float | None] | None = None
         ) -> list[dict[str, Any]]:
    """One row per (size, variant), sizes in recipe order; ``values``: the per-seed values of
    the task kind's primary metric (the error rate of a single-label task).

    ``train_examples`` is what the stage used: a stage's own ``train_examples`` in
    metrics.json if it wrote one, else the size, else ``train_rows`` (the whole file).
    """
    table, m, in_domain = [], measures.measure(cfg), in_domain or {}
    first = m.primary.key
    for size in cfg.train_sizes:
        block = []
        for variant in keys_at(cfg, size):
            metrics = [json.loads((out / finetune_stage(variant, size, s) / "metrics.json")
                                  .read_text()) for s in cfg.seeds]
            values = [x[f"eval_{first}"] for x in metrics]
            stage = f"pretrain-{variant}" if pretrained(cfg, variant) else None
            steps = max_steps = None
            if stage:
                log = read_jsonl(out / stage / "logs" / "metrics.jsonl")
                steps = max((x["step"] for x in log), default=None)
                if (out / stage / "config.yaml").is_file():  # the run's own length, no warm-up
                    max_steps = yaml.safe_load((out / stage / "config.yaml").read_text()).get(
                        "train", {}).get("max_steps")
            used = metrics[0].get("train_examples",  # the fine-tuner's data counts, or the linear's
                                  metrics[0].get("data", {}).get(
                                      "train_examples", size if size is not None else train_rows))
            block.append({
                "variant": label(cfg, variant), "key": variant,
                "train_size": "all" if size is None else size, "train_examples": used,
                "seeds": len(values),
                f"{first}_mean": statistics.mean(values),
                f"{first}_sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                **{f"{c.key}_mean": statistics.mean(x[f"eval_{c.key}"] for x in metrics)
                   for c in m.others},
                "pretrain_steps": steps, "pretrain_max_steps": max_steps,
                "pretrain_seconds": stages.get(stage, {}).get("seconds") if stage else None,
                "forgetting_mlm_loss": forgetting.get(variant),
                # measured as not applicable: the encoder has no trained MLM head
                "forgetting_na": variant in forgetting and forgetting[variant] is None,
                "in_domain_mlm_loss": in_domain.get(variant),
                "in_domain_perplexity": heldout.perplexity(in_domain.get(variant)),
                "in_domain_na": variant in in_domain and in_domain[variant] is None,
                "values": values,
            })
        fit = m.error(next(r for r in block if r["key"] == "fit")[f"{first}_mean"])
        for r in block:
            r["relative_error_reduction"] = ((fit - m.error(r[f"{first}_mean"])) / fit if fit
                                             else 0.0)
        table += block
    return table


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _in_domain(r: dict[str, Any]) -> str:
    if r["in_domain_na"]:
        return "n/a"
    loss = r["in_domain_mlm_loss"]
    return "-" if loss is None else f"{loss:.3f} ({r['in_domain_perplexity']:.1f})"


def markdown(table: list[dict[str, Any]], cfg: Any) -> str:
    several, m = len(cfg.train_sizes) > 1, measures.measure(cfg)
    with_domain = any(r["in_domain_mlm_loss"] is not None or r["in_domain_na"] for r in table)
    first, shown = m.primary, [c for c in m.others if c.shown]
    error = "" if m.lower_is_better else f", error = 1 - {m.short}"
    lines = [
        "# Further pretraining: does it help this task?", "",
        f"Dev {first.header}, mean +- sd over seeds {list(cfg.seeds)}; "
        f"delta = relative error reduction against BERT-FiT{error}" + (
            " at the same training size" if several else "") +
        " (Sun et al. 2019, Table 6's Avg. delta); forgetting = MLM loss of the encoder on "
        "held-out general text (n/a: the encoder has no trained MLM head - a head-less base - "
        "so the loss would score a random head)" + (
            "; held-out in-domain = MLM loss (perplexity) on in-domain documents no variant "
            "trained on" if with_domain else "") + ".", "",
        "| model |" + (" training examples |" if several else "") + f" {first.header} | "
        + "".join(f"{c.header} | " for c in shown) + "delta vs FiT | pretraining steps | "
        "pretraining time (s) | forgetting (MLM loss) |"
        + (" held-out in-domain (MLM loss, ppl) |" if with_domain else ""),
        "|---|" + ("---|" if several else "") + "---|" * (len(shown) + 5 + with_domain)]
    for r in table:
        lines.append(
            f"| {r['variant']} |" + (f" {size_label(r)} |" if several else "") +
            f" {first.show(r[f'{first.key}_mean'])} +- {first.show(r[f'{first.key}_sd'])} | "
            + "".join(f"{c.show(r[f'{c.key}_mean'])} | " for c in shown) +
            f"{100 * r['relative_error_reduction']:+.1f}% | {_fmt(r['pretrain_steps'], 'd')} | "
            f"{_fmt(r['pretrain_seconds'], '.0f')} | "
            f"{'n/a' if r.get('forgetting_na') else _fmt(r['forgetting_mlm_loss'], '.3f')} |"
            + (f" {_in_domain(r)} |" if with_domain else ""))
    return "\n".join(lines) + "\n"


def _welch_p(a: list[float], b: list[float]) -> float | None:
    """Welch's t-test p-value (scipy); None where a group has < 2 seeds or neither group
    varies (t is undefined: the sd rule decides)."""
    if len(a) < 2 or len(b) < 2:
        return None
    if statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0:
        return None
    return float(paired.stats().ttest_ind(a, b, equal_var=False).pvalue)


def comparisons(table: list[dict[str, Any]], key: str = "error_rate") -> list[dict[str, Any]]:
    """Per size and variant other than FiT: its difference from FiT and whether it counts.

    Rule: Welch's t-test (p < 0.05) over the per-seed values of ``key`` (the error rates,
    or the task kind's primary metric) where scipy is installed and both have at least two
    seeds; otherwise the difference of means must exceed FiT's seed sd. ``rule`` says which
    one decided.
    """
    found = []
    for size in dict.fromkeys(r["train_size"] for r in table):
        block = [r for r in table if r["train_size"] == size]
        fit = next(r for r in block if r["key"] == "fit")
        for r in block:
            if r["key"] == "fit":
                continue
            diff = r[f"{key}_mean"] - fit[f"{key}_mean"]
            p = _welch_p(fit["values"], r["values"])
            exceeds = p < P_VALUE if p is not None else abs(diff) > fit[f"{key}_sd"]
            found.append({"train_size": size, "variant": r["variant"], "diff": diff, "p": p,
                          "exceeds": exceeds, "rule": "welch" if p is not None else "sd"})
    return found


def data_size_markdown(table: list[dict[str, Any]], cfg: Any, plot: str | None) -> str:
    """The data-size view: error by variant x size, and which differences from FiT count."""
    sizes = list(dict.fromkeys(r["train_size"] for r in table))
    labels = {r["train_size"]: size_label(r) for r in table if r["key"] == "fit"}
    m = measures.measure(cfg)
    first = m.primary
    lines = [
        "", "## Training-set size (Sun et al. 2019, sec. 5.5, Fig. 4)", "",
        f"Dev {first.header}, mean +- sd over seeds (n = seeds), fine-tuned on a seeded, "
        "stratified sample of the labelled training file: the same examples for every model at "
        "a seed; 'all' = the whole file.", "",
        "| model | " + " | ".join(labels[s] for s in sizes) + " |",
        "|---|" + "---|" * len(sizes)]
    for key in variant_keys(cfg):
        cells = {r["train_size"]: r for r in table if r["key"] == key}
        lines.append(f"| {label(cfg, key)} | " + " | ".join(
            f"{first.show(cells[s][f'{first.key}_mean'])} +- "
            f"{first.show(cells[s][f'{first.key}_sd'])} "
            f"(n={cells[s]['seeds']})" if s in cells else "not run" for s in sizes) + " |")
    found = comparisons(table, first.key)
    rule = (f"Welch's t-test over the per-seed {m.plural} gives p < {P_VALUE}; where it "
            "cannot run (fewer than 2 seeds, or no spread in either), when the difference of "
            "means exceeds BERT-FiT's seed sd")
    lines += ["", f"A variant differs from BERT-FiT beyond FiT's seed spread when {rule}.", ""]
    for size in sizes:
        here = [c for c in found if c["train_size"] == size]

        def show(c: dict[str, Any]) -> str:
            p = ", sd rule" if c["p"] is None else f", p={c['p']:.3f}"
            return f"{c['variant']} ({m.short} {first.show(c['diff'], signed=True)}{p})"

        beyond = [show(c) for c in here if c["exceeds"]]
        within = [show(c) for c in here if not c["exceeds"]]
        lines.append(f"- {labels[size]} examples: "
                     + (f"beyond FiT's spread: {', '.join(beyond)}" if beyond
                        else "no variant differs from FiT beyond its spread")
                     + (f"; within it: {', '.join(within)}." if within else "."))
    if plot:
        lines += ["", f"![data_size]({plot})"]
    return "\n".join(lines) + "\n"


LENGTH_KEYS = ("train.max_steps", "train.warmup_steps")  # what an ablation of length changes


def _length_only(ablation: Any) -> bool:
    keys = [o.split("=", 1)[0].strip() for o in ablation.overrides]
    return "train.max_steps" in keys and set(keys) <= set(LENGTH_KEYS)


def steps_markdown(cfg: Any, pairs: list[dict[str, Any]], table: list[dict[str, Any]]) -> str:
    """The steps curve (Sun et al. 2019, Fig. 2): a further-pretrained variant and its
    ablations that change only its length (``train.max_steps``, and ``train.warmup_steps``
    to keep the schedule's shape), each with its paired gain against FiT (two seeds or more)
    and, where measured, the held-out in-domain loss of its encoder."""
    curve_of = {a.name: a.variant for a in cfg.get("ablations") or [] if _length_only(a)}
    curve_of.update({v: v for v in cfg.variants if pretrained(cfg, v)})
    rows, with_domain = [], any(r.get("in_domain_mlm_loss") is not None for r in table)
    for size in cfg.train_sizes:
        tag = "all" if size is None else size
        here = [r for r in table if r["train_size"] == tag and r["key"] in curve_of
                and r.get("pretrain_max_steps") is not None]
        for variant in dict.fromkeys(curve_of[r["key"]] for r in here):
            curve = sorted((r for r in here if curve_of[r["key"]] == variant),
                           key=lambda r: r["pretrain_max_steps"])
            if len({r["pretrain_max_steps"] for r in curve}) < 2:
                continue
            for r in curve:
                p = next((x for x in pairs if x["key"] == r["key"]
                          and x["train_size"] == size and x["seeds"] >= 2), None)
                if p is None:
                    continue
                interval = ("-" if p["ci_low"] is None else
                            f"[{100 * p['ci_low']:+.2f}, {100 * p['ci_high']:+.2f}]")
                rows.append(f"| {r['variant']} | {size_label(r)} | {r['pretrain_max_steps']} | "
                            f"{100 * p['mean_diff']:+.2f} | {interval} | "
                            f"{p['wins']}/{p['seeds']} | {100 * p['median_diff']:+.2f} |"
                            + (f" {_in_domain(r)} |" if with_domain else ""))
    if not rows:
        return ""
    return "\n".join([
        "", "## Gain against further-pretraining steps (Sun et al. 2019, Fig. 2)", "",
        "Each length of further pretraining (after the head warm-up) of one variant, paired "
        "against BERT-FiT as in the section above.", "",
        "| model | training examples | further-pretraining steps | mean difference | "
        "95% interval | wins | median |" + (" held-out in-domain (MLM loss, ppl) |"
                                          if with_domain else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if with_domain else ""), *rows]) + "\n"


CSV_SKIP = ("values",)


def write(out: Path, cfg: Any, stages: dict[str, Any], forgetting: dict[str, float | None], *,
          train_rows: int | None = None, in_domain: dict[str, float | None] | None = None
          ) -> Path:
    """report.csv (one row per variant and size), report.md and the plots, into ``out``."""
    table = rows(out, cfg, stages, forgetting, train_rows, in_domain)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[k for k in table[0] if k not in CSV_SKIP],
                            extrasaction="ignore")
    writer.writeheader()
    writer.writerows(table)
    atomic_write_text(out / "report.csv", buffer.getvalue())
    text = markdown(table, cfg)
    m = measures.measure(cfg)
    figures = plots.figures(out, table, cfg, m)
    text += "".join(f"\n![{p.stem}]({p.name})\n" for p in figures)
    if len(cfg.train_sizes) > 1:
        plot = plots.data_size(out, table, m)
        text += data_size_markdown(table, cfg, plot.name if plot else None)
    pairs = _paired(out, cfg)
    text += paired.markdown(pairs, lambda size: "all" if size is None else str(size), m)
    text += steps_markdown(cfg, pairs, table)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(paired.PAIRED_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**r, "train_size": "all" if r["train_size"] is None else r["train_size"],
                      "diffs": ";".join(f"{d:.6f}" for d in r["diffs"])} for r in pairs)
    atomic_write_text(out / "paired.csv", buffer.getvalue())
    atomic_write_text(out / "report.md", text)
    return out / "report.md"


def _paired(out: Path, cfg: Any) -> list[dict[str, Any]]:
    """Per-seed dev error rates (the task kind's primary metric) of every finished
    fine-tuning stage, paired against FiT."""
    m = measures.measure(cfg)
    errors: dict[tuple[Any, str], dict[int, float]] = {}
    for size in cfg.train_sizes:
        for key in keys_at(cfg, size):
            found = {}
            for seed in cfg.seeds:
                path = out / finetune_stage(key, size, seed) / "metrics.json"
                if path.is_file():
                    found[seed] = json.loads(path.read_text())[f"eval_{m.primary.key}"]
            errors[(size, key)] = found
    return paired.paired_rows(errors, {size: keys_at(cfg, size) for size in cfg.train_sizes},
                              lambda key: label(cfg, key), lower_is_better=m.lower_is_better,
                              metric=m.primary.key)


