"""Experiment: Sun et al.'s Table 6 on your data, in one command.

    further-pt experiment recipe=paper_grid task.train_file=train.jsonl task.eval_file=dev.jsonl \\
        corpora.in_domain=[domain/*.txt] corpora.cross_domain=[general/*.txt] seeds=[1,2,3]

From one base encoder it runs the variants (``fit``: no further pretraining;
``itpt`` / ``idpt`` / ``cdpt``: further pretraining on the task's own text, on
in-domain text, on all domains mixed; ``feat``: BERT-Feat, a frozen encoder),
fine-tunes each with every seed and every training-set size (``train_sizes``:
a seeded, stratified sample of the labelled file, the same rows for every
starting model at a seed; ``null`` = all of it; Sun et al.'s sec. 5.5), and
writes a report (see report.py). The ``linear`` variant, a TF-IDF + logistic
regression reference (linear_baseline.py), trains on the same rows in-process
in seconds and is recorded as a stage like the others. Every
stage is a folder under ``output_dir`` run by the same entry points users call
(``accelerate launch further_pt/pretrain.py ...``, so it scales to GPUs and
nodes); a finished stage is never redone and an interrupted one resumes, so
re-running the command after a crash continues where it stopped. The grid
(``seeds``, ``variants``, ``train_sizes``) may grow or shrink between runs into
the same ``output_dir``: only missing stages run. Any other change is refused,
because finished stages would silently disagree with it.

With ``general_pretraining`` the base encoder is first pretrained from scratch
on the general (cross-domain) corpus, so a whole study runs offline with a small
model. The last ``forgetting.docs`` documents of the general corpus are held
out of every pretraining run; each pretrained model's MLM loss on them is the
report's forgetting column (does domain pretraining forget general text?). A seeded sample of
``forgetting.in_domain_docs`` in-domain documents that no variant trains on gives the held-out
in-domain column: each encoder's MLM loss and perplexity on its domain (:mod:`.heldout`).

``task.kind`` (single_label, multi_label, regression) is every fine-tuning stage's, and the
report's columns follow it (:mod:`.measures`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from further_pt import finetune, pretrain
from further_pt.config import recipes
from further_pt.config.validate import expand_paths
from further_pt.errors import ConfigError
from further_pt.files import atomic_write_text
from further_pt.objectives.kinds import KINDS
from further_pt.study import heldout, linear, measures, report, variants
from further_pt.study.variants import finetune_stage

logger = logging.getLogger("further_pt.study.experiment")
SCRIPTS = Path(__file__).resolve().parents[1]  # further_pt/: pretrain.py, finetune.py
# `selected` (kNN-TAPT, Gururangan et al. 2020): in-domain documents nearest the task's texts,
# chosen by `further-pt select`; pretrained like in-domain text.
PRETRAIN_RECIPES = {"itpt": "within_task", "idpt": "in_domain", "cdpt": "cross_domain",
                    "selected": "in_domain"}
VARIANTS = ("fit", "itpt", "idpt", "cdpt", "selected", "feat", "linear")
STAGES = "stages.json"
ENTRY_POINTS = {"pretrain.py": pretrain.main, "finetune.py": finetune.main}
# Keys that may change between runs into one output dir: they only add (or drop) stages, or
# say how stages run (a grid resumed on a bigger machine).
GRID_KEYS = ("seeds", "variants", "train_sizes", "ablations", "launcher")


def launcher(words: list[str]) -> list[str]:
    """The stage launcher: ``python`` is this interpreter, ``accelerate`` its accelerate."""
    if words and words[0] == "python":
        return [sys.executable, *words[1:]]
    if words and words[0] == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", *words[2:]]
    return list(words)


class StageFailed(RuntimeError):
    """A stage exited non-zero; finished stages are kept and a re-run continues."""


class Runner:
    """Runs stages (subprocesses, or in-process for seconds-long ones), skips finished ones,
    records their wall time in stages.json."""

    def __init__(self, cfg: DictConfig, out: Path) -> None:
        self.cfg, self.out = cfg, out
        self.launch = launcher(list(cfg.launcher))
        self.record_path = out / STAGES
        self.record: dict[str, Any] = (json.loads(self.record_path.read_text())
                                       if self.record_path.is_file() else {})

    def run(self, name: str, script: str, args: list[str], done: Path) -> None:
        """Run ``script`` with ``args`` under the launcher, unless ``done`` shows it finished."""
        def call() -> int:
            if self.launch == ["inprocess"]:  # tests and debugging: no interpreter start-up
                return ENTRY_POINTS[script](args)
            return subprocess.run([*self.launch, str(SCRIPTS / script), *args],
                                  check=False).returncode

        self._stage(name, done, call)

    def run_inline(self, name: str, work: Callable[[], None], done: Path) -> None:
        """Run ``work()`` in this process (a stage of seconds), recorded and skipped the same way.

        Its exception (a ConfigError or DataError naming the culprit) propagates after the
        stage is recorded as unfinished.
        """
        def call() -> int:
            work()
            return 0

        self._stage(name, done, call)

    def _stage(self, name: str, done: Path, call: Callable[[], int]) -> None:
        if name in self.record and self.record[name].get("finished") and done.exists():
            logger.info("stage %s: finished before, skipped", name)
            return
        logger.info("stage %s: running", name)
        start = time.time()
        try:
            returncode = call()
        except BaseException:
            self._record(name, start=start, returncode=1)
            raise
        self._record(name, start=start, returncode=returncode)
        if returncode != 0:
            raise StageFailed(f"stage {name} failed (exit {returncode}); fix the cause and "
                              "re-run the same command: finished stages are kept and the "
                              "interrupted one resumes")

    def _record(self, name: str, *, start: float, returncode: int) -> None:
        seconds = time.time() - start + self.record.get(name, {}).get("seconds", 0.0)
        self.record[name] = {"seconds": seconds, "finished": returncode == 0}
        atomic_write_text(self.record_path, json.dumps(self.record, indent=1))


def _grid_free(resolved: Any) -> Any:
    """The config without the grid axes: what a finished stage's result depends on."""
    return {k: v for k, v in resolved.items() if k not in GRID_KEYS}


