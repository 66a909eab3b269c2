"""Sweeps: one run per point of a grid of overrides, then a summary table.

    further-pt finetune -m recipe=fit data.train_file=t.jsonl data.eval_file=d.jsonl \\
        train.lr=1e-5,2e-5,5e-5 train.epochs=2,4
    further-pt pretrain -m recipe=in_domain ... objective.masking=token,whole_word

``-m`` (``--multirun``) reads overrides as Hydra's multirun does: a comma list
(``key=a,b``), ``range(1,4)`` or ``choice(a,b)`` is a swept key, and the runs are the
Cartesian product of the swept keys' values (Hydra's own override parser expands them,
so the syntax and quoting are Hydra's). Every other override is fixed. Each run gets its
own folder under the recipe's ``output_dir``, named after its values
(``runs/fit/lr=1e-05,epochs=2``), and is run by the entry point users call
(``--launcher``, default ``python``: each run in its own process; ``accelerate launch
--num_processes 8`` for several GPUs; ``inprocess`` for tests), through the experiment
runner (:class:`further_pt.study.experiment.Runner`): a finished run is skipped on a rerun, an
interrupted one resumes from its last checkpoint, and wall times are kept in
``stages.json``. The sweep stops at the first run that fails, as Hydra's does; rerunning
the same command continues.

Every point's config is composed and validated before the first run starts, so a bad
value anywhere in the grid fails in seconds. ``output_dir/sweep.yaml`` records the fixed
part of the config: a rerun may add or drop swept values (the grid grows), but a change
to anything else is refused, since finished runs would silently disagree with it.
``sweep.csv`` and ``sweep.md`` hold one row per point: its values, status, final
metrics (fine-tuning: the ``eval.metric``, accuracy, macro-F1, best epoch, steps;
pretraining: steps, tokens, last logged loss) and wall time.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from further_pt import finetune, pretrain
from further_pt.config import recipes
from further_pt.errors import ConfigError
from further_pt.files import atomic_write_text
from further_pt.objectives import evaluation
from further_pt.objectives.classification import RESUMABLE_KEYS as FINETUNE_RESUMABLE
from further_pt.objectives.masked_lm import RESUMABLE_KEYS as PRETRAIN_RESUMABLE
from further_pt.study import experiment

logger = logging.getLogger("further_pt.study.sweep")

MULTIRUN_FLAGS = ("-m", "--multirun")
DEFAULT_LAUNCHER = "python"  # each run in a process of its own: a crash or OOM ends one run
LOADERS = {"pretrain": pretrain.load, "finetune": finetune.load}
RESUMABLE = {"pretrain": PRETRAIN_RESUMABLE, "finetune": FINETUNE_RESUMABLE}
SPEC = "sweep.yaml"
USAGE = ('further-pt {pretrain,finetune} -m [--launcher "python" | "inprocess" | '
         '"accelerate launch ..."] recipe=NAME key=a,b [key2=x,y ...]')


@dataclass(frozen=True)
class Point:
    """One run of the grid: its folder name and its ``key=value`` overrides."""

    name: str
    values: dict[str, str]  # swept key -> value, as Hydra's parser gives it

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.values.items()]


def wanted(args: list[str]) -> bool:
    """Whether a pretrain/finetune command line asks for a sweep (``-m`` / ``--multirun``)."""
    return any(a in MULTIRUN_FLAGS for a in args)


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """``(launcher words, recipe and overrides)``; ``-m`` and ``--launcher X`` taken out."""
    launch, rest, i = [DEFAULT_LAUNCHER], [], 0
    while i < len(args):
        arg = args[i]
        if arg in MULTIRUN_FLAGS:
            pass
        elif arg == "--launcher" or arg.startswith("--launcher="):
            value = arg.split("=", 1)[1] if "=" in arg else (
                args[i + 1] if i + 1 < len(args) else "")
            i += 0 if "=" in arg else 1
            launch = shlex.split(value)
            if not launch:
                raise ConfigError(f"--launcher: give a launcher; usage: {USAGE}")
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r}; usage: {USAGE}")
        else:
            rest.append(arg)
        i += 1
    if launch[0] not in ("python", "accelerate", "inprocess") and shutil.which(launch[0]) is None:
        raise ConfigError(f"--launcher: {launch[0]!r} is not a command here (python, accelerate "
                          "launch ..., inprocess, or a command on PATH)")
    return launch, rest


def grid(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``(fixed overrides, {swept key: values})``, parsed by Hydra's override parser."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(f"bad override: {' '.join(str(exc).split())}") from None
    fixed, axes = [], {}
    for override in parsed:
        if not override.is_sweep_override():
            fixed.append(override.input_line)
            continue
        key = override.get_key_element()
        if override.key_or_group == "output_dir":
            raise ConfigError("config key 'output_dir': a sweep's runs go into folders under "
                              "one output_dir; give one value")
        values = list(override.sweep_string_iterator())
        if not values:
            raise ConfigError(f"config key {key!r}: the sweep has no values")
        axes[key] = values
    if not axes:
        raise ConfigError("-m: no swept key; give one or more values as key=a,b (or "
                          f"range(...), choice(...)); usage: {USAGE}")
    return fixed, axes


def points(axes: dict[str, list[str]]) -> list[Point]:
    """The Cartesian product of the swept values, first key slowest, each named for its folder.

    A key is named by its last part (``lr``), or in full where two swept keys share one
    (``train.lr`` and ``head.lr``); slashes and quotes in values (paths) become ``_``.
    """
    short = {k: k.lstrip("+~").rsplit(".", 1)[-1] for k in axes}
    clash = {s for s in short.values() if list(short.values()).count(s) > 1}
    label = {k: k.lstrip("+~") if s in clash else s for k, s in short.items()}
    found = []
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo, strict=True))
        name = ",".join(f"{label[k]}={v}" for k, v in values.items())
        for char in "/\\'\"":  # a folder name, quotable in an override (see run)
            name = name.replace(char, "_")
        found.append(Point(name.strip(".") or "run", values))
    return found


def _check_spec(root: Path, kind: str, axes: dict[str, list[str]],
                fixed_config: dict[str, Any]) -> None:
    """Refuse an output_dir that holds a plain run, or a sweep whose fixed config differs."""
    if (root / "config.yaml").is_file():
        raise ConfigError(f"output_dir {root} holds a single run, not a sweep; give the sweep "
                          "another output_dir")
    path = root / SPEC
    if path.is_file():
        saved = yaml.safe_load(path.read_text()) or {}
        if saved.get("kind") != kind:
            raise ConfigError(f"output_dir {root} holds a {saved.get('kind')} sweep; use another "
                              "output_dir")
        old, new = saved.get("config", {}), fixed_config
        skip = set(RESUMABLE[kind])
        changed = sorted(k for k in old if k not in skip and old[k] != new.get(k))
        if changed:
            k = changed[0]
            raise ConfigError(f"output_dir {root} holds a sweep with another fixed config ({k}: "
                              f"{old[k]!r} there, {new.get(k)!r} now); only the swept values "
                              "may change: use another output_dir")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(
        {"kind": kind, "axes": axes, "config": fixed_config}, sort_keys=False))


def _shared(resolved: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """The resolved config, flat, less the swept keys and output_dir: what all runs share."""
    swept = {key.lstrip("+~") for key in keys}
    return {k: v for k, v in recipes.flatten(resolved).items()
            if k != "output_dir" and k not in swept}


def run(kind: str, args: list[str]) -> Path:
    """Run (or continue) the sweep; write and return ``output_dir/sweep.md``."""
    launch, rest = split_args(args)
    recipe, overrides = recipes.split_recipe_arg(rest)
    fixed, axes = grid(overrides)
    grid_points = points(axes)
    load = LOADERS[kind]
    configs = [load([f"recipe={recipe}", *fixed, *p.overrides]) for p in grid_points]
    root = Path(configs[0].output_dir).expanduser().resolve()
    shared = _shared(OmegaConf.to_container(configs[0], resolve=True), list(axes))
    _check_spec(root, kind, axes, shared)
    logger.info("sweep of %d run(s) into %s: %s", len(grid_points), root,
                "; ".join(p.name for p in grid_points))
    runner = experiment.Runner(OmegaConf.create({"launcher": launch}), root)
    try:
        for p in grid_points:
            folder = root / p.name
            runner.run(p.name, f"{kind}.py",
                       [f"recipe={recipe}", *fixed, *p.overrides, f"output_dir='{folder}'"],
                       folder / "metrics.json")
    finally:
        write_summary(root, kind, grid_points, configs, runner.record, list(axes))
    return root / "sweep.md"


def _row(folder: Path, kind: str, cfg: Any, record: dict[str, Any]) -> dict[str, Any]:
    """A point's status, final metrics and wall time."""
    path = folder / "metrics.json"
    done = record.get("finished") and path.is_file()
    row: dict[str, Any] = {"status": "finished" if done else ("failed" if record else "not run")}
    metrics = json.loads(path.read_text()) if done else {}
    if kind == "finetune":
        keys = dict.fromkeys([f"eval_{cfg.eval.metric}", "eval_accuracy", "eval_macro_f1"])
        row.update({k: metrics.get(k) for k in keys})
        row["best_epoch"] = metrics.get("best_epoch")
    else:
        lines = [json.loads(x) for x in (folder / "logs" / "metrics.jsonl").read_text()
                 .splitlines() if x.strip()] if done and (
                     folder / "logs" / "metrics.jsonl").is_file() else []
        losses = [x["train/loss"] for x in lines if "train/loss" in x]
        row["train_loss"] = losses[-1] if losses else None
        row["tokens"] = metrics.get("tokens")
    row["steps"] = metrics.get("steps")
    seconds = record.get("seconds")
    row["seconds"] = round(seconds, 1) if seconds is not None else None
    return row


