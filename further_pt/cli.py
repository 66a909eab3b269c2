"""The ``further-pt`` command: list recipes, check a config, run a job, predict.

    further-pt recipes                                 # the shipped recipes, one line each
    further-pt config recipe=fit data.train_file=t.jsonl   # validate, print the resolved YAML
    further-pt prepare recipe=in_domain data.cache_dir=DIR ...  # tokenise ahead on a CPU
    further-pt pretrain recipe=demo                    # in this process; for several processes:
    further-pt finetune recipe=fit ...                 #   accelerate launch further_pt/<job>.py
    further-pt predict model=runs/fit/final input=test.jsonl output=predictions.jsonl
    further-pt experiment recipe=paper_grid task.train_file=... task.eval_file=... corpora...
    further-pt plot-schedule recipe=ulmfit [steps=1000] [layers=12] [output=schedule.png]
    further-pt plot-run runs/fit [output=run.png]
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from further_pt import config, corpus, experiment, finetune, pretrain, pretraining
from further_pt.errors import ConfigError, FurtherPTError
from further_pt.evaluation import predict_file
from further_pt.report import plot_run, plot_schedule, schedule_curves

USAGE = """usage: further-pt COMMAND [recipe=NAME] [key=value ...]

  recipes    list the shipped recipes
  config     validate a recipe with overrides and print the resolved config (runs nothing)
  prepare    tokenise a pretraining recipe's corpus into data.cache_dir (no GPU, no weights)
  pretrain   further-pretrain in this process (several: accelerate launch further_pt/pretrain.py)
  finetune   fine-tune in this process (several: accelerate launch further_pt/finetune.py)
  predict    model=DIR input=FILE output=FILE [batch_size=64]: predictions as JSON lines
  experiment run the FiT / ITPT / IDPT / CDPT (/ Feat) grid and write report.md and plots
  plot-schedule  recipe=NAME [steps=1000] [layers=12] [output=FILE.png]: lr per layer group
  plot-run   OUTPUT_DIR [output=FILE.png]: loss, lr and accuracy curves of a run
