"""Model card: the README.md of every ``final/`` and ``best/`` folder, as the Hub reads it.

A folder pushed anywhere should say where it came from: the base model, the corpora (with
their size and a fingerprint of their content), the steps, batch, schedule and precision it
was trained with, the further_pt version and the recipe, its evaluation results, and the
papers the method comes from. Written with huggingface_hub's ``ModelCard`` /
``ModelCardData``: the YAML header carries ``base_model``, ``library_name``,
``pipeline_tag`` and the evaluation results as ``model-index`` (what the Hub shows as the
model's metrics); the body says the rest in words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from further_pt import __version__

PAPERS = (
    ("Sun et al. 2019, How to Fine-Tune BERT for Text Classification?",
     "https://arxiv.org/abs/1905.05583"),
    ("Gururangan et al. 2020, Don't Stop Pretraining: Adapt Language Models to Domains "
     "and Tasks", "https://arxiv.org/abs/2004.10964"),
)


def card(facts: dict[str, Any], run: dict[str, Any], results: dict[str, Any]) -> ModelCard:
    """The card of a model folder.

    ``facts`` come from the objective (``Objective.card()``): ``pipeline_tag``, ``title``,
    ``summary`` (lines), ``data`` (lines), ``eval_dataset`` (what the results were measured
    on) and ``metrics`` (result key -> (metric type, name)). ``run`` from the Trainer:
    ``config`` (the resolved recipe), ``step``, ``tokens``, ``global_batch``, ``precision``.
    ``results`` are the evaluation results this folder's model scored (``eval_*``).
    """
    cfg = run["config"]
    name = Path(cfg["output_dir"]).name
    evals = [EvalResult(task_type=facts["pipeline_tag"], dataset_type="further_pt-run",
                        dataset_name=facts["eval_dataset"], metric_type=kind,
                        metric_name=label, metric_value=float(results[key]))
             for key, (kind, label) in facts["metrics"].items() if key in results]
    data = ModelCardData(
        base_model=cfg["model"]["name_or_path"] or None, library_name="transformers",
        pipeline_tag=facts["pipeline_tag"], tags=["further_pt", *facts.get("tags", [])],
        model_name=name, eval_results=evals or None)
    t = cfg["train"]
    schedule = facts.get("schedule") or ""
    lines = [
        "---", data.to_yaml(), "---", "", f"# {name}", "", facts["title"], "",
        *facts["summary"], "",
        "## Training data", "", *facts["data"], "",
        "## Training", "",
        f"- steps: {run['step']:,} optimizer steps, {run['tokens']:,} tokens",
        f"- global batch: {run['global_batch']} sequences per step",
        f"- learning rate: {t['lr']:g} (AdamW, weight decay {t['weight_decay']:g}){schedule}",
        f"- precision: {run['precision']}",
        f"- seed: {cfg['seed']}",
        f"- further_pt {__version__}; the whole recipe is below and in the run's config.yaml",
    ]
    if evals:
        lines += ["", "## Evaluation", "", f"On {facts['eval_dataset']}:", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {e.metric_name} | {e.metric_value:.4f} |" for e in evals]
    lines += ["", "## How it was made", "",
              "With further_pt (`pip install further-pt`), after:", ""]
    lines += [f"- [{title}]({url})" for title, url in PAPERS]
    lines += ["", "<details><summary>The recipe (resolved)</summary>", "", "```yaml",
              yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", "", "</details>", ""]
    return ModelCard("\n".join(lines))


def write(folder: Path, facts: dict[str, Any], run: dict[str, Any],
          results: dict[str, Any]) -> None:
    """``folder/README.md``: the model card."""
    card(facts, run, results).save(folder / "README.md")
