"""Fine-tuning for text classification, with the strategies of Sun et al. 2019 and ULMFiT.

    accelerate launch further_pt/finetune.py recipe=fit model.name_or_path=runs/in_domain/final \\
        data.train_file=train.jsonl data.eval_file=dev.jsonl

Recipes: ``fit`` (Sun et al.'s BERT-FiT), ``ulmfit`` (STLR, discriminative rates,
gradual unfreezing, concat pooling), ``feat`` (BERT-Feat: frozen encoder),
``multitask``, all composed from ``recipes/base/finetune.yaml``. Re-running the
same command resumes.

The recipe, top to bottom: config -> output dir checks -> objective checks ->
Accelerate -> objective build (labelled data, classifier, layer groups) -> the
Trainer's loop (evaluating each epoch, keeping the best) -> metrics.json. The
objective is :class:`further_pt.objectives.classification.Classification`; the loop is
:class:`further_pt.train.trainer.Trainer`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, "") and sys.path and Path(sys.path[0]).name == "further_pt":
    sys.path.pop(0)

from omegaconf import DictConfig

from further_pt.config import recipes, validate
from further_pt.objectives.classification import RESUMABLE_KEYS, Classification
from further_pt.train import launch
from further_pt.train.trainer import Trainer


def load(argv: list[str]) -> DictConfig:
    return recipes.load(argv, recipes.FinetuneSchema, kind="finetune",
                        validate=validate.validate_finetune)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune; return the metrics written to metrics.json."""
    with Trainer(cfg, resumable_keys=RESUMABLE_KEYS) as trainer:  # lock, read-only checks
        metrics = trainer.finished()
        if metrics is None:
            objective = Classification(cfg, trainer.resume_from)  # read-only model checks
            trainer.start(find_unused_parameters=objective.find_unused_parameters)
            objective.build(trainer)
            metrics = trainer.fit(objective)
        return metrics


def report(cfg: DictConfig, metrics: dict[str, Any]) -> str:
    lines = []
    if "eval_error_rate" in metrics:
        lines.append(f"dev accuracy {metrics['eval_accuracy']:.4f}, error rate "
                     f"{metrics['eval_error_rate']:.4f}, macro-F1 {metrics['eval_macro_f1']:.4f} "
                     f"({metrics['final_model']})")
    elif "eval_micro_f1" in metrics:  # task.kind=multi_label
        at = (f" at threshold {metrics['eval_threshold']:g}" if "eval_threshold" in metrics
              else "")  # several tasks: each its own
        lines.append(f"dev micro-F1 {metrics['eval_micro_f1']:.4f}, macro-F1 "
                     f"{metrics['eval_macro_f1']:.4f}, subset accuracy "
                     f"{metrics['eval_subset_accuracy']:.4f}{at} ({metrics['final_model']})")
    elif "eval_pearson" in metrics:  # task.kind=regression
        lines.append(f"dev Pearson {metrics['eval_pearson']:.4f}, Spearman "
                     f"{metrics['eval_spearman']:.4f}, MSE {metrics['eval_mse']:.4f} "
                     f"({metrics['final_model']})")
    if metrics.get("stopped_early_at"):
        lines.append(f"stopped early at step {metrics['stopped_early_at']} "
                     f"(train.early_stopping_patience={cfg.train.early_stopping_patience})")
    lines.append(f"Final model: {Path(cfg.output_dir).resolve() / 'final'}")
    return "\n".join(lines)


def usage() -> str:
    """``--help``: this docstring and the shipped finetune recipes."""
    return launch.job_usage(__doc__ or "", "finetune")


def main(argv: list[str] | None = None) -> int:
    return launch.entry_point(sys.argv[1:] if argv is None else argv, load, run, report,
                              usage=usage)


if __name__ == "__main__":
    sys.exit(main())
