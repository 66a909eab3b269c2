"""The ``further-pt`` command: list recipes, check a config, run a job, predict.

    further-pt recipes                                 # the shipped recipes, one line each
    further-pt config recipe=fit                       # the composed recipe, unset keys marked
    further-pt config --check recipe=fit data.train_file=t.jsonl  # every check a run makes
    further-pt prepare recipe=in_domain data.cache_dir=DIR ...  # tokenise ahead on a CPU
    further-pt pretrain recipe=demo                    # in this process; for several processes:
    further-pt finetune recipe=fit ...                 #   accelerate launch further_pt/<job>.py
    further-pt finetune -m recipe=fit train.lr=1e-5,2e-5 ...  # a sweep: one run per value
    further-pt predict model=runs/fit/final input=test.jsonl output=predictions.parquet top_k=3
    further-pt experiment recipe=paper_grid task.train_file=... task.eval_file=... corpora...
    further-pt plot-schedule recipe=ulmfit [steps=1000] [layers=12] [output=schedule.png]
    further-pt plot-run runs/fit [output=run.png]
    further-pt select corpus=[in_domain.txt.gz] task=train.jsonl k=50 output=knn.txt.gz
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from further_pt import finetune, pretrain
from further_pt.cli import show_config
from further_pt.config import recipes
from further_pt.data import corpus, prepare
from further_pt.errors import ConfigError, FurtherPTError
from further_pt.objectives import encoder, masked_lm, prediction
from further_pt.study import experiment, sweep
from further_pt.study.plots import plot_run, plot_schedule, schedule_curves
from further_pt.train import launch

USAGE = """usage: further-pt COMMAND [recipe=NAME] [key=value ...]

  recipes    list the shipped recipes
  config     [--check] print a recipe composed with its overrides, unset keys marked (runs
             nothing); --check also makes every check a run makes (files included)
  prepare    tokenise a pretraining recipe's corpus into data.cache_dir (no GPU, no weights)
  pretrain   further-pretrain in this process (several: accelerate launch further_pt/pretrain.py)
  finetune   fine-tune in this process (several: accelerate launch further_pt/finetune.py)
             pretrain/finetune -m [--launcher L] ... key=a,b: a sweep, one run per grid point,
             each in output_dir/key=value, summarised in output_dir/sweep.md and sweep.csv
  predict    model=DIR input=FILE output=FILE.jsonl|.parquet|.csv [top_k=K] [max_length=N]
             ...: a classifier's labels (any AutoModelForSequenceClassification folder)
  experiment run the FiT / ITPT / IDPT / CDPT (/ Feat) grid and write report.md and plots
  plot-schedule  recipe=NAME [steps=1000] [layers=12] [output=FILE.png]: lr per layer group
  plot-run   OUTPUT_DIR [output=FILE.png]: loss, lr and accuracy curves of a run
  select     corpus=[FILES] task=FILE output=FILE.txt.gz [k=50 ...]: the corpus documents
             nearest to the task's texts, as a pretraining corpus (kNN-TAPT); --help: all keys
  doctor     [work=DIR]: does further_pt run right here, and how fast (GPU: ~5 min)
