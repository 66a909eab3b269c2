"""Plots: the study's figures (error rate per variant, error against labels) and the two
plots of ``further-pt plot-schedule`` (learning rate per layer group) and ``plot-run``
(loss, learning rate and accuracy of a run), as PNG files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from further_pt.objectives import schedules
from further_pt.study import measures, variants

SINGLE = measures.MEASURES["single_label"]


def data_size(out: Path, table: list[dict[str, Any]], measure: measures.Measure = SINGLE
              ) -> Path | None:
    """``data_size.png``: error (the task kind's primary metric) vs labelled examples per
    variant, log x, error bars = sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if any(r["train_examples"] is None for r in table):
        return None  # 'all' without a count has no place on the x axis
    first = measure.primary
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in dict.fromkeys(r["key"] for r in table):
        points = sorted((r["train_examples"], r[f"{first.key}_mean"], r[f"{first.key}_sd"])
                        for r in table if r["key"] == key)
        ax.errorbar([p[0] for p in points], [first.scale * p[1] for p in points],
                    yerr=[first.scale * p[2] for p in points], marker="o", capsize=3,
                    label=next(r["variant"] for r in table if r["key"] == key),
                    linestyle="--" if key == "linear" else "-")
    ax.set_xscale("log")
    ticks = {r["train_examples"]: (f"{r['train_examples']} (all)" if r["train_size"] == "all"
                                   else str(r["train_examples"])) for r in table}
    ax.set_xticks(sorted(ticks), [ticks[x] for x in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel("labelled training examples (log scale)")
    ax.set_ylabel(f"dev {first.header}")
    ax.set_title(f"{measure.short[0].upper()}{measure.short[1:]} vs training-set size "
                 "(mean +- sd over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "data_size.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def figures(out: Path, table: list[dict[str, Any]], cfg: Any,
            measure: measures.Measure = SINGLE) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    largest = [r for r in table if r["train_size"] == table[-1]["train_size"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    first = measure.primary
    ax.bar([r["variant"] for r in largest], [first.scale * r[f"{first.key}_mean"] for r in largest],
           yerr=[first.scale * r[f"{first.key}_sd"] for r in largest], capsize=4, color="#4878a8")
    ax.set_ylabel(f"dev {first.header}")
    name = first.header.split(" (")[0]
    ax.set_title(f"{name[0].upper()}{name[1:]} by variant (mean +- sd over seeds)" + (
        f", {variants.size_label(largest[0])} examples" if len(cfg.train_sizes) > 1 else ""))
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    paths.append(out / f"{measure.plot_name}.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    curves = {variants.label(cfg, k):
              variants.read_jsonl(out / f"pretrain-{k}" / "logs" / "metrics.jsonl")
              for k in dict.fromkeys(r["key"] for r in table) if variants.pretrained(cfg, k)}
    curves = {k: v for k, v in curves.items() if v}
    if curves:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, log in curves.items():
            train = [x for x in log if "train/mlm_loss" in x]  # evaluations are lines of their own
            line, = ax.plot([x["step"] for x in train], [x["train/mlm_loss"] for x in train],
                            label=name)
            held = [x for x in log if "eval_loss" in x]
            if held:
                ax.plot([x["step"] for x in held], [x["eval_loss"] for x in held], marker="o",
                        linestyle="--", color=line.get_color(), label=f"{name}, held-out")
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
    """Loss (with the held-out loss of pretraining), learning rate and (fine-tuning) dev
    accuracy of a run, from logs/metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = variants.read_jsonl(run_dir / "logs" / "metrics.jsonl")
    if not log:
        raise FileNotFoundError(f"{run_dir}: no logs/metrics.jsonl")
    dev = next((k for k in ("eval_accuracy", "eval_micro_f1", "eval_pearson")  # task.kind's
                if any(k in x for x in log)), "eval_accuracy")
    keys = [k for k in ("train/mlm_loss", "train/nsp_loss", "train/loss", dev)
            if any(k in x for x in log)]
    lr_key = next((k for k in ("train/lr", "lr/head") if any(k in x for x in log)), None)
    panels = keys + ([lr_key] if lr_key else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(6, 2.2 * len(panels)), sharex=True)
    held_out = [(x["step"], x["eval_loss"]) for x in log if "eval_loss" in x]
    beside = next((k for k in ("train/mlm_loss", "train/loss") if k in panels), None)
    for ax, key in zip(axes if len(panels) > 1 else [axes], panels, strict=True):
        points = [(x["step"], x[key]) for x in log if key in x]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if
                key.startswith("eval") else None, label=key.split("/")[-1])
        if key == beside and held_out:  # pretraining: the held-out MLM loss on the same axis
            ax.plot([p[0] for p in held_out], [p[1] for p in held_out], marker="o",
                    label="held-out (eval_loss)")
            ax.legend(fontsize=7)
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
