"""Further pretraining (MLM + optional NSP) of a BERT-style encoder, with Accelerate.

    accelerate launch further_pt/pretrain.py recipe=in_domain data.train_files=[corpus/*.txt.gz]

Recipes: ``within_task`` (ITPT), ``in_domain`` (IDPT), ``cross_domain`` (CDPT),
``demo`` (offline, tiny, minutes on a CPU), all composed from
``recipes/base/pretrain.yaml``. Any ``key=value`` overrides a recipe key.
Re-running the same command resumes from the newest complete checkpoint.

The recipe, top to bottom: config -> output dir checks -> objective checks ->
Accelerate -> objective build (corpus, tokenizer, instances, model) -> the
Trainer's loop -> final model. The objective is :class:`further_pt.objectives.masked_lm.MaskedLM`;
the loop is :class:`further_pt.train.trainer.Trainer`.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Entry point used as a script (`accelerate launch further_pt/pretrain.py`): the
# package must be importable by its name, not through this folder on sys.path.
if __package__ in (None, "") and sys.path and Path(sys.path[0]).name == "further_pt":
    sys.path.pop(0)

from omegaconf import DictConfig

from further_pt.config import recipes, validate
from further_pt.objectives.masked_lm import RESUMABLE_KEYS, MaskedLM
from further_pt.train import launch
from further_pt.train.trainer import Trainer


def load(argv: list[str]) -> DictConfig:
    return recipes.load(argv, recipes.PretrainSchema, kind="pretrain",
                        validate=validate.validate_pretrain)


def run(cfg: DictConfig) -> Path:
    """Train; return the path of the final model folder."""
    with Trainer(cfg, resumable_keys=RESUMABLE_KEYS) as trainer:  # lock, read-only checks
        if trainer.finished() is None:
            objective = MaskedLM(cfg, trainer.resume_from)  # read-only model/tokenizer checks
            trainer.start(find_unused_parameters=objective.find_unused_parameters)
            objective.build(trainer)
            trainer.fit(objective)
        return trainer.output_dir / "final"


def report(cfg: DictConfig, final: Path) -> str:
    return (f"Final model: {final}\n"
            f"  as a masked LM:  AutoModelForMaskedLM.from_pretrained({str(final)!r})\n"
            f"  to fine-tune:    accelerate launch further_pt/finetune.py recipe=fit "
            f"model.name_or_path={final} data.train_file=... data.eval_file=...")


def usage() -> str:
    """``--help``: this docstring and the shipped pretrain recipes."""
    return launch.job_usage(__doc__ or "", "pretrain")


def main(argv: list[str] | None = None) -> int:
    return launch.entry_point(sys.argv[1:] if argv is None else argv, load, run, report,
                              usage=usage)


if __name__ == "__main__":
    sys.exit(main())