"""


# --------------------------------------------------------------------------- config


PREDICT_USAGE = ("further-pt predict model=DIR input=FILE output=FILE.jsonl|.parquet|.csv "
                 "[batch_size=64] [top_k=K] [max_length=N] [text_column=C] "
                 "[text_pair_column=C] [label_column=C]")
_PREDICT_INTS = ("batch_size", "top_k", "max_length")
_PREDICT_KEYS = ("model", "input", "output", *_PREDICT_INTS, "text_column", "text_pair_column",
                 "label_column")


def _predict(args: list[str]) -> int:
    """Predict a file; what is read and how the text is cut is said before the model loads."""
    options = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = sorted(set(options) - set(_PREDICT_KEYS))
    missing = [k for k in ("model", "input", "output") if k not in options]
    if unknown or missing or len(options) != len(args):
        problem = f"unknown option {unknown[0]!r}" if unknown else (
            f"missing {missing[0]}=..." if missing else "options are key=value")
        raise ConfigError(f"predict: {problem}; usage: {PREDICT_USAGE}")
    numbers: dict[str, int] = {}
    for key in _PREDICT_INTS:
        if key in options:
            if not options[key].isdecimal() or int(options[key]) < 1:
                raise ConfigError(f"predict: {key}={options[key]} must be a positive integer")
            numbers[key] = int(options[key])
    readings = check_predict_inputs(options, max_length=numbers.get("max_length"))
    for reading in readings:
        print(f"Reading {reading.describe()}")
    metrics = prediction.predict_file(options["model"], options["input"], options["output"],
                                      batch_size=numbers.get("batch_size", 64),
                                      top_k=numbers.get("top_k"), readings=readings)
    print(f"Predictions: {options['output']}")
    if metrics:
        print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, float)}))
    return 0


def check_predict_inputs(options: dict[str, str], *, max_length: int | None
                         ) -> list[prediction.Reading]:
    """What predict needs, checked before the model loads: one line naming it, exit 2.

    The output's suffix (its format), weights cut short by an interrupted copy (which fail in
    safetensors with a traceback), the folder's config and preprocessing.json: the plan of
    what each task reads (:func:`prediction.plan`). The input's texts are checked by
    ``predict_file`` as training's are, also before the model loads.
    """
    prediction.output_format(options["output"])
    encoder.check_weights(options["model"], key="model")
    return prediction.plan(options["model"], max_length=max_length,
                           **{k: options[k] for k in ("text_column", "text_pair_column",
                                                      "label_column") if k in options})


def _options(args: list[str], allowed: set[str], usage: str) -> dict[str, str]:
    options = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = sorted(set(options) - allowed)
    if unknown or len(options) != len(args):
        problem = f"unknown option {unknown[0]!r}" if unknown else "options are key=value"
        raise ConfigError(f"{problem}; usage: {usage}")
    return options


def _plot_schedule(args: list[str]) -> int:
    recipe, _ = recipes.split_recipe_arg(args)
    usage = "further-pt plot-schedule recipe=NAME [steps=1000] [layers=12] [output=FILE.png]"
    options = _options([a for a in args if not a.startswith("recipe=")],
                       {"steps", "layers", "output"}, usage)
    overrides = [f"{k}={v}" for k, v in options.items() if k not in ("steps", "layers", "output")]
    cfg = recipes.compose(recipe, overrides)
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
    prepare.check_preparable(cfg)  # before the objective's checks load a tokenizer
    objective = masked_lm.MaskedLM(cfg, None)  # the run's own checks: config, tokenizer
    prepared = prepare.prepare(cfg, objective.sources, objective.tokenizer)
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


def _doctor(rest: list[str]) -> int:
    """Every check that applies on this machine, one line each, then the summary line."""
    from further_pt.cli import doctor

    options = dict(arg.split("=", 1) for arg in rest if "=" in arg)
    unknown = sorted(set(options) - {"work"}) + [a for a in rest if "=" not in a]
    if unknown:
        raise ConfigError(f"doctor: unknown option {unknown[0]!r} (usage: further-pt doctor "
                          "[work=DIR])")
    work = Path(options["work"]) if "work" in options else None
    checks = doctor.diagnose(work)
    print(doctor.summary(checks))
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def _select(rest: list[str]) -> int:
    """The corpus documents nearest to a task's texts, written as a pretraining corpus."""
    from further_pt.data import selection

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(selection.summary(selection.select(selection.parse(rest))))
    return 0


def _select_help() -> str:
    from further_pt.data import selection

    return selection.HELP