def _changed(saved: Any, resolved: Any) -> list[str]:
    """Grid-free keys whose value differs; keys the saved experiment lacks (added to
    further_pt after it started, so it ran without them) are not a change."""
    old, new = recipes.flatten(_grid_free(saved)), recipes.flatten(_grid_free(resolved))
    return sorted(k for k in old if old[k] != new.get(k))


def check_sizes(cfg: DictConfig) -> int:
    """Read the training labels once; every size must be drawable. Returns the row count.

    Done before any stage, so a size the file cannot give fails in seconds, not after the
    pretraining hours (the fine-tuning stages would refuse it too, with the same rule).
    """
    task, kind = cfg.task, measures.kind_of(cfg)
    _, labels, names = linear.read_train(task.train_file, task.text_column,
                                         task.label_column, kind)
    for size in cfg.train_sizes:
        if size is None:
            continue
        try:
            linear.sample_rows(labels, size, cfg.seeds[0], num_classes=len(names),
                               where=task.train_file, kind=kind)
        except ConfigError as exc:
            raise ConfigError(f"config key 'train_sizes': {str(exc).split(': ', 1)[-1]}"
                              ) from None
    return len(labels)


def run(cfg: DictConfig) -> Path:
    out = Path(cfg.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "experiment.yaml"
    before = OmegaConf.to_container(OmegaConf.load(saved)) if saved.is_file() else None
    legacy = before is not None and "in_domain_docs" not in before.get("forgetting", {})
    if legacy:
        # started before the held-out in-domain sample existed: its finished stages may have
        # trained on any in-domain document, so none can be called held out
        logger.info("output_dir %s was started without forgetting.in_domain_docs: no held-out "
                    "in-domain column for it", out)
        cfg.forgetting.in_domain_docs = 0
    resolved = OmegaConf.to_container(cfg, resolve=True)
    changed = _changed(before, resolved) if before is not None else []
    if changed:
        raise ConfigError(f"output_dir {out} holds an experiment with a different config "
                          f"({changed[0]}; only {', '.join(GRID_KEYS)} may change); use another "
                          "output_dir")
    train_rows = check_sizes(cfg)
    heldout.check(cfg)
    grid = {*cfg.variants, *(a.variant for a in cfg.ablations)}
    in_domain_files, in_domain_heldout = heldout.split_in_domain(
        cfg, out, pretrains_on_it=bool({"idpt", "cdpt"} & grid))
    general_files, general_heldout = heldout.split_general(
        cfg, out, exclude=in_domain_heldout if "cdpt" in grid else None)
    if legacy:
        del resolved["forgetting"]["in_domain_docs"]  # stays absent: every rerun decides as above
    atomic_write_text(saved, OmegaConf.to_yaml(resolved))
    runner = Runner(cfg, out)
    pre_over = heldout.pretrain_overrides(cfg, in_domain_heldout)

    base = cfg.base_model
    if cfg.general_pretraining is not None:
        folder = out / "general"
        runner.run("general", "pretrain.py", [
            f"recipe={cfg.general_pretraining.recipe}", f"output_dir={folder}",
            f"data.train_files=[{','.join(general_files)}]",
            *cfg.general_pretraining.overrides], folder / "final")
        base = str(folder / "final")
    task = cfg.task
    corpora = {"itpt": list(cfg.corpora.within_task or [task.train_file]),
               "idpt": in_domain_files,
               "cdpt": [*in_domain_files, *general_files],
               "selected": list(cfg.corpora.selected or [])}
    models: dict[str, str] = {"fit": str(base), "feat": str(base)}
    for variant in ("itpt", "idpt", "cdpt", "selected"):  # once each, shared by sizes and seeds
        if variant not in cfg.variants:
            continue
        folder = out / f"pretrain-{variant}"
        extra = [f"data.text_column={task.text_column}"] if variant == "itpt" else []
        runner.run(f"pretrain-{variant}", "pretrain.py", [
            f"recipe={PRETRAIN_RECIPES[variant]}", f"output_dir={folder}",
            f"model.name_or_path={base}", f"data.train_files=[{','.join(corpora[variant])}]",
            *extra, *pre_over], folder / "final")
        models[variant] = str(folder / "final")
    for ablation in cfg.ablations:  # a variant's pretraining with its own overrides
        folder = out / f"pretrain-{ablation.name}"
        extra = [f"data.text_column={task.text_column}"] if ablation.variant == "itpt" else []
        runner.run(f"pretrain-{ablation.name}", "pretrain.py", [
            f"recipe={PRETRAIN_RECIPES[ablation.variant]}", f"output_dir={folder}",
            f"model.name_or_path={base}",
            f"data.train_files=[{','.join(corpora[ablation.variant])}]",
            *extra, *pre_over, *ablation.overrides], folder / "final")
        models[ablation.name] = str(folder / "final")
    by_size = {b.size: list(b.overrides) for b in cfg.finetune.by_size}
    for size in cfg.train_sizes:
        for variant in variants.keys_at(cfg, size):
            for seed in cfg.seeds:
                name = finetune_stage(variant, size, seed)
                folder = out / name
                if variant == "linear":
                    runner.run_inline(name, lambda f=folder, n=size, s=seed: _linear(cfg, f, n, s),
                                      folder / "metrics.json")
                    continue
                recipe = "feat" if variant == "feat" else cfg.finetune.recipe
                runner.run(name, "finetune.py", [
                    f"recipe={recipe}", f"output_dir={folder}",
                    f"model.name_or_path={models[variant]}", f"seed={seed}",
                    f"data.train_file={task.train_file}", f"data.eval_file={task.eval_file}",
                    f"data.text_column={task.text_column}",
                    f"data.label_column={task.label_column}",
                    f"task.kind={measures.kind_of(cfg)}",
                    f"data.max_train_examples={'null' if size is None else size}",
                    *cfg.finetune.overrides, *by_size.get(size, [])], folder / "metrics.json")
    # None: the model has no trained MLM head (a head-less base such as a sentence-transformers
    # checkpoint), so its loss would score a random head
    forgetting, in_domain = {}, {}
    if general_heldout is not None:
        forgetting = heldout.losses(models, general_heldout.read_text().splitlines(),
                                    out / "forgetting.json",
                                    max_seq_length=cfg.forgetting.max_seq_length)
    if in_domain_heldout is not None:
        in_domain = heldout.losses(models, in_domain_heldout.read_text().splitlines(),
                                   out / "heldout_in_domain.json",
                                   max_seq_length=cfg.forgetting.max_seq_length)
    return report.write(out, cfg, runner.record, forgetting, train_rows=train_rows,
                        in_domain=in_domain)


def _linear(cfg: DictConfig, folder: Path, size: int | None, seed: int) -> None:
    """The ``linear`` stage: TF-IDF + logistic regression on the fine-tuner's rows for the seed."""
    task, lin = cfg.task, cfg.linear
    linear.run(folder, train_file=task.train_file, eval_file=task.eval_file,
               text_column=task.text_column, label_column=task.label_column,
               size=size, seed=seed, C=lin.C, word_ngrams=list(lin.word_ngrams),
               char_ngrams=list(lin.char_ngrams), kind=measures.kind_of(cfg))


def load(argv: list[str]) -> DictConfig:
    """Recipe + overrides -> a validated experiment config (ConfigError otherwise)."""
    return recipes.load(argv, recipes.ExperimentSchema, kind="experiment", validate=validate)


def _validate_ablations(cfg: DictConfig) -> None:
    names = [a.name for a in cfg.ablations]
    for i, ablation in enumerate(cfg.ablations):
        key = f"config key 'ablations[{i}]"
        if not re.fullmatch(r"[a-z0-9_]+", ablation.name) or ablation.name in VARIANTS:
            raise ConfigError(f"{key}.name': {ablation.name!r} must be lowercase letters, digits "
                              f"and _, and not a variant ({', '.join(VARIANTS)})")
        if ablation.name in names[:i]:
            raise ConfigError(f"{key}.name': {ablation.name!r} is listed twice")
        if ablation.variant not in PRETRAIN_RECIPES:
            raise ConfigError(f"{key}.variant': must be one of {', '.join(PRETRAIN_RECIPES)}, "
                              f"got {ablation.variant!r}")
        if ablation.variant not in cfg.variants:
            raise ConfigError(f"{key}.variant': {ablation.variant} is not in variants; an "
                              "ablation is compared with the variant it changes")
        stray = [s for s in ablation.get("train_sizes") or [] if s not in cfg.train_sizes]
        if stray:
            raise ConfigError(f"{key}.train_sizes': {'null' if stray[0] is None else stray[0]} "
                              "is not one of train_sizes")


def validate(cfg: DictConfig) -> None:
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"config key 'variants': unknown variant {unknown[0]!r} "
                          f"(choose from {', '.join(VARIANTS)})")
    if "fit" not in cfg.variants:
        raise ConfigError("config key 'variants': include 'fit', the baseline the others are "
                          "compared with")
    if not cfg.seeds:
        raise ConfigError("config key 'seeds': give at least one seed")
    if measures.kind_of(cfg) not in KINDS:
        raise ConfigError(f"config key 'task.kind': must be one of {', '.join(KINDS)}; got "
                          f"{cfg.task.kind!r}")
    _validate_ablations(cfg)
    for i, entry in enumerate(cfg.finetune.by_size):
        if entry.size not in list(cfg.train_sizes):
            raise ConfigError(f"config key 'finetune.by_size[{i}].size': {entry.size} is not one "
                              "of train_sizes")
    sizes = list(cfg.train_sizes)
    if not sizes:
        raise ConfigError("config key 'train_sizes': give at least one size (null = all)")
    bad = [n for n in sizes if n is not None and (isinstance(n, bool) or n < 1)]
    if bad:
        raise ConfigError(f"config key 'train_sizes': {bad[0]} is not a positive number of "
                          "examples (null = all)")
    repeated = [n for i, n in enumerate(sizes) if n in sizes[:i]]
    if repeated:
        shown = "null" if repeated[0] is None else repeated[0]
        raise ConfigError(f"config key 'train_sizes': {shown} is listed twice")
    if "linear" in cfg.variants:
        linear.require_sklearn()
        if cfg.linear.C <= 0:
            raise ConfigError(f"config key 'linear.C': must be > 0, got {cfg.linear.C}")
        for key in ("word_ngrams", "char_ngrams"):
            pair = list(cfg.linear[key])
            if len(pair) != 2 or not 1 <= pair[0] <= pair[1]:
                raise ConfigError(f"config key 'linear.{key}': give [min, max] with "
                                  f"1 <= min <= max, got {pair}")
    if (cfg.base_model is None) == (cfg.general_pretraining is None):
        raise ConfigError("config key 'base_model': give either base_model or "
                          "general_pretraining (a base built from scratch), not both")
    for key in ("train_file", "eval_file"):
        path = cfg.task[key]
        if not Path(path).is_file():
            raise ConfigError(f"config key 'task.{key}': file {path} does not exist")
    needs = {"idpt": "in_domain", "cdpt": "cross_domain", "selected": "selected"}
    for variant, key in needs.items():
        if variant in cfg.variants and not cfg.corpora[key]:
            raise ConfigError(f"config key 'corpora.{key}': variant {variant} needs a corpus")
    for key in ("within_task", "in_domain", "cross_domain", "selected"):
        for i, spec in enumerate(cfg.corpora[key] or []):
            if not expand_paths(spec):
                raise ConfigError(f"config key 'corpora.{key}[{i}]': no file matches {spec!r}")
    if cfg.general_pretraining is not None and not cfg.corpora.cross_domain:
        raise ConfigError("config key 'corpora.cross_domain': general pretraining needs it")
    if shutil.which(cfg.launcher[0]) is None and cfg.launcher[0] not in (
            "python", "accelerate", "inprocess"):
        raise ConfigError(f"config key 'launcher': {cfg.launcher[0]!r} is not a command here")