"""


# The recipe kinds: the top-level key that marks a composed recipe as one of them, the loader
# that validates it, and the command that runs it.
KINDS: dict[str, tuple[str, Callable[[list[str]], Any], str]] = {
    "pretrain": ("objective", pretrain.load, "accelerate launch further_pt/pretrain.py"),
    "finetune": ("head", finetune.load, "accelerate launch further_pt/finetune.py"),
    "experiment": ("variants", experiment.load, "further-pt experiment"),
}


def recipe_kind(recipe: str) -> str:
    """The kind of a recipe, from the keys of its composed form (bases included)."""
    keys = set(config.compose(recipe, []))
    return next((kind for kind, (marker, _, _) in KINDS.items() if marker in keys), "unknown")


def _describe(name: str) -> str:
    lines = (config.recipes_dir() / f"{name}.yaml").read_text().splitlines()
    first = next((line for line in lines if line.startswith("#")), "#")
    return first.lstrip("# ").strip()


def _predict(args: list[str]) -> int:
    options = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = sorted(set(options) - {"model", "input", "output", "batch_size"})
    missing = [k for k in ("model", "input", "output") if k not in options]
    if unknown or missing or len(options) != len(args):
        problem = f"unknown option {unknown[0]!r}" if unknown else (
            f"missing {missing[0]}=..." if missing else "options are key=value")
        raise ConfigError(f"predict: {problem}; usage: further-pt predict model=DIR "
                                 "input=FILE output=FILE [batch_size=64]")
    metrics = predict_file(options["model"], options["input"], options["output"],
                           batch_size=int(options.get("batch_size", 64)))
    print(f"Predictions: {options['output']}")
    if metrics:
        print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, float)}))
    return 0


def _options(args: list[str], allowed: set[str], usage: str) -> dict[str, str]:
    options = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = sorted(set(options) - allowed)
    if unknown or len(options) != len(args):
        problem = f"unknown option {unknown[0]!r}" if unknown else "options are key=value"
        raise ConfigError(f"{problem}; usage: {usage}")
    return options


def _plot_schedule(args: list[str]) -> int:
    recipe, _ = config.split_recipe_arg(args)
    usage = "further-pt plot-schedule recipe=NAME [steps=1000] [layers=12] [output=FILE.png]"
    options = _options([a for a in args if not a.startswith("recipe=")],
                       {"steps", "layers", "output"}, usage)
    overrides = [f"{k}={v}" for k, v in options.items() if k not in ("steps", "layers", "output")]
    cfg = config.compose(recipe, overrides)
    curves = schedule_curves(cfg, layers=int(options.get("layers", 12)),
                             steps=int(options.get("steps", 1000)))
    out = Path(options.get("output", f"schedule-{Path(recipe).stem}.png"))
    plot_schedule(curves, f"{Path(recipe).stem}: learning rate per layer group", out)
    print(f"Schedule plot: {out}")
    return 0


def _plot_run(args: list[str]) -> int:
    if not args or "=" in args[0]:
        raise ConfigError("usage: further-pt plot-run OUTPUT_DIR [output=FILE.png]")
    run_dir = Path(args[0])
    options = _options(args[1:], {"output"}, "further-pt plot-run OUTPUT_DIR [output=FILE.png]")
    out = Path(options.get("output", run_dir / "run.png"))
    try:
        plot_run(run_dir, out)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    print(f"Run plot: {out}")
    return 0


def _prepare(args: list[str]) -> int:
    """Tokenise a pretraining recipe's corpus into its data.cache_dir, ahead of the GPU job.

    The config is validated exactly as ``pretrain`` validates it, so a recipe the run
    would refuse is refused here, before any tokenisation.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = pretrain.load(args)
    prepared = pretraining.prepare(cfg)
    for i, p in enumerate(prepared, start=1):
        print(f"source {i}/{len(prepared)} {p.spec}: {p.documents:,} documents -> "
              f"{p.instances:,} instances, {p.tokens:,} tokens; read {p.read_seconds:.1f} s, "
              f"built {p.build_seconds:.1f} s; cache: {p.cache_folder or 'none (caching off)'}")
    cache = corpus.default_cache_dir(cfg.data.cache_dir)
    print(f"Prepared. Run the pretraining with the same data.*, objective.nsp and "
          f"model.tokenizer / model.name_or_path settings and data.cache_dir={cache}, e.g. "
          f"accelerate launch further_pt/pretrain.py {' '.join(args)}: it reuses these "
          "instances and starts training at once.")
    return 0


def _experiment(args: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        report = experiment.run(experiment.load(args))
    except experiment.StageFailed as exc:
        print(f"further_pt: experiment stopped: {exc}", file=sys.stderr)
        return 3
    print(f"Report: {report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "recipes":
            for name in config.available_recipes():
                print(f"{name:14s} {recipe_kind(name):10s} {_describe(name)}")
            return 0
        if command == "config":
            recipe, _ = config.split_recipe_arg(rest)
            kind = recipe_kind(recipe)
            if kind not in KINDS:
                raise ConfigError(f"recipe {recipe!r} has none of the keys that mark a recipe "
                                  f"kind ({', '.join(m for m, _, _ in KINDS.values())})")
            print(config.to_yaml(KINDS[kind][1](rest)), end="")
            print(f"# run it with: {KINDS[kind][2]} recipe={recipe}", file=sys.stderr)
            return 0
        if command == "predict":
            return _predict(rest)
        if command == "plot-schedule":
            return _plot_schedule(rest)
        if command == "plot-run":
            return _plot_run(rest)
        if command == "prepare":
            return _prepare(rest)
        if command == "experiment":
            return _experiment(rest)
    except FurtherPTError as exc:
        print(f"further_pt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if command == "pretrain":
        return pretrain.main(rest)
    if command == "finetune":
        return finetune.main(rest)
    print(f"further_pt: error: unknown command {command!r}\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