#: ``further-pt VERB --help``: what each verb takes (a callable: built when asked).
HELP: dict[str, Any] = {
    "recipes": "usage: further-pt recipes\n\nThe shipped recipes, one line each: name, kind "
               "(pretrain, finetune, experiment) and what it is.\n",
    "config": "usage: further-pt config [--check] recipe=NAME [key=value ...]\n\n"
              "Print the recipe composed with its bases and overrides, each key with what it "
              "does\n(its comment in the recipe), each key a run still needs marked; runs "
              "nothing, exit 0.\n--check: make every check the run makes, files included "
              "(exit 2 on the first problem).\n",
    "prepare": "usage: further-pt prepare recipe=NAME [key=value ...]\n\nTokenise a "
               "pretraining recipe's corpus into data.cache_dir ahead of the GPU job (no "
               "weights,\nno GPU): the run with the same data.*, objective.nsp and tokenizer "
               "settings reuses it.\n",
    "pretrain": lambda: pretrain.usage() + "\n" + SWEEP_HELP,
    "finetune": lambda: finetune.usage() + "\n" + SWEEP_HELP,
    "predict": lambda: f"usage: {PREDICT_USAGE}\n\n" + PREDICT_HELP,
    "experiment": "usage: further-pt experiment recipe=NAME task.train_file=... "
                  "task.eval_file=... [corpora...] [key=value ...]\n\nRun the study grid "
                  "(BERT-FiT, -ITPT-, -IDPT-, -CDPT-FiT, ... per seed and training size)\n"
                  "and write report.md, report.csv, paired.csv and the plots into output_dir; "
                  "a rerun resumes.\n`further-pt config recipe=paper_grid` shows every key.\n",
    "plot-schedule": "usage: further-pt plot-schedule recipe=NAME [steps=1000] [layers=12] "
                     "[output=FILE.png]\n\nThe learning rate of each layer group over a "
                     "fine-tuning recipe's steps.\n",
    "plot-run": "usage: further-pt plot-run OUTPUT_DIR [output=FILE.png]\n\nLoss, learning "
                "rate, held-out and dev metrics of a run, from its logs/metrics.jsonl.\n",
    "select": _select_help,
    "doctor": "usage: further-pt doctor [work=DIR]\n\nDoes further_pt run right on this "
              "machine, and how fast: versions, devices, a short\ntraining run with its "
              "tokens/s and MFU, parity and resume checks (GPU: about 5 minutes).\n",
}
PREDICT_HELP = """\
Labels of a sequence classifier for a file of texts (.jsonl/.csv/.tsv/.parquet or hf:...).
model: a further_pt fine-tuned folder (final/, best/: text cut and columns as in training,
  every task of a multi-task model) or any AutoModelForSequenceClassification folder (text
  column 'text', cut at max_length: the tokenizer's model_max_length unless given).
output: the format from the suffix; each row is the input row plus prediction and
  probabilities ({label: p}), or with top_k=K the K best [{label, score}] (multi-task:
  TASK_prediction, ...). csv holds the nested values as JSON text.
text_column, text_pair_column, label_column: the input's columns, if not the folder's (a
  label column gives metrics). On a GPU: autocast (bf16) and batches padded to multiples of 8.
"""
SWEEP_HELP = ("A sweep: further-pt {pretrain,finetune} -m [--launcher L] recipe=NAME key=a,b "
              "...\nruns one run per grid point, each in output_dir/key=value, summarised in "
              "output_dir/sweep.md.\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command in HELP and launch.wants_help(rest):
            print(HELP[command]() if callable(HELP[command]) else HELP[command], end="")
            return 0
        if command == "recipes":
            for name in recipes.available_recipes():
                print(f"{name:14s} {recipes.kind_of(name):10s} {recipes.describe(name)}")
            return 0
        if command == "config":
            return show_config.command(rest)
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
        if command == "select":
            return _select(rest)
        if command in ("pretrain", "finetune") and sweep.wanted(rest):
            return sweep.main(command, rest)
        if command == "doctor":
            return _doctor(rest)
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
