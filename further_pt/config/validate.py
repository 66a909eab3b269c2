"""Validate: every check a run makes on its composed recipe, before any model or data loads.

Each problem is one line naming the key or the file (:class:`~further_pt.errors.ConfigError`),
raised in seconds rather than after the corpus is tokenized or hours into training. The
values' types were checked by the schema (:mod:`.schema`) when the recipe was composed
(:mod:`.recipes`); what is checked here is what a type cannot say: ranges, choices, files
that exist, keys that must agree with each other.
"""

from __future__ import annotations

import difflib
import glob
import logging
import os
from pathlib import Path
from typing import Any

from huggingface_hub.utils import HFValidationError, validate_repo_id
from omegaconf import DictConfig, ListConfig

from further_pt.config import tasks
from further_pt.config.tasks import choice as _choice
from further_pt.config.tasks import require as _require
from further_pt.errors import ConfigError

logger = logging.getLogger(__name__)


def expand_paths(pattern: str) -> list[str]:
    """A path, a directory (all files inside, recursively) or a glob -> sorted file list."""
    if pattern.startswith(("builtin:", "hf:")):
        return [pattern]
    expanded = os.path.expanduser(pattern)
    if os.path.isdir(expanded):
        files = [
            str(p) for p in sorted(Path(expanded).rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        ]
        return files
    if glob.has_magic(expanded):
        return sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
    return [expanded] if os.path.isfile(expanded) else []


def validate_pretrain(cfg: DictConfig, *, check_files: bool = True) -> None:
    """Value checks that types cannot express. Files are checked here, before any work.

    ``check_files=False`` (``further-pt config`` without ``--check``) checks the values
    alone, for a recipe read before its data exists. A warm-up longer than the run is
    fitted to it (see :func:`fit_warmup`), not refused: that is what shortening a run for a
    smoke test does to the recipe's warm-up.
    """
    m, d, o, t = cfg.model, cfg.data, cfg.objective, cfg.train
    _require(bool(cfg.output_dir), "output_dir", "must be a folder path")
    _require(
        (m.name_or_path is None) != (m.from_scratch is None),
        "model.name_or_path",
        "give either model.name_or_path (a hub id or folder) or model.from_scratch, not both",
    )
    if m.from_scratch is not None:
        fs = m.from_scratch
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "max_position_embeddings", "tokenizer_training_docs"):
            _require(fs[key] > 0, f"model.from_scratch.{key}", f"must be > 0, got {fs[key]}")
        _require(
            fs.hidden_size % fs.num_attention_heads == 0,
            "model.from_scratch.hidden_size",
            f"{fs.hidden_size} is not a multiple of num_attention_heads={fs.num_attention_heads}",
        )
        _require(fs.max_position_embeddings >= d.max_seq_length,
                 "model.from_scratch.max_position_embeddings",
                 f"{fs.max_position_embeddings} is below data.max_seq_length={d.max_seq_length}")
    _require(len(d.train_files) > 0, "data.train_files", "is empty: give at least one file")
    for i, pattern in enumerate(d.train_files if check_files else ()):
        if not isinstance(pattern, str):
            continue  # a dataset mapping: its keys are checked where the sources are resolved
        if not expand_paths(pattern):  # hf:/builtin: names pass through expand_paths
            raise ConfigError(
                f"config key 'data.train_files[{i}]': no file matches {pattern!r}"
            )
    if d.source_weights is not None:
        _require(
            len(d.source_weights) == len(d.train_files),
            "data.source_weights",
            f"has {len(d.source_weights)} weights for {len(d.train_files)} train_files entries",
        )
        _require(all(w > 0 for w in d.source_weights), "data.source_weights", "must all be > 0")
    _require(d.txt_documents in ("line", "blank_line"), "data.txt_documents",
             f"must be 'line' or 'blank_line', got {d.txt_documents!r}")
    _require(16 <= d.max_seq_length <= 65536, "data.max_seq_length",
             f"must be in [16, 65536], got {d.max_seq_length}")
    _require(0.0 <= d.short_seq_prob <= 1.0, "data.short_seq_prob",
             f"must be in [0, 1], got {d.short_seq_prob}")
    _require(d.max_documents is None or d.max_documents > 0, "data.max_documents", "must be > 0")
    _require(d.preprocessing_workers == "auto" or (
        isinstance(d.preprocessing_workers, int) and d.preprocessing_workers >= 1),
        "data.preprocessing_workers", f"must be 'auto' or >= 1, got {d.preprocessing_workers!r}")
    _require(d.dataloader_workers >= 0, "data.dataloader_workers", "must be >= 0")
    _validate_held_out(cfg, check_files=check_files)
    if d.streaming:
        _validate_streaming(cfg)
    validate_hub(cfg)
    _require(0.0 < o.masked_lm_prob < 1.0, "objective.masked_lm_prob",
             f"must be in (0, 1), got {o.masked_lm_prob}")
    _require(o.max_predictions_per_seq >= 1, "objective.max_predictions_per_seq",
             f"must be >= 1, got {o.max_predictions_per_seq}")
    _choice("objective.masking", o.masking, ("token", "whole_word", "span"))
    _require(0.0 < o.span_geometric_p <= 1.0, "objective.span_geometric_p",
             f"must be in (0, 1], got {o.span_geometric_p}")
    _require(o.span_max_words >= 1, "objective.span_max_words",
             f"must be >= 1, got {o.span_max_words}")
    hw = o.head_warmup
    _require(hw.steps == "auto" or (isinstance(hw.steps, int) and not isinstance(hw.steps, bool)
                                    and hw.steps >= 0), "objective.head_warmup.steps",
             f"must be auto or an integer >= 0, got {hw.steps!r}")
    _require(hw.auto_steps >= 0, "objective.head_warmup.auto_steps", "must be >= 0")
    _require(hw.lr > 0, "objective.head_warmup.lr", f"must be > 0, got {hw.lr}")
    if m.extend_vocab is not None:
        _require(m.from_scratch is None, "model.extend_vocab",
                 "extends a pretrained tokenizer; with model.from_scratch the tokenizer is "
                 "trained on the corpus already")
        for key in ("max_new_tokens", "min_frequency"):
            value = m.extend_vocab[key]
            _require(value >= 1, f"model.extend_vocab.{key}", f"must be >= 1, got {value}")
    _require(t.max_steps > 0, "train.max_steps", f"must be > 0, got {t.max_steps}")
    _require(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _require(0 <= t.short_run_warmup_ratio < 1, "train.short_run_warmup_ratio",
             f"must be in [0, 1), got {t.short_run_warmup_ratio}")
    fitted = fit_warmup(t.warmup_steps, t.max_steps, t.short_run_warmup_ratio)
    if fitted != t.warmup_steps:
        if os.environ.get("RANK", "0") == "0":  # one line per job, not one per process
            logger.warning(
                "train.warmup_steps=%d is longer than the run (train.max_steps=%d): warming up "
                "over %d steps instead (train.short_run_warmup_ratio=%g of max_steps)",
                t.warmup_steps, t.max_steps, fitted, t.short_run_warmup_ratio)
        t.warmup_steps = fitted
    _validate_loop(cfg, check_files=check_files)


def _validate_held_out(cfg: DictConfig, *, check_files: bool) -> None:
    """data.eval_files / data.eval_fraction, eval.*, checkpoint.keep_best_by."""
    d, e = cfg.data, cfg.eval
    if d.eval_files is not None and d.eval_fraction is not None:
        raise ConfigError("config key 'data.eval_fraction': give data.eval_files (held-out "
                          "documents) or data.eval_fraction (a share of train_files held out), "
                          "not both")
    if d.eval_files is not None:
        _require(len(d.eval_files) > 0, "data.eval_files",
                 "is empty: give held-out files, or null for no held-out evaluation")
        for i, pattern in enumerate(d.eval_files if check_files else ()):
            if isinstance(pattern, str) and not expand_paths(pattern):
                raise ConfigError(f"config key 'data.eval_files[{i}]': no file matches {pattern!r}")
    if d.eval_fraction is not None:
        _require(0.0 < d.eval_fraction < 1.0, "data.eval_fraction",
                 f"must be between 0 and 1 (a share of the documents), got {d.eval_fraction}")
    _require(e.every_steps >= 1, "eval.every_steps", f"must be >= 1, got {e.every_steps}")
    _require(e.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {e.batch_size}")
    _require(e.max_sequences >= 1, "eval.max_sequences", f"must be >= 1, got {e.max_sequences}")
    _require(cfg.checkpoint.keep_best_by in (None, "eval_loss"), "checkpoint.keep_best_by",
             f"must be null or eval_loss; got {cfg.checkpoint.keep_best_by!r}")
    _require(cfg.checkpoint.keep_best_by is None or d.eval_files is not None
             or d.eval_fraction is not None, "checkpoint.keep_best_by",
             "needs a held-out set: set data.eval_files or data.eval_fraction")


def _validate_streaming(cfg: DictConfig) -> None:
    """What a stream cannot do: it has no length, and each document is seen once in order."""
    why = "data.streaming reads the corpus once, in order, without its length"
    _require(not cfg.objective.nsp, "objective.nsp",
             f"NSP pairs need whole documents to draw random-next sentences from, and {why}: "
             "set objective.nsp=false (packed blocks)")
    _require(cfg.data.eval_fraction is None, "data.eval_fraction",
             f"a share of a stream cannot be held out ({why}): give data.eval_files")
    _require(cfg.checkpoint.every_steps is not None, "checkpoint.every_steps",
             f"must be a number of steps: a stream has no epochs ({why})")
    _require(cfg.model.from_scratch is None and cfg.model.extend_vocab is None,
             "model.from_scratch" if cfg.model.from_scratch is not None else "model.extend_vocab",
             f"makes a tokenizer from the whole corpus, and {why}")


def validate_hub(cfg: DictConfig) -> None:
    """hub.*: a repository id the Hub accepts, a known strategy (no network, no token here)."""
    h = cfg.hub
    if h.model_id is not None:
        try:
            validate_repo_id(h.model_id)
        except HFValidationError as exc:
            raise ConfigError(f"config key 'hub.model_id': {h.model_id!r} is not a Hub "
                              f"repository id (user/name): {str(exc).splitlines()[0]}") from None
    _require(h.strategy in ("end", "every_checkpoint"), "hub.strategy",
             f"must be end or every_checkpoint; got {h.strategy!r}")


def fit_warmup(warmup_steps: int, max_steps: int, short_run_ratio: float) -> int:
    """The warm-up a run of ``max_steps`` gets: ``warmup_steps``, unless that outlasts the run.

    The paper recipes warm up for 10,000 of 100,000 steps and the demo for 100 of 1,000;
    a user who shortens a run (``train.max_steps=30`` to try a setup) wants a run, and a
    warm-up that never ends would leave the lr rising to the last step. So a warm-up longer
    than the run becomes ``round(short_run_ratio * max_steps)`` (3 of 30 at 0.1: the share
    BERT's recipe gives it); a warm-up that fits is kept exactly, so no existing run changes.
    """
    if warmup_steps <= max_steps:
        return warmup_steps
    return round(short_run_ratio * max_steps)


def _validate_loop(cfg: DictConfig, *, check_files: bool = True) -> None:
    """The keys of the training loop, optimizer and checkpoints that every kind shares."""
    t, c = cfg.train, cfg.checkpoint
    validate_trackers(t, check_installed=check_files)
    _require(t.batch_size > 0, "train.batch_size", f"must be > 0, got {t.batch_size}")
    _require(t.gradient_accumulation_steps > 0, "train.gradient_accumulation_steps",
             f"must be > 0, got {t.gradient_accumulation_steps}")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _require(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    for key in ("adam_beta1", "adam_beta2"):
        _require(0 <= t[key] < 1, f"train.{key}", f"must be in [0, 1), got {t[key]}")
    _require(t.adam_epsilon > 0, "train.adam_epsilon", f"must be > 0, got {t.adam_epsilon}")
    _require(t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 disables clipping)")
    _require(t.mixed_precision in (None, "auto", "no", "fp16", "bf16"), "train.mixed_precision",
             f"must be auto, no, fp16, bf16 or null (from the accelerate config); got "
             f"{t.mixed_precision!r}")
    _require(t.ddp_comm_hook in (None, "bf16", "fp16"), "train.ddp_comm_hook",
             f"must be null (fp32 all-reduce), bf16 or fp16; got {t.ddp_comm_hook!r}")
    _require(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
    _require(t.log_every_steps >= 1, "train.log_every_steps", "must be >= 1")
    _require(t.collective_timeout_s > 0, "train.collective_timeout_s",
             f"must be > 0 seconds, got {t.collective_timeout_s}")
    _require(c.every_steps is None or c.every_steps > 0, "checkpoint.every_steps",
             f"must be > 0 or null (every epoch), got {c.every_steps}")
    _require(c.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {c.keep_last}")


#: pip package of each tracker whose import name differs (Accelerate's names; the rest
#: install under their own name). aim: Accelerate drives aim < 4 only.
TRACKER_PACKAGES = {"comet_ml": "comet-ml", "aim": "'aim<4'"}


def installed_trackers() -> set[str]:
    """The trackers Accelerate finds importable here (its own checks, versions included)."""
    from accelerate.tracking import get_available_trackers

    return {str(t) for t in get_available_trackers()}


def validate_trackers(t: DictConfig, *, check_installed: bool) -> None:
    """``train.trackers``: null, ``none`` or ``[]`` -> ``[]``; one name -> a list of it.

    Each name must be one of Accelerate's trackers, and (``check_installed``, as a run
    checks) importable: a tracker that is missing would otherwise fail at its first log
    call, after the data and model have loaded. Normalised in place, so config.yaml and the
    trackers' own config record the list that ran.
    """
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    raw = t.trackers
    if raw is None or raw == "none":
        names: list[Any] = []
    elif isinstance(raw, str):
        names = [raw]
    elif isinstance(raw, ListConfig | list):
        names = list(raw)
    else:
        raise ConfigError(f"config key 'train.trackers': a list of tracker names, [] or none; "
                          f"got {raw!r}")
    known = list(LOGGER_TYPE_TO_CLASS)
    installed = installed_trackers() if check_installed else set(known)
    for i, name in enumerate(names):
        key = f"train.trackers[{i}]"
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config key {key!r}: unknown tracker {name!r}{hint}; one of "
                              f"{', '.join(known)}")
        if name not in installed:
            package = TRACKER_PACKAGES.get(name, name)
            raise ConfigError(f"config key {key!r}: {name} is not installed here; pip install "
                              f"{package} (or drop it from train.trackers)")
    _require(len(set(names)) == len(names), "train.trackers", f"lists a tracker twice: {names}")
    t.trackers = names


CLASS_WEIGHTS = "train.class_weights"


def check_class_weights(setting: Any) -> None:
    """``train.class_weights`` without the data: null, ``balanced`` or positive numbers by
    label (whether each label is a class is known once the training data is read)."""
    if setting is None or setting == "balanced":
        return
    if isinstance(setting, str):
        raise ConfigError(f"config key {CLASS_WEIGHTS!r}: {setting!r} is not a setting: give "
                          "null, balanced or a mapping {label: weight}")
    if not isinstance(setting, dict | DictConfig) or not setting:
        raise ConfigError(f"config key {CLASS_WEIGHTS!r}: null, balanced or a mapping "
                          f"{{label: weight}}, got {setting!r}")
    for label, weight in setting.items():
        number = isinstance(weight, int | float) and not isinstance(weight, bool)
        if not number or not 0 < weight < float("inf"):
            raise ConfigError(f"config key '{CLASS_WEIGHTS}.{label}': a class weight must be a "
                              f"positive number, got {weight!r}")


def _check_file(key: str, path: str | None) -> None:
    if path is not None and not path.startswith("hf:") and not os.path.isfile(
            os.path.expanduser(path)):
        raise ConfigError(f"config key {key!r}: file {path} does not exist")


def validate_finetune(cfg: DictConfig, *, check_files: bool = True) -> None:
    """Value checks of a fine-tuning config; files are checked here, before any work.

    ``check_files=False``: the values alone (``further-pt config`` without ``--check``).
    """
    m, d, h, t, e = cfg.model, cfg.data, cfg.head, cfg.train, cfg.eval
    _require(bool(cfg.output_dir), "output_dir", "must be a folder path")
    validate_hub(cfg)
    _require(m.extend_vocab is None, "model.extend_vocab",
             "is for pretraining; fine-tuning uses the tokenizer saved with the model")
    _require(m.name_or_path is not None and m.from_scratch is None, "model.name_or_path",
             "fine-tuning needs a pretrained model (hub id or folder); from_scratch is for "
             "pretraining")
    if cfg.tasks is None:
        _require(d.train_file is not None, "data.train_file", "is not set (or give tasks)")
        if check_files:
            _check_file("data.train_file", d.train_file)
            _check_file("data.eval_file", d.eval_file)
    else:
        _require(len(cfg.tasks) >= 1, "tasks", "give at least one task, or null")
        names = [task.name for task in cfg.tasks]
        _require(len(set(names)) == len(names), "tasks", f"task names repeat: {names}")
        for i, task in enumerate(cfg.tasks if check_files else ()):
            _check_file(f"tasks[{i}].train_file", task.train_file)
            _check_file(f"tasks[{i}].eval_file", task.eval_file)
    _require(16 <= d.max_seq_length <= 65536, "data.max_seq_length",
             f"must be in [16, 65536], got {d.max_seq_length}")
    _choice("data.truncation", d.truncation, ("head", "tail", "head_tail", "segments"))
    _require(d.head_tokens == "auto" or (isinstance(d.head_tokens, int)
                                         and not isinstance(d.head_tokens, bool)),
             "data.head_tokens", f"must be auto or an integer, got {d.head_tokens!r}")
    if d.truncation == "head_tail" and d.head_tokens != "auto":
        _require(0 <= d.head_tokens <= d.max_seq_length - 2, "data.head_tokens",
                 f"must be in [0, max_seq_length - 2 = {d.max_seq_length - 2}], got "
                 f"{d.head_tokens}")
    _choice("data.invalid_rows", d.invalid_rows, ("error", "skip"))
    _require(d.max_train_examples is None or d.max_train_examples >= 1,
             "data.max_train_examples", f"must be a positive integer or null (all), got "
             f"{d.max_train_examples}")
    _require(d.max_segments >= 1, "data.max_segments", "must be >= 1")
    _require(d.truncation != "segments" or d.text_pair_column is None, "data.truncation",
             "segments (hierarchical) does not take text pairs")
    _require(d.dataloader_workers >= 0, "data.dataloader_workers", "must be >= 0")
    _choice("head.pooling", h.pooling, ("cls", "pooler", "cls_raw", "mean", "max", "concat"))
    _choice("head.layer_combine", h.layer_combine, ("concat", "mean", "max"))
    _choice("head.segment_pooling", h.segment_pooling, ("mean", "max", "attention"))
    _require(len(h.layers) >= 1, "head.layers", "list at least one layer, e.g. [-1]")
    _require(0 <= h.dropout < 1, "head.dropout", f"must be in [0, 1), got {h.dropout}")
    _require(t.epochs > 0, "train.epochs", f"must be > 0, got {t.epochs}")
    _require(t.head_lr > 0, "train.head_lr", f"must be > 0, got {t.head_lr}")
    _require(0 < t.layer_decay <= 1, "train.layer_decay", f"must be in (0, 1], got {t.layer_decay}")
    _choice("train.schedule", t.schedule, ("stlr", "linear", "cosine", "constant"))
    _require(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
    _require(0 < t.stlr_cut_frac < 1, "train.stlr_cut_frac", "must be in (0, 1)")
    _require(t.stlr_ratio >= 1, "train.stlr_ratio", "must be >= 1")
    _choice("train.unfreeze", t.unfreeze, ("none", "epoch", "steps"))
    _require(t.unfreeze != "steps" or (t.unfreeze_every_steps or 0) > 0,
             "train.unfreeze_every_steps", "must be > 0 when train.unfreeze=steps")
    _require(not (t.freeze_encoder and t.unfreeze != "none"), "train.freeze_encoder",
             "conflicts with train.unfreeze (a frozen encoder is never unfrozen)")
    check_class_weights(t.class_weights)
    _require(t.class_weights is None or cfg.task.kind == "single_label", "train.class_weights",
             f"weights the classes of a single_label task; task.kind is {cfg.task.kind}")
    tasks.validate_task_kind(cfg)
    _require(e.batch_size > 0, "eval.batch_size", "must be > 0")
    tasks.validate_stopping(cfg)
    _validate_loop(cfg, check_files=check_files)