def write_summary(root: Path, kind: str, grid_points: list[Point], configs: list[Any],
                  record: dict[str, Any], keys: list[str]) -> Path:
    """``sweep.csv`` and ``sweep.md``: one row per point, in grid order; the best one named."""
    table = []
    for p, cfg in zip(grid_points, configs, strict=True):
        values = {k.lstrip("+~"): v for k, v in p.values.items()}
        table.append({"run": p.name, **values,
                      **_row(root / p.name, kind, cfg, record.get(p.name, {}))})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    atomic_write_text(root / "sweep.csv", buffer.getvalue())

    columns = list(table[0])
    lines = [f"# Sweep: further-pt {kind} -m ({len(table)} runs, {root})", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r[c], c) for c in columns) + " |" for r in table]
    if kind == "finetune":
        metric = configs[0].eval.metric
        best = None
        for r in table:
            score = r.get(f"eval_{metric}")
            if score is not None and (best is None or evaluation.is_better(
                    metric, score, best[f"eval_{metric}"])):
                best = r
        if best is not None:
            lines += ["", f"Best by eval_{metric}: **{best['run']}** "
                          f"({best[f'eval_{metric}']:.4f}, best epoch {best['best_epoch']})"]
    atomic_write_text(root / "sweep.md", "\n".join(lines) + "\n")
    return root / "sweep.md"


def _cell(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if column == "seconds" else f"{value:.4f}"
    return str(value)


def main(kind: str, args: list[str]) -> int:
    """``further-pt pretrain|finetune -m ...``: 0 when every run finished, 3 when one failed
    (the summary is written either way; rerun the same command to continue)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        summary = run(kind, args)
    except experiment.StageFailed as exc:
        print(f"further_pt: sweep stopped: {exc}", file=sys.stderr)
        return 3
    print(summary.read_text(), end="")
    print(f"Sweep summary: {summary} (and sweep.csv)")
    return 0
