"""Fine-tuning checks of what a run evaluates and when: ``task.kind`` with its threshold and
``eval.metric``, and ``eval.every_steps`` / ``train.early_stopping_patience``.

Kept apart from :mod:`.validate` so each stays readable; both raise one-line ConfigErrors
naming the key, before any work.
"""

from __future__ import annotations

from omegaconf import DictConfig

from further_pt.errors import ConfigError


def require(ok: bool, key: str, message: str) -> None:
    """A ConfigError naming ``key`` unless ``ok`` (:mod:`.validate` uses it too)."""
    if not ok:
        raise ConfigError(f"config key {key!r}: {message}")


def choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    """``value`` is one of ``choices``, or a ConfigError naming ``key``."""
    require(value in choices, key, f"must be one of {', '.join(choices)}; got {value!r}")


def validate_stopping(cfg: DictConfig) -> None:
    """eval.every_steps and train.early_stopping_patience: positive, and patience needs a dev set
    (without one nothing is evaluated, so the run would never stop early nor say so)."""
    every, patience = cfg.eval.every_steps, cfg.train.early_stopping_patience
    require(every is None or every >= 1, "eval.every_steps",
             f"must be a positive number of optimizer steps or null (every epoch), got {every}")
    require(patience is None or patience >= 1, "train.early_stopping_patience",
             f"must be a positive number of evaluations or null (off), got {patience}")
    dev = cfg.data.eval_file is not None if cfg.tasks is None else any(
        task.eval_file is not None for task in cfg.tasks)
    require(patience is None or dev, "train.early_stopping_patience",
             "needs a dev set to evaluate: set data.eval_file (or eval_file in tasks)")


#: ``eval.metric``'s choices under each ``task.kind``; ``auto`` is the first (resolved in place).
EVAL_METRICS = {"single_label": ("accuracy", "macro_f1", "error_rate"),
                "multi_label": ("micro_f1", "macro_f1", "subset_accuracy"),
                "regression": ("pearson", "spearman", "mse")}


def validate_task_kind(cfg: DictConfig) -> None:
    """task.kind, task.threshold and the eval.metric they allow; ``auto`` becomes the kind's
    first metric here, so config.yaml, sweeps and the best-epoch rule read the one used."""
    kind, threshold, e = cfg.task.kind, cfg.task.threshold, cfg.eval
    choice("task.kind", kind, tuple(EVAL_METRICS))
    metrics = EVAL_METRICS[kind]
    if e.metric == "auto":
        e.metric = metrics[0]
    require(e.metric in metrics, "eval.metric", f"must be auto or, for task.kind={kind}, one "
             f"of {', '.join(metrics)}; got {e.metric!r}")
    if threshold == "tune":
        require(kind == "multi_label", "task.threshold",
                 f"tune picks a multi_label threshold; task.kind is {kind}")
        dev = [cfg.data.eval_file] if cfg.tasks is None else [t.eval_file for t in cfg.tasks]
        require(all(dev), "task.threshold", "tune picks the threshold on the dev set: set "
                 + ("data.eval_file" if cfg.tasks is None else "every task's eval_file"))
        return
    number = isinstance(threshold, int | float) and not isinstance(threshold, bool)
    require(number and 0 < threshold < 1, "task.threshold",
             f"must be a probability in (0, 1), or tune; got {threshold!r}")
