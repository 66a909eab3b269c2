"""Issue 29's study, run in blocks: archive a sitting's block, pool every block's pairs.

    python docs/results/tapt-powered/pool.py archive runs/tapt-powered \
        docs/results/tapt-powered/blocks/1
    python docs/results/tapt-powered/pool.py archive runs/tapt-powered \
        docs/results/tapt-powered/blocks/2 steps      # a second report of the block: steps-*
    python docs/results/tapt-powered/pool.py pool docs/results/tapt-powered/blocks

Why blocks: a sitting's machine keeps nothing but the repository, and an encoder folder
(90 MB for MiniLM) does not belong in git. So each sitting is a block: it further-pretrains
its own encoders (`further-pt experiment`, the study's recipe) and fine-tunes every row of
its seeds from them; the next block uses new seeds. A pair (a variant against BERT-FiT at one
seed) therefore lies inside one block and never mixes machines or precisions. Pretraining is
seeded (the recipe's seed 42), so every block rebuilds the same encoder up to the machine's
arithmetic (blocks 1 and 2, two CPUs, agree on the held-out in-domain loss within 0.001):
the pooled pairs measure one further-pretrained encoder per variant against BERT-FiT over
many fine-tuning seeds and samples, not the spread between pretraining runs. Blocks 3 and 4
ran in a sitting whose workspace still held block 2's encoders, on block 2's CPU model: they
fine-tune from those instead of rebuilding them, and their stages.json keeps only their own
stages (the pooled table shows no pretraining time for them).

``archive`` keeps what the pooled report needs and nothing heavy: the block's report files,
one line per fine-tuned stage (seeds.csv: dev error, best epoch, every epoch's dev error,
wall time), the pretraining runs' evaluation lines (pretraining_eval.csv), the held-out
losses, and the machine (machine.json). ``pool`` pairs every block's seeds with
``further_pt.study.paired`` (the report's own statistics) and prints the pooled table.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import shutil
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from further_pt.study import paired
from further_pt.study.variants import NAMES, read_jsonl
from further_pt.train.hardware import BF16_CPU_FLAGS

COPIED = ("experiment.yaml", "stages.json", "report.md", "report.csv", "paired.csv",
          "heldout_in_domain.json", "forgetting.json", "error_rates.png",
          "pretraining_mlm_loss.png")
SEEDS_COLUMNS = ("key", "train_size", "seed", "error_rate", "best_epoch", "epochs",
                 "epoch_errors", "seconds")


def _cpu() -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), []))
    return {"cpu": model, "cores": torch.get_num_threads(), "torch": torch.__version__,
            "avx512f": "avx512f" in flags, "bf16_flags": sorted(flags & set(BF16_CPU_FLAGS))}


def _stage_key(name: str) -> tuple[str, int | None, int]:
    """finetune-itpt_4000-n400-seed3 -> ("itpt_4000", 400, 3)."""
    body, seed = name.removeprefix("finetune-").rsplit("-seed", 1)
    key, size = body.rsplit("-", 1)
    return key, None if size == "all" else int(size.removeprefix("n")), int(seed)


def archive(out: Path, block: Path, part: str = "") -> None:
    """Copy a finished block's small files from the experiment's ``out`` into ``block``.

    ``part`` (such as ``steps``) archives a second report of the same block, one the
    experiment wrote over other rows or seeds (the steps curve's ``variants=[fit,itpt]``
    run after the main rows): its report files keep their own names with the prefix
    ``part-`` beside the main report, which stays; the held-out losses gain its rows;
    seeds.csv, stages.json and pretraining_eval.csv are rebuilt from every stage of ``out``.
    """
    stages = json.loads((out / "stages.json").read_text())
    block.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if not (out / name).is_file():
            continue
        if not part or name == "stages.json":
            shutil.copy2(out / name, block / name)
        elif name.endswith(".json"):  # held-out losses: the main report's rows and this part's
            merged = json.loads((block / name).read_text()) if (block / name).is_file() else {}
            merged.update(json.loads((out / name).read_text()))
            (block / name).write_text(json.dumps(merged, indent=1) + "\n")
        elif name == "report.md":  # its figures are archived under the part's names too
            text = (out / name).read_text()
            for figure in (n for n in COPIED if n.endswith(".png")):
                text = text.replace(f"]({figure})", f"]({part}-{figure})")
            (block / f"{part}-{name}").write_text(text)
        else:
            shutil.copy2(out / name, block / f"{part}-{name}")
    lines = []
    for folder in sorted(out.glob("finetune-*")):
        if not (folder / "metrics.json").is_file():
            continue  # an interrupted stage: not part of the block
        metrics = json.loads((folder / "metrics.json").read_text())
        key, size, seed = _stage_key(folder.name)
        history = metrics.get("history") or []
        lines.append({"key": key, "train_size": "all" if size is None else size, "seed": seed,
                      "error_rate": metrics["eval_error_rate"],
                      "best_epoch": metrics.get("best_epoch"), "epochs": len(history),
                      "epoch_errors": ";".join(f"{h['eval_error_rate']:.4f}" for h in history
                                               if "eval_error_rate" in h),
                      "seconds": round(stages.get(folder.name, {}).get("seconds", 0.0), 1)})
    with open(block / "seeds.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SEEDS_COLUMNS)
        writer.writeheader()
        writer.writerows(lines)
    evals = []
    for folder in sorted(out.glob("pretrain-*")):
        for line in read_jsonl(folder / "logs" / "metrics.jsonl"):
            shown = {k: v for k, v in line.items() if k.startswith("eval")}
            if shown:
                evals.append({"stage": folder.name, "step": line["step"], **shown})
    with open(block / "pretraining_eval.csv", "w", newline="") as f:
        names = sorted({k for e in evals for k in e} - {"stage", "step"})
        writer = csv.DictWriter(f, fieldnames=["stage", "step", *names])
        writer.writeheader()
        writer.writerows(evals)
    (block / "machine.json").write_text(json.dumps(_cpu(), indent=1) + "\n")
    print(f"archived {len(lines)} fine-tuned stages and {len(evals)} pretraining evaluations "
          f"into {block}")


def _label(key: str) -> str:
    if key in NAMES:
        return NAMES[key]
    variant = key.split("_", 1)[0]
    return f"{NAMES.get(variant, variant)} ({key})"


NOT_PRETRAINED = ("fit", "linear", "feat")


def _block_row(block: Path, rows: list[dict[str, str]], seeds: list[int]
               ) -> Callable[[list[str]], str]:
    """A block's line of the pooled report (machine, seeds, stage times, held-out losses),
    as a function of the pretrained rows: those are known once every block is read."""
    machine = json.loads((block / "machine.json").read_text())
    stages = json.loads((block / "stages.json").read_text())

    def loaded(name: str) -> dict[str, Any]:
        path = block / name
        return json.loads(path.read_text()) if path.is_file() else {}

    held, forgetting = loaded("heldout_in_domain.json"), loaded("forgetting.json")
    tuned = [float(r["seconds"]) for r in rows if r["key"] not in ("linear",)]

    def cells(pretrained: list[str]) -> str:
        out = []
        for key in pretrained:
            seconds = stages.get(f"pretrain-{key}", {}).get("seconds")
            loss = held.get(key)
            out.append(f"{seconds:,.0f}, " if seconds else "-, ")
            out[-1] += (f"{loss:.3f} ({math.exp(loss):.0f}), " if loss else "-, ")
            out[-1] += f"{forgetting[key]:.3f}" if forgetting.get(key) else "-"
        return " | ".join(out)

    return lambda pretrained: (
        f"| {block.name} | {machine['cpu']}, {'bf16' if machine['bf16_flags'] else 'fp32'} | "
        f"{seeds[0]}-{seeds[-1]} ({len(seeds)}) | "
        f"{statistics.mean(tuned) if tuned else 0:.0f} | {cells(pretrained)} |")


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _p(value: float | None) -> str:
    return "-" if value is None else (f"{value:.3f}" if value >= 0.001 else "<0.001")


def _pair(mine: dict[int, float], base: dict[int, float], seeds: list[int]) -> str:
    """``mean [95% interval], wins/seeds`` of ``mine - base`` in points over ``seeds``."""
    diffs = [mine[s] - base[s] for s in seeds]
    summary = paired.summarise(diffs)
    if summary["ci_low"] is None:
        return "-"
    return (f"{100 * summary['mean_diff']:+.2f} [{100 * summary['ci_low']:+.2f}, "
            f"{100 * summary['ci_high']:+.2f}], p {_p(summary['p_t'])}, "
            f"{sum(d < 0 for d in diffs)}/{len(diffs)} wins")


def steps_curve(errors: dict[tuple[Any, str], dict[int, float]], steps: dict[str, set[int]]
                ) -> list[str]:
    """The pooled steps curve (Sun et al. 2019, Fig. 2): for each variant pretrained at two
    lengths or more (``itpt`` and the ``itpt_4000`` ablation), every length's mean dev error
    and paired difference against BERT-FiT and against the next shorter length, all over the
    seeds where the longest length finished, so every point of the curve compares alike."""
    lines: list[str] = []
    for size in dict.fromkeys(size for size, _ in errors):
        fit = errors.get((size, "fit"), {})
        here = [k for k in steps if (size, k) in errors and len(steps[k]) == 1]
        for variant in dict.fromkeys(k.split("_", 1)[0] for k in here):
            curve = sorted((k for k in here if k.split("_", 1)[0] == variant),
                           key=lambda k: next(iter(steps[k])))
            if len(curve) < 2:
                continue
            seeds = sorted(set(fit).intersection(*(errors[(size, k)] for k in curve)))
            if len(seeds) < 2:
                continue
            lines += [f"Steps curve of {_label(variant)} at {size} labels, over the {len(seeds)} "
                      f"seeds every length finished ({seeds[0]}-{seeds[-1]}):", "",
                      "| model | further-pretraining steps | mean dev error (%) | against "
                      "BERT-FiT: mean [95% interval], paired t p, wins | against the shorter "
                      "run |", "|---|---|---|---|---|",
                      f"| {_label('fit')} | 0 | "
                      f"{100 * statistics.mean(fit[s] for s in seeds):.2f} | - | - |"]
            for i, k in enumerate(curve):
                mine = errors[(size, k)]
                shorter = _pair(mine, errors[(size, curve[i - 1])], seeds) if i else "-"
                lines.append(f"| {_label(k)} | {next(iter(steps[k])):,} | "
                             f"{100 * statistics.mean(mine[s] for s in seeds):.2f} | "
                             f"{_pair(mine, fit, seeds)} | {shorter} |")
            lines.append("")
    return lines


def pool(blocks: Path) -> str:
    """The pooled paired table over every block under ``blocks``, as markdown."""
    errors: dict[tuple[Any, str], dict[int, float]] = {}
    last: dict[tuple[Any, str], list[bool]] = {}  # per stage: was the best epoch the last?
    origin: dict[int, str] = {}
    steps: dict[str, set[int]] = {}  # a pretrained row's further-pretraining steps, per block
    per_block = []
    for block in sorted(p for p in blocks.iterdir() if (p / "seeds.csv").is_file()):
        rows = _read_csv(block / "seeds.csv")
        seeds = sorted({int(r["seed"]) for r in rows})
        clash = [s for s in seeds if s in origin and origin[s] != block.name]
        if clash:
            raise SystemExit(f"{block}/seeds.csv: seed {clash[0]} is also in block "
                             f"{origin[clash[0]]}; blocks must use disjoint seeds")
        origin.update({s: block.name for s in seeds})
        for r in rows:
            size = None if r["train_size"] == "all" else int(r["train_size"])
            errors.setdefault((size, r["key"]), {})[int(r["seed"])] = float(r["error_rate"])
            if r["epochs"] not in ("", "0"):
                last.setdefault((size, r["key"]), []).append(
                    r["best_epoch"] == r["epochs"])
        per_block.append(_block_row(block, rows, seeds))
        for r in (r for f in sorted(block.glob("*report.csv")) for r in _read_csv(f)):
            if r.get("pretrain_max_steps"):
                steps.setdefault(r["key"], set()).add(int(float(r["pretrain_max_steps"])))
    keys: dict[Any, list[str]] = {}
    for size, key in errors:
        keys.setdefault(size, []).append(key)
    order = ["fit", "itpt", "selected", "linear"]
    for size in keys:
        keys[size].sort(key=lambda k: (order.index(k) if k in order else len(order), k))
    rows = paired.paired_rows(errors, keys, _label)
    means = []
    for s in keys:  # over the seeds every main row finished, so that the means compare alike
        main = [k for k in keys[s] if k in order] or keys[s]  # the steps curve has its own
        common = sorted(set.intersection(*(set(errors[(s, k)]) for k in main)))
        for k in main:
            values = [errors[(s, k)][seed] for seed in common]
            if len(values) > 1:
                means.append(f"| {_label(k)} | {len(values)} | {100 * statistics.mean(values):.2f}"
                             f" | {100 * statistics.stdev(values):.2f} | "
                             + (f"{sum(last[(s, k)])} of {len(last[(s, k)])}"
                                if (s, k) in last else "-") + " |")
    pretrained = [k for k in dict.fromkeys(k for ks in keys.values() for k in ks)
                  if k not in NOT_PRETRAINED]
    curve = steps_curve(errors, steps)
    head = " | ".join(f"{_label(k)}: pretraining s, held-out in-domain loss (ppl), "
                      "cross-domain loss" for k in pretrained)
    return "\n".join([
        f"| block | machine, precision | seeds | fine-tune s (mean) | {head} |",
        "|---|---|---|---|" + "---|" * len(pretrained),
        *(row(pretrained) for row in per_block), "",
        "| model | seeds (all rows) | mean dev error (%) | sd | best epoch = the last (stages) |",
        "|---|---|---|---|---|", *means, "",
        paired.markdown(rows, lambda size: "all" if size is None else str(size)).strip(), "",
        *curve])


def main(argv: list[str]) -> None:
    if len(argv) in (3, 4) and argv[0] == "archive":
        archive(Path(argv[1]), Path(argv[2]), *argv[3:])
    elif len(argv) == 2 and argv[0] == "pool":
        print(pool(Path(argv[1])))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
