"""The ``further-pt`` command: list recipes, check a config, run a job, predict.

    further-pt recipes                                 # the shipped recipes, one line each
    further-pt config recipe=fit                       # the composed recipe, unset keys marked
    further-pt config --check recipe=fit data.train_file=t.jsonl  # every check a run makes
    further-pt prepare recipe=in_domain data.cache_dir=DIR ...  # tokenise ahead on a CPU
    further-pt pretrain recipe=demo                    # in this process; for several processes:
    further-pt finetune recipe=fit ...                 #   accelerate launch further_pt/<job>.py
    further-pt finetune -m recipe=fit train.lr=1e-5,2e-5 ...  # a sweep: one run per value
    further-pt predict model=runs/fit/final input=test.jsonl output=predictions.jsonl
    further-pt experiment recipe=paper_grid task.train_file=... task.eval_file=... corpora...
    further-pt plot-schedule recipe=ulmfit [steps=1000] [layers=12] [output=schedule.png]
    further-pt plot-run runs/fit [output=run.png]
    further-pt select corpus=[in_domain.txt.gz] task=train.jsonl k=50 output=knn.txt.gz
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from further_pt import finetune, pretrain
from further_pt.config import recipes, validate
from further_pt.config.schema import REQUIRED_ONE_OF
from further_pt.data import corpus, labelled, prepare
from further_pt.errors import ConfigError, FurtherPTError
from further_pt.objectives import encoder, masked_lm
from further_pt.objectives.evaluation import PREPROCESSING, predict_file
from further_pt.study import experiment, sweep
from further_pt.study.plots import plot_run, plot_schedule, schedule_curves

USAGE = """usage: further-pt COMMAND [recipe=NAME] [key=value ...]

  recipes    list the shipped recipes
  config     [--check] print a recipe composed with its overrides, unset keys marked (runs
             nothing); --check also makes every check a run makes (files included)
  prepare    tokenise a pretraining recipe's corpus into data.cache_dir (no GPU, no weights)
  pretrain   further-pretrain in this process (several: accelerate launch further_pt/pretrain.py)
  finetune   fine-tune in this process (several: accelerate launch further_pt/finetune.py)
             pretrain/finetune -m [--launcher L] ... key=a,b: a sweep, one run per grid point,
             each in output_dir/key=value, summarised in output_dir/sweep.md and sweep.csv
  predict    model=DIR input=FILE output=FILE [batch_size=64]: predictions as JSON lines
  experiment run the FiT / ITPT / IDPT / CDPT (/ Feat) grid and write report.md and plots
  plot-schedule  recipe=NAME [steps=1000] [layers=12] [output=FILE.png]: lr per layer group
  plot-run   OUTPUT_DIR [output=FILE.png]: loss, lr and accuracy curves of a run
  select     corpus=[FILES] task=FILE output=FILE.txt.gz [k=50 ...]: the corpus documents
             nearest to the task's texts, as a pretraining corpus (kNN-TAPT); --help: all keys
  doctor     [work=DIR]: does further_pt run right here, and how fast (GPU: ~5 min)
