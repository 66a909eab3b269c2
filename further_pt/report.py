"""Report: the experiment's Table 6 (report.md, report.csv) and its plots (PNG).

One row per variant: dev error rate mean +- sample sd over seeds, macro-F1 mean,
the relative error reduction against FiT (Sun et al.'s "Avg. delta":
``(err_FiT - err_variant) / err_FiT``), the pretraining steps and wall time of
the stage that produced its encoder, and the forgetting column: the MLM loss of
that encoder on the held-out general text (lower = less forgotten).
Plots: a bar chart of the error rates, the MLM-loss curves of the pretraining
runs, and ``plot_schedule`` / ``plot_run`` for any recipe or run.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any

from further_pt import schedules
from further_pt.checkpoint import atomic_write_text

NAMES = {"fit": "BERT-FiT", "itpt": "BERT-ITPT-FiT", "idpt": "BERT-IDPT-FiT",
         "cdpt": "BERT-CDPT-FiT", "feat": "BERT-Feat"}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rows(out: Path, cfg: Any, stages: dict[str, Any], forgetting: dict[str, float]
         ) -> list[dict[str, Any]]:
    table = []
    for variant in cfg.variants:
        metrics = [json.loads((out / f"finetune-{variant}-seed{s}" / "metrics.json").read_text())
                   for s in cfg.seeds]
        errors = [m["eval_error_rate"] for m in metrics]
        stage = f"pretrain-{variant}" if variant in ("itpt", "idpt", "cdpt") else None
        steps = None
        if stage:
            log = _read_jsonl(out / stage / "logs" / "metrics.jsonl")
            steps = max((x["step"] for x in log), default=None)
        table.append({
            "variant": NAMES[variant], "key": variant, "seeds": len(errors),
            "error_rate_mean": statistics.mean(errors),
            "error_rate_sd": statistics.stdev(errors) if len(errors) > 1 else 0.0,
            "macro_f1_mean": statistics.mean(m["eval_macro_f1"] for m in metrics),
            "accuracy_mean": statistics.mean(m["eval_accuracy"] for m in metrics),
            "pretrain_steps": steps,
            "pretrain_seconds": stages.get(stage, {}).get("seconds") if stage else None,
            "forgetting_mlm_loss": forgetting.get(variant),
        })
    fit = next(r for r in table if r["key"] == "fit")["error_rate_mean"]
    for r in table:
        r["relative_error_reduction"] = (fit - r["error_rate_mean"]) / fit if fit else 0.0
    return table


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(table: list[dict[str, Any]], cfg: Any) -> str:
    lines = [
        "# Further pretraining: does it help this task?", "",
        f"Dev error rate (%), mean +- sd over seeds {list(cfg.seeds)}; "
        "delta = relative error reduction against BERT-FiT (Sun et al. 2019, Table 6's "
        "Avg. delta); forgetting = MLM loss of the encoder on held-out general text.", "",
        "| model | error rate (%) | macro-F1 (%) | delta vs FiT | pretraining steps | "
        "pretraining time (s) | forgetting (MLM loss) |",
        "|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(
            f"| {r['variant']} | {100 * r['error_rate_mean']:.2f} +- "
            f"{100 * r['error_rate_sd']:.2f} | {100 * r['macro_f1_mean']:.2f} | "
            f"{100 * r['relative_error_reduction']:+.1f}% | {_fmt(r['pretrain_steps'], 'd')} | "
            f"{_fmt(r['pretrain_seconds'], '.0f')} | {_fmt(r['forgetting_mlm_loss'], '.3f')} |")
    return "\n".join(lines) + "\n"


def write(out: Path, cfg: Any, stages: dict[str, Any], forgetting: dict[str, float]) -> Path:

    table = rows(out, cfg, stages, forgetting)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    atomic_write_text(out / "report.csv", buffer.getvalue())
    text = markdown(table, cfg)
    plots = _plots(out, table, cfg)
    text += "".join(f"\n![{p.stem}]({p.name})\n" for p in plots)
    atomic_write_text(out / "report.md", text)
    return out / "report.md"


def _plots(out: Path, table: list[dict[str, Any]], cfg: Any) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["variant"] for r in table], [100 * r["error_rate_mean"] for r in table],
           yerr=[100 * r["error_rate_sd"] for r in table], capsize=4, color="#4878a8")
    ax.set_ylabel("dev error rate (%)")
    ax.set_title("Error rate by variant (mean +- sd over seeds)")
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    paths.append(out / "error_rates.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    curves = {r["variant"]: _read_jsonl(out / f"pretrain-{r['key']}" / "logs" / "metrics.jsonl")
              for r in table if r["key"] in ("itpt", "idpt", "cdpt")}
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
