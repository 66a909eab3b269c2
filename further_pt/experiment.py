"""Experiment: Sun et al.'s Table 6 on your data, in one command.

    further-pt experiment recipe=paper_grid task.train_file=train.jsonl task.eval_file=dev.jsonl \\
        corpora.in_domain=[domain/*.txt] corpora.cross_domain=[general/*.txt] seeds=[1,2,3]

From one base encoder it runs the variants (``fit``: no further pretraining;
``itpt`` / ``idpt`` / ``cdpt``: further pretraining on the task's own text, on
in-domain text, on all domains mixed; ``feat``: BERT-Feat, a frozen encoder),
fine-tunes each with every seed, and writes a report (see report.py). Every
stage is a folder under ``output_dir`` run by the same entry points users call
(``accelerate launch further_pt/pretrain.py ...``, so it scales to GPUs and
nodes); a finished stage is never redone and an interrupted one resumes, so
re-running the command after a crash continues where it stopped.

With ``general_pretraining`` the base encoder is first pretrained from scratch
on the general (cross-domain) corpus, so a whole study runs offline with a small
model. The last ``forgetting.docs`` documents of the general corpus are held
out of every pretraining run; each pretrained model's MLM loss on them is the
report's forgetting column (does domain pretraining forget general text?).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from further_pt import checkpoint, config, corpus, evaluation, report
from further_pt.config import expand_paths
from further_pt.errors import ConfigError

logger = logging.getLogger("further_pt.experiment")
SCRIPTS = Path(__file__).resolve().parent
PRETRAIN_RECIPES = {"itpt": "within_task", "idpt": "in_domain", "cdpt": "cross_domain"}
VARIANTS = ("fit", "itpt", "idpt", "cdpt", "feat")
STAGES = "stages.json"


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
    """Runs stages as subprocesses, skips finished ones, records their wall time."""

    def __init__(self, cfg: DictConfig, out: Path) -> None:
        self.cfg, self.out = cfg, out
        self.launch = launcher(list(cfg.launcher))
        self.record_path = out / STAGES
        self.record: dict[str, Any] = (json.loads(self.record_path.read_text())
                                       if self.record_path.is_file() else {})

    def run(self, name: str, script: str, args: list[str], done: Path) -> None:
        if name in self.record and self.record[name].get("finished") and done.exists():
            logger.info("stage %s: finished before, skipped", name)
            return
        logger.info("stage %s: running", name)
        start = time.time()
        proc = subprocess.run([*self.launch, str(SCRIPTS / script), *args], check=False)
        seconds = time.time() - start + self.record.get(name, {}).get("seconds", 0.0)
        self.record[name] = {"seconds": seconds, "finished": proc.returncode == 0}
        checkpoint.atomic_write_text(self.record_path, json.dumps(self.record, indent=1))
        if proc.returncode != 0:
            raise StageFailed(f"stage {name} failed (exit {proc.returncode}); fix the cause and "
                              "re-run the same command: finished stages are kept and the "
                              "interrupted one resumes")


def split_general(cfg: DictConfig, out: Path) -> tuple[list[str], Path | None]:
    """Write the general corpus minus its last ``forgetting.docs`` documents, and those apart."""
    files = [f for spec in cfg.corpora.cross_domain for f in expand_paths(spec)]
    if not files or cfg.forgetting.docs == 0:
        return list(cfg.corpora.cross_domain), None
    data = out / "data"
    train, held = data / "general-train.txt", data / "general-heldout.txt"
    if not held.is_file():
        data.mkdir(parents=True, exist_ok=True)
        lines: list[str] = []
        for path in files:
            with corpus.open_bytes(path) as fh:
                lines += [x.decode("utf-8", "replace").rstrip("\n") for x in fh if x.strip()]
        keep = cfg.forgetting.docs
        if len(lines) <= 2 * keep:
            raise ConfigError(f"corpora.cross_domain has {len(lines)} documents: too few to hold "
                              f"out forgetting.docs={keep}")
        checkpoint.atomic_write_text(train, "\n".join(lines[:-keep]) + "\n")
        checkpoint.atomic_write_text(held, "\n".join(lines[-keep:]) + "\n")
    return [str(train)], held


def run(cfg: DictConfig) -> Path:
    out = Path(cfg.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "experiment.yaml"
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if saved.is_file() and OmegaConf.to_container(OmegaConf.load(saved)) != resolved:
        raise ConfigError(f"output_dir {out} holds an experiment with a different config; "
                          "use another output_dir")
    checkpoint.atomic_write_text(saved, OmegaConf.to_yaml(resolved))
    runner = Runner(cfg, out)
    general_files, heldout = split_general(cfg, out)
    pre_over = list(cfg.pretrain.overrides)

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
               "idpt": list(cfg.corpora.in_domain),
               "cdpt": [*cfg.corpora.in_domain, *general_files]}
    models: dict[str, str] = {"fit": str(base), "feat": str(base)}
    for variant in ("itpt", "idpt", "cdpt"):
        if variant not in cfg.variants:
            continue
        folder = out / f"pretrain-{variant}"
        extra = [f"data.text_column={task.text_column}"] if variant == "itpt" else []
        runner.run(f"pretrain-{variant}", "pretrain.py", [
            f"recipe={PRETRAIN_RECIPES[variant]}", f"output_dir={folder}",
            f"model.name_or_path={base}", f"data.train_files=[{','.join(corpora[variant])}]",
            *extra, *pre_over], folder / "final")
        models[variant] = str(folder / "final")
    for variant in cfg.variants:
        for seed in cfg.seeds:
            folder = out / f"finetune-{variant}-seed{seed}"
            recipe = "feat" if variant == "feat" else cfg.finetune.recipe
            runner.run(f"finetune-{variant}-seed{seed}", "finetune.py", [
                f"recipe={recipe}", f"output_dir={folder}", f"model.name_or_path={models[variant]}",
                f"seed={seed}", f"data.train_file={task.train_file}",
                f"data.eval_file={task.eval_file}", f"data.text_column={task.text_column}",
                f"data.label_column={task.label_column}", *cfg.finetune.overrides],
                folder / "metrics.json")
    forgetting: dict[str, float] = {}
    if heldout is not None:
        cached = out / "forgetting.json"
        forgetting = json.loads(cached.read_text()) if cached.is_file() else {}
        texts = heldout.read_text().splitlines()
        for variant, model_dir in models.items():
            if variant not in forgetting and variant != "feat":
                forgetting[variant] = evaluation.mlm_loss(
                    model_dir, texts, max_seq_length=cfg.forgetting.max_seq_length, seed=0)
        checkpoint.atomic_write_text(cached, json.dumps(forgetting, indent=1))
    return report.write(out, cfg, runner.record, forgetting)


def load(argv: list[str]) -> DictConfig:
    """Recipe + overrides -> a validated experiment config (ConfigError otherwise)."""
    return config.load(argv, config.ExperimentSchema, kind="experiment", validate=validate)


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
    if (cfg.base_model is None) == (cfg.general_pretraining is None):
        raise ConfigError("config key 'base_model': give either base_model or "
                          "general_pretraining (a base built from scratch), not both")
    for key in ("train_file", "eval_file"):
        path = cfg.task[key]
        if not Path(path).is_file():
            raise ConfigError(f"config key 'task.{key}': file {path} does not exist")
    needs = {"idpt": "in_domain", "cdpt": "cross_domain"}
    for variant, key in needs.items():
        if variant in cfg.variants and not cfg.corpora[key]:
            raise ConfigError(f"config key 'corpora.{key}': variant {variant} needs a corpus")
    for key in ("within_task", "in_domain", "cross_domain"):
        for i, spec in enumerate(cfg.corpora[key] or []):
            if not expand_paths(spec):
                raise ConfigError(f"config key 'corpora.{key}[{i}]': no file matches {spec!r}")
    if cfg.general_pretraining is not None and not cfg.corpora.cross_domain:
        raise ConfigError("config key 'corpora.cross_domain': general pretraining needs it")
    if shutil.which(cfg.launcher[0]) is None and cfg.launcher[0] not in ("python", "accelerate"):
        raise ConfigError(f"config key 'launcher': {cfg.launcher[0]!r} is not a command here")
