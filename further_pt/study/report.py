"""Report: the experiment's Table 6 (report.md, report.csv) and its plots (PNG).

One row per variant and training-set size: dev error rate mean +- sample sd
over seeds, macro-F1 mean, the relative error reduction against FiT at the same
size (Sun et al.'s "Avg. delta": ``(err_FiT - err_variant) / err_FiT``), the
pretraining steps and wall time of the stage that produced its encoder, and the
forgetting column: the MLM loss of that encoder on the held-out general text
(lower = less forgotten). With several ``train_sizes`` the report adds the
data-size view (Sun et al. 2019, sec. 5.5, Fig. 4): error per variant and size,
which differences from FiT exceed FiT's seed spread, and ``data_size.png``.
Plots: a bar chart of the error rates, the MLM-loss curves of the pretraining
runs, and ``plot_schedule`` / ``plot_run`` for any recipe or run.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import statistics
from pathlib import Path
from typing import Any

from further_pt.objectives import schedules
from further_pt.study import paired
from further_pt.train.checkpoint import atomic_write_text

NAMES = {"fit": "BERT-FiT", "itpt": "BERT-ITPT-FiT", "idpt": "BERT-IDPT-FiT",
         "cdpt": "BERT-CDPT-FiT", "selected": "BERT-kNN-TAPT-FiT", "feat": "BERT-Feat",
         "linear": "TF-IDF + LogReg"}
P_VALUE = 0.05  # Welch's t-test level of the data-size sentences


def size_tag(size: int | None) -> str:
    """A training-set size in stage names and tables: ``n400``, or ``all`` for the whole file."""
    return "all" if size is None else f"n{size}"


def finetune_stage(variant: str, size: int | None, seed: int) -> str:
    """The stage (and folder) of one variant at one size and seed: ``finetune-itpt-n400-seed1``."""
    return f"finetune-{variant}-{size_tag(size)}-seed{seed}"


PRETRAINED = ("itpt", "idpt", "cdpt", "selected")


def variant_keys(cfg: Any) -> list[str]:
    """Every fine-tuned row of the grid: the variants, then the ablations."""
    return [*cfg.variants, *(a.name for a in cfg.get("ablations") or [])]


def keys_at(cfg: Any, size: int | None) -> list[str]:
    """The rows fine-tuned at one training size: every variant, and the ablations whose own
    ``train_sizes`` (null = all of the grid's) include it, so that an ablation can be limited
    to the size where it is informative without paying for the others."""
    limited = {a.name: list(a.train_sizes) for a in cfg.get("ablations") or []
               if a.get("train_sizes") is not None}
    return [k for k in variant_keys(cfg) if k not in limited or size in limited[k]]


def label(cfg: Any, key: str) -> str:
    """A row's name: BERT-ITPT-FiT, ..., or an ablation as its variant's name and its own."""
    if key in NAMES:
        return NAMES[key]
    ablation = next(a for a in cfg.ablations if a.name == key)
    return f"{NAMES[ablation.variant]} ({key})"


def pretrained(cfg: Any, key: str) -> bool:
    """Whether the row's encoder was further pretrained in the grid (pretrain-<key>/)."""
    return key in PRETRAINED or key in [a.name for a in cfg.get("ablations") or []]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rows(out: Path, cfg: Any, stages: dict[str, Any], forgetting: dict[str, float],
         train_rows: int | None = None) -> list[dict[str, Any]]:
    """One row per (size, variant), sizes in recipe order; ``error_rates``: the per-seed values.

    ``train_examples`` is what the stage used: a stage's own ``train_examples`` in
    metrics.json if it wrote one, else the size, else ``train_rows`` (the whole file).
    """
    table = []
    for size in cfg.train_sizes:
        block = []
        for variant in keys_at(cfg, size):
            metrics = [json.loads((out / finetune_stage(variant, size, s) / "metrics.json")
                                  .read_text()) for s in cfg.seeds]
            errors = [m["eval_error_rate"] for m in metrics]
            stage = f"pretrain-{variant}" if pretrained(cfg, variant) else None
            steps = None
            if stage:
                log = _read_jsonl(out / stage / "logs" / "metrics.jsonl")
                steps = max((x["step"] for x in log), default=None)
            used = metrics[0].get("train_examples",  # the fine-tuner's data counts, or the linear's
                                  metrics[0].get("data", {}).get(
                                      "train_examples", size if size is not None else train_rows))
            block.append({
                "variant": label(cfg, variant), "key": variant,
                "train_size": "all" if size is None else size, "train_examples": used,
                "seeds": len(errors),
                "error_rate_mean": statistics.mean(errors),
                "error_rate_sd": statistics.stdev(errors) if len(errors) > 1 else 0.0,
                "macro_f1_mean": statistics.mean(m["eval_macro_f1"] for m in metrics),
                "accuracy_mean": statistics.mean(m["eval_accuracy"] for m in metrics),
                "pretrain_steps": steps,
                "pretrain_seconds": stages.get(stage, {}).get("seconds") if stage else None,
                "forgetting_mlm_loss": forgetting.get(variant),
                # measured as not applicable: the encoder has no trained MLM head
                "forgetting_na": variant in forgetting and forgetting[variant] is None,
                "error_rates": errors,
            })
        fit = next(r for r in block if r["key"] == "fit")["error_rate_mean"]
        for r in block:
            r["relative_error_reduction"] = (fit - r["error_rate_mean"]) / fit if fit else 0.0
        table += block
    return table


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _size_label(r: dict[str, Any]) -> str:
    if r["train_size"] == "all":
        return "all" if r["train_examples"] is None else f"all ({r['train_examples']})"
    return str(r["train_size"])


def markdown(table: list[dict[str, Any]], cfg: Any) -> str:
    several = len(cfg.train_sizes) > 1
    lines = [
        "# Further pretraining: does it help this task?", "",
        f"Dev error rate (%), mean +- sd over seeds {list(cfg.seeds)}; "
        "delta = relative error reduction against BERT-FiT" + (" at the same training size"
                                                               if several else "") +
        " (Sun et al. 2019, Table 6's Avg. delta); forgetting = MLM loss of the encoder on "
        "held-out general text (n/a: the encoder has no trained MLM head - a head-less base - "
        "so the loss would score a random head).", "",
        "| model |" + (" training examples |" if several else "") + " error rate (%) | "
        "macro-F1 (%) | delta vs FiT | pretraining steps | pretraining time (s) | "
        "forgetting (MLM loss) |",
        "|---|" + ("---|" if several else "") + "---|---|---|---|---|---|"]
    for r in table:
        lines.append(
            f"| {r['variant']} |" + (f" {_size_label(r)} |" if several else "") +
            f" {100 * r['error_rate_mean']:.2f} +- "
            f"{100 * r['error_rate_sd']:.2f} | {100 * r['macro_f1_mean']:.2f} | "
            f"{100 * r['relative_error_reduction']:+.1f}% | {_fmt(r['pretrain_steps'], 'd')} | "
            f"{_fmt(r['pretrain_seconds'], '.0f')} | "
            f"{'n/a' if r.get('forgetting_na') else _fmt(r['forgetting_mlm_loss'], '.3f')} |")
    return "\n".join(lines) + "\n"


def _welch_p(a: list[float], b: list[float]) -> float | None:
    """Welch's t-test p-value (scipy); None where scipy is missing, a group has < 2 seeds or
    neither group varies (t is undefined: the sd rule decides)."""
    if importlib.util.find_spec("scipy") is None or len(a) < 2 or len(b) < 2:
        return None
    if statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0:
        return None
    from scipy import stats

    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def comparisons(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size and variant other than FiT: its difference from FiT and whether it counts.

    Rule: Welch's t-test (p < 0.05) over the per-seed error rates where scipy is
    installed and both have at least two seeds; otherwise the difference of means
    must exceed FiT's seed sd. ``rule`` says which one decided.
    """
    found = []
    for size in dict.fromkeys(r["train_size"] for r in table):
        block = [r for r in table if r["train_size"] == size]
        fit = next(r for r in block if r["key"] == "fit")
        for r in block:
            if r["key"] == "fit":
                continue
            diff = r["error_rate_mean"] - fit["error_rate_mean"]
            p = _welch_p(fit["error_rates"], r["error_rates"])
            exceeds = p < P_VALUE if p is not None else abs(diff) > fit["error_rate_sd"]
            found.append({"train_size": size, "variant": r["variant"], "diff": diff, "p": p,
                          "exceeds": exceeds, "rule": "welch" if p is not None else "sd"})
    return found


def data_size_markdown(table: list[dict[str, Any]], cfg: Any, plot: str | None) -> str:
    """The data-size view: error by variant x size, and which differences from FiT count."""
    sizes = list(dict.fromkeys(r["train_size"] for r in table))
    labels = {r["train_size"]: _size_label(r) for r in table if r["key"] == "fit"}
    lines = [
        "", "## Training-set size (Sun et al. 2019, sec. 5.5, Fig. 4)", "",
        "Dev error rate (%), mean +- sd over seeds (n = seeds), fine-tuned on a seeded, "
        "stratified sample of the labelled training file: the same examples for every model at "
        "a seed; 'all' = the whole file.", "",
        "| model | " + " | ".join(labels[s] for s in sizes) + " |",
        "|---|" + "---|" * len(sizes)]
    for key in variant_keys(cfg):
        cells = {r["train_size"]: r for r in table if r["key"] == key}
        lines.append(f"| {label(cfg, key)} | " + " | ".join(
            f"{100 * cells[s]['error_rate_mean']:.2f} +- {100 * cells[s]['error_rate_sd']:.2f} "
            f"(n={cells[s]['seeds']})" if s in cells else "not run" for s in sizes) + " |")
    found = comparisons(table)
    if importlib.util.find_spec("scipy") is not None:
        rule = (f"Welch's t-test over the per-seed error rates gives p < {P_VALUE}; where it "
                "cannot run (fewer than 2 seeds, or no spread in either), when the difference of "
                "means exceeds BERT-FiT's seed sd")
    else:
        rule = "the difference of means exceeds BERT-FiT's seed sd (scipy is not installed)"
    lines += ["", f"A variant differs from BERT-FiT beyond FiT's seed spread when {rule}.", ""]
    for size in sizes:
        here = [c for c in found if c["train_size"] == size]

        def show(c: dict[str, Any]) -> str:
            p = ", sd rule" if c["p"] is None else f", p={c['p']:.3f}"
            return f"{c['variant']} (error {100 * c['diff']:+.2f} points{p})"

        beyond = [show(c) for c in here if c["exceeds"]]
        within = [show(c) for c in here if not c["exceeds"]]
        lines.append(f"- {labels[size]} examples: "
                     + (f"beyond FiT's spread: {', '.join(beyond)}" if beyond
                        else "no variant differs from FiT beyond its spread")
                     + (f"; within it: {', '.join(within)}." if within else "."))
    if plot:
        lines += ["", f"![data_size]({plot})"]
    return "\n".join(lines) + "\n"


CSV_SKIP = ("error_rates",)


def write(out: Path, cfg: Any, stages: dict[str, Any], forgetting: dict[str, float], *,
          train_rows: int | None = None) -> Path:
    """report.csv (one row per variant and size), report.md and the plots, into ``out``."""
    table = rows(out, cfg, stages, forgetting, train_rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[k for k in table[0] if k not in CSV_SKIP],
                            extrasaction="ignore")
    writer.writeheader()
    writer.writerows(table)
    atomic_write_text(out / "report.csv", buffer.getvalue())
    text = markdown(table, cfg)
    plots = _plots(out, table, cfg)
    text += "".join(f"\n![{p.stem}]({p.name})\n" for p in plots)
    if len(cfg.train_sizes) > 1:
        plot = _data_size_plot(out, table)
        text += data_size_markdown(table, cfg, plot.name if plot else None)
    pairs = _paired(out, cfg)
    text += paired.markdown(pairs, lambda size: "all" if size is None else str(size))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(paired.PAIRED_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**r, "train_size": "all" if r["train_size"] is None else r["train_size"],
                      "diffs": ";".join(f"{d:.6f}" for d in r["diffs"])} for r in pairs)
    atomic_write_text(out / "paired.csv", buffer.getvalue())
    atomic_write_text(out / "report.md", text)
    return out / "report.md"


def _paired(out: Path, cfg: Any) -> list[dict[str, Any]]:
    """Per-seed dev error rates of every finished fine-tuning stage, paired against FiT."""
    errors: dict[tuple[Any, str], dict[int, float]] = {}
    for size in cfg.train_sizes:
        for key in keys_at(cfg, size):
            found = {}
            for seed in cfg.seeds:
                path = out / finetune_stage(key, size, seed) / "metrics.json"
                if path.is_file():
                    found[seed] = json.loads(path.read_text())["eval_error_rate"]
            errors[(size, key)] = found
    return paired.paired_rows(errors, {size: keys_at(cfg, size) for size in cfg.train_sizes},
                              lambda key: label(cfg, key))


def _data_size_plot(out: Path, table: list[dict[str, Any]]) -> Path | None:
    """``data_size.png``: error vs labelled examples per variant, log x, error bars = sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if any(r["train_examples"] is None for r in table):
        return None  # 'all' without a count has no place on the x axis
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in dict.fromkeys(r["key"] for r in table):
        points = sorted((r["train_examples"], r["error_rate_mean"], r["error_rate_sd"])
                        for r in table if r["key"] == key)
        ax.errorbar([p[0] for p in points], [100 * p[1] for p in points],
                    yerr=[100 * p[2] for p in points], marker="o", capsize=3,
                    label=next(r["variant"] for r in table if r["key"] == key),
                    linestyle="--" if key == "linear" else "-")
    ax.set_xscale("log")
    ticks = {r["train_examples"]: (f"{r['train_examples']} (all)" if r["train_size"] == "all"
                                   else str(r["train_examples"])) for r in table}
    ax.set_xticks(sorted(ticks), [ticks[x] for x in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel("labelled training examples (log scale)")
    ax.set_ylabel("dev error rate (%)")
    ax.set_title("Error vs training-set size (mean +- sd over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "data_size.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plots(out: Path, table: list[dict[str, Any]], cfg: Any) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    largest = [r for r in table if r["train_size"] == table[-1]["train_size"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["variant"] for r in largest], [100 * r["error_rate_mean"] for r in largest],
           yerr=[100 * r["error_rate_sd"] for r in largest], capsize=4, color="#4878a8")
    ax.set_ylabel("dev error rate (%)")
    ax.set_title("Error rate by variant (mean +- sd over seeds)" + (
        f", {_size_label(largest[0])} examples" if len(cfg.train_sizes) > 1 else ""))
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    paths.append(out / "error_rates.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    curves = {label(cfg, k): _read_jsonl(out / f"pretrain-{k}" / "logs" / "metrics.jsonl")
              for k in dict.fromkeys(r["key"] for r in table) if pretrained(cfg, k)}
    curves = {k: v for k, v in curves.items() if v}
    if curves:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, log in curves.items():
            ax.plot([x["step"] for x in log], [x["train/mlm_loss"] for x in log], label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("MLM loss")
        ax.set_title("Further pretraining")
        ax.legend()
        fig.tight_layout()
        paths.append(out / "pretraining_mlm_loss.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def plot_schedule(group_lrs: dict[str, list[float]], title: str, path: Path) -> Path:
    """One line per layer group: the learning rate at every optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = plt.cm.viridis([i / max(len(group_lrs) - 1, 1) for i in range(len(group_lrs))])
    for color, (name, lrs) in zip(colors, group_lrs.items(), strict=True):
        ax.plot(range(len(lrs)), lrs, label=name, linewidth=1.2,
                color="#c0392b" if name == "head" else color)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    if len(group_lrs) > 1:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_run(run_dir: Path, path: Path) -> Path:
    """Loss, learning rate and (fine-tuning) dev accuracy of a run, from logs/metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = _read_jsonl(run_dir / "logs" / "metrics.jsonl")
    if not log:
        raise FileNotFoundError(f"{run_dir}: no logs/metrics.jsonl")
    keys = [k for k in ("train/mlm_loss", "train/nsp_loss", "train/loss", "eval_accuracy")
            if any(k in x for x in log)]
    lr_key = next((k for k in ("train/lr", "lr/head") if any(k in x for x in log)), None)
    panels = keys + ([lr_key] if lr_key else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(6, 2.2 * len(panels)), sharex=True)
    for ax, key in zip(axes if len(panels) > 1 else [axes], panels, strict=True):
        points = [(x["step"], x[key]) for x in log if key in x]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if
                key.startswith("eval") else None)
        ax.set_ylabel(key.split("/")[-1], fontsize=8)
    fig.suptitle(str(run_dir.name))
    fig.supxlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def schedule_curves(cfg: Any, *, layers: int, steps: int) -> dict[str, list[float]]:
    """Learning rate per layer group over ``steps`` optimizer steps, as a recipe sets it.

    Fine-tuning recipes: embeddings, each layer and the head, with layer-wise
    decay, the chosen schedule, and 0 while gradual unfreezing keeps a group
    frozen. Pretraining recipes: one curve (warmup then linear decay).
    """
    import torch


    t = cfg.train
    if "objective" in cfg:  # pretraining: warmup + linear decay over max_steps
        total = steps or t.max_steps
        warmup = round(t.warmup_steps * total / t.max_steps)
        names, lrs = ["all"], [t.lr]
        schedule, kwargs = "linear", {"warmup_steps": warmup}
    else:
        total = steps
        names = ["embeddings", *(f"layer_{i}" for i in range(layers)), "head"]
        lrs = [t.lr * t.layer_decay ** (layers - i) for i in range(layers + 1)] + [t.head_lr]
        schedule = t.schedule
        kwargs = {"warmup_steps": round(t.warmup_ratio * total), "cut_frac": t.stlr_cut_frac,
                  "ratio": t.stlr_ratio}
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in names]
    opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs, strict=True)])
    sched = schedules.build(schedule, opt, total_steps=total, **kwargs)
    every = None
    if "objective" not in cfg and t.unfreeze != "none":
        every = total // t.epochs if t.unfreeze == "epoch" else t.unfreeze_every_steps
    curves: dict[str, list[float]] = {name: [] for name in names}
    for step in range(total):
        stage = min(step // every, len(names) - 1) if every else len(names)
        for rank_from_top, (name, group) in enumerate(zip(reversed(names),
                                                          reversed(opt.param_groups),
                                                          strict=True)):
            frozen = every is not None and rank_from_top > stage
            curves[name].append(0.0 if frozen else group["lr"])
        opt.step()
        sched.step()
    return curves