"""


class Kind(NamedTuple):
    """A recipe kind: how ``further-pt config`` recognises, shows, checks and runs it."""

    marker: str  # the top-level key that marks a composed recipe as this kind
    load: Callable[[list[str]], Any]  # the job's loader: every check a run makes
    schema: type
    check_values: Callable[..., None] | None  # its validator, called with check_files=False
    command: str  # what runs it


KINDS: dict[str, Kind] = {
    "pretrain": Kind("objective", pretrain.load, recipes.PretrainSchema,
                     validate.validate_pretrain, "accelerate launch further_pt/pretrain.py"),
    "finetune": Kind("head", finetune.load, recipes.FinetuneSchema, validate.validate_finetune,
                     "accelerate launch further_pt/finetune.py"),
    # experiment.validate opens the task files: `config` shows an experiment typed only
    "experiment": Kind("variants", experiment.load, recipes.ExperimentSchema, None,
                       "further-pt experiment"),
}
NOT_SET = "# <- not set: required before a run"


def recipe_kind(recipe: str) -> str:
    """The kind of a recipe, from the keys of its composed form (bases included)."""
    keys = set(recipes.compose(recipe, []))
    return next((name for name, kind in KINDS.items() if kind.marker in keys), "unknown")


# --------------------------------------------------------------------------- config


@dataclass
class Draft:
    """A recipe as ``further-pt config`` shows it: composed and typed, unset keys named."""

    cfg: DictConfig
    unset: dict[str, str]  # key a run needs that nobody set yet -> what may replace it, or ""
    values_checked: bool  # the kind's validator ran (every value a run checks, files aside)


def draft(argv: list[str], name: str) -> Draft:
    """A recipe for reading before the user has data: the job's loader minus two refusals.

    A key the user still has to give (``???``, or a null that a run needs:
    ``schemas.REQUIRED_ONE_OF``) is reported rather than refused, and no data file is
    opened; that is for the run (or ``--check``). Unknown keys and wrong types are still
    errors. The kind's validator (``check_files=False``) checks every other value on a copy
    in which each unset key holds a placeholder, so a bad ``train.lr`` is caught, and a
    derived value (a fitted warm-up) is shown, even while ``data.train_file`` is unset.
    """
    kind = KINDS[name]
    recipe, overrides = recipes.split_recipe_arg(argv)
    cfg = recipes.typed(recipes.compose_kind(recipe, overrides, kind.schema, name), kind.schema)
    unset = unset_keys(cfg, kind.schema)
    trial = _with_placeholders(cfg, unset) if kind.check_values is not None else None
    if kind.check_values is None or trial is None:
        return Draft(cfg, unset, values_checked=False)
    kind.check_values(trial, check_files=False)
    missing = set(OmegaConf.missing_keys(cfg))
    for key in unset:  # back to what the recipe says
        OmegaConf.update(trial, key, MISSING if key in missing else None, merge=False)
    return Draft(trial, unset, values_checked=True)


def unset_keys(cfg: DictConfig, schema: type) -> dict[str, str]:
    """The ``???`` keys, and the first key of each ``REQUIRED_ONE_OF`` group left all null
    (with the others as what may replace it: ``{"data.train_file": "tasks"}``)."""
    missing = set(OmegaConf.missing_keys(cfg))
    unset = dict.fromkeys(sorted(missing), "")
    for first, *others in REQUIRED_ONE_OF.get(schema, ()):
        if all(k not in missing and OmegaConf.select(cfg, k, throw_on_missing=False) is None
               for k in (first, *others)):
            unset[first] = ", ".join(others)
    return unset


def _with_placeholders(cfg: DictConfig, keys: Iterable[str]) -> DictConfig | None:
    """A copy with a stand-in path (or list of one) in each unset key; None if a key takes
    neither, so the values cannot be checked before it is set."""
    trial = copy.deepcopy(cfg)
    for key in keys:
        for value in ("<not set>", ["<not set>"]):
            try:
                OmegaConf.update(trial, key, value, merge=False)
                break
            except (OmegaConfBaseException, ValueError):
                continue
        else:
            return None
    return trial


def mark_unset(text: str, unset: dict[str, str]) -> tuple[str, list[str]]:
    """Append ``NOT_SET`` to the YAML line of each unset key; (text, the keys in line order).

    The YAML is OmegaConf's: two spaces per level, a list's items at their key's level.
    """
    path: list[str] = []
    lines, found = [], []
    for line in text.splitlines():
        body = line.lstrip(" ")
        if body and not body.startswith(("- ", "#")) and ":" in body:
            del path[(len(line) - len(body)) // 2:]
            path.append(body.split(":", 1)[0].strip("'\""))
            key = ".".join(path)
            if key in unset:
                found.append(key)
                line = f"{line}  {NOT_SET}" + (f" (or {unset[key]})" if unset[key] else "")
        lines.append(line)
    return "\n".join(lines) + "\n", found + [k for k in unset if k not in found]


def _config(args: list[str]) -> int:
    """``further-pt config [--check] recipe=NAME [key=value ...]``: print the composed recipe.

    Without ``--check`` it is the first thing a new user runs, before they have data:
    the recipe with each key a run still needs marked, exit 0. ``--check`` runs the job's
    own loader, so it passes or fails exactly as the run's first second would (exit 2).
    """
    check = "--check" in args
    args = [a for a in args if a != "--check"]
    recipe, _ = recipes.split_recipe_arg(args)
    name = recipe_kind(recipe)
    if name not in KINDS:
        raise ConfigError(f"recipe {recipe!r} has none of the keys that mark a recipe "
                          f"kind ({', '.join(k.marker for k in KINDS.values())})")
    kind = KINDS[name]
    if check:
        print(recipes.to_yaml(kind.load(args)), end="")
        print(f"# checked; run it with: {kind.command} {' '.join(args)}", file=sys.stderr)
        return 0
    shown = draft(args, name)
    body, unset = mark_unset(recipes.to_yaml(shown.cfg), shown.unset)
    values = "values checked" if shown.values_checked else "values not checked"
    print(f"# recipe {recipe} ({name}): composed with its bases and overrides; {values},\n"
          "# files not opened (a run opens them, as does `further-pt config --check ...`)")
    if unset:
        named = [k + (f" (or {shown.unset[k]})" if shown.unset[k] else "") for k in unset]
        print(f"# not set (marked below), required before a run: {', '.join(named)}")
    print(body, end="")
    given = [a for a in args if a.split("=", 1)[0] not in unset]
    todo = "".join(f" {key}=..." for key in unset)
    print(f"# run it with: {kind.command} {' '.join(given)}{todo}", file=sys.stderr)
    return 0


def _describe(name: str) -> str:
    lines = (recipes.recipes_dir() / f"{name}.yaml").read_text().splitlines()
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
    check_predict_inputs(options["model"], options["input"])
    metrics = predict_file(options["model"], options["input"], options["output"],
                           batch_size=int(options.get("batch_size", 64)))
    print(f"Predictions: {options['output']}")
    if metrics:
        print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, float)}))
    return 0


def check_predict_inputs(model_dir: str, input_path: str) -> None:
    """What predict reads, checked before the model loads: one line naming the file, exit 2.

    A weights file cut short by an interrupted copy fails in safetensors with a traceback,
    and predict's reader (``evaluation.predict_file``) does not check texts as training's
    does: a null text was predicted as "", a number crashed the tokenizer. The model folder
    itself (config.json, preprocessing.json) is left to ``predict_file``, which names it.
    """
    encoder.check_weights(model_dir, key="model")
    prep_path = Path(model_dir) / PREPROCESSING
    if not prep_path.is_file():
        return
    try:
        prep = json.loads(prep_path.read_text())
        text_columns = [c for c in (prep["text_column"], prep["text_pair_column"]) if c]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"model: {prep_path} is damaged ({' '.join(str(exc).split())[:120]});"
                          " copy the model folder again") from None
    labelled.read_predict_input(input_path, text_columns)


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

    if "--help" in rest or "-h" in rest:
        print(selection.HELP, end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(selection.summary(selection.select(selection.parse(rest))))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "recipes":
            for name in recipes.available_recipes():
                print(f"{name:14s} {recipe_kind(name):10s} {_describe(name)}")
            return 0
        if command == "config":
            return _config(rest)
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
