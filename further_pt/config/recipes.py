"""Recipes: find, compose with command-line overrides, validate.

A run is configured by one YAML recipe (``recipe=NAME`` picks
``recipes/NAME.yaml``; ``recipe=path/to/file.yaml`` picks a file) plus Hydra
``key=value`` overrides. We use Hydra's compose API rather than
``@hydra.main`` on purpose: ``@hydra.main`` changes the working directory and
creates an ``outputs/`` folder per process, which surprises users under
``accelerate launch`` with several processes.

The schemas below give types only. Every field is ``MISSING``: all defaults
live in ``recipes/``, and a recipe that forgets a key is an error naming it.
Validation happens here, before any model or data is loaded, and every
problem is reported as one line naming the key or file (:class:`ConfigError`).
"""

from __future__ import annotations

import difflib
import glob
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from further_pt.config.schema import ExperimentSchema, FinetuneSchema, PretrainSchema
from further_pt.errors import ConfigError

__all__ = ["ConfigError", "ExperimentSchema", "FinetuneSchema", "PretrainSchema",
           "available_recipes", "load", "validate_finetune", "validate_pretrain"]

logger = logging.getLogger("further_pt.config.recipes")


# --------------------------------------------------------------------------- recipes


def recipes_dir() -> Path:
    """Where the shipped recipes are: inside an installed wheel, else the checkout's top level."""
    here = Path(__file__).resolve().parents[1]  # further_pt/
    for candidate in (here / "recipes", here.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"no recipes folder found next to {here}; reinstall further_pt")


def available_recipes() -> list[str]:
    """Shipped recipe names (``base/*`` are building blocks, not recipes)."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def recipe_path(name: str) -> Path:
    if name.endswith((".yaml", ".yml")):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"recipe file {name} does not exist")
        return path.resolve()
    path = recipes_dir() / f"{name}.yaml"
    if not path.is_file():
        names = available_recipes()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown recipe {name!r}{hint}; available: {', '.join(names)}")
    return path


def split_recipe_arg(argv: list[str]) -> tuple[str, list[str]]:
    """Take ``recipe=NAME`` out of the arguments; the rest are Hydra overrides."""
    recipe = None
    rest = []
    for arg in argv:
        if arg.startswith("recipe="):
            recipe = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if not recipe:
        raise ConfigError(
            f"no recipe given: add recipe=NAME (one of {', '.join(available_recipes())}) "
            "or recipe=path/to/recipe.yaml"
        )
    return recipe, rest


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def compose(recipe: str, overrides: list[str], known: list[str] | None = None) -> DictConfig:
    """Load a recipe and apply Hydra overrides, without Hydra's cwd or output-dir side effects.

    ``known`` (the schema's keys) turns an override of a key the recipe lacks into
    an "unknown config key" error with a did-you-mean.
    """

    path = recipe_path(recipe)
    # The shipped recipes' folder is on the search path, so a user's own recipe file can start
    # from `defaults: [base/pretrain@_here_, _self_]` like the shipped ones.
    search = f"hydra.searchpath=[file://{recipes_dir()}]"
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base="1.3"):
            cfg = hydra_compose(config_name=path.stem, overrides=[search, *overrides])
    except HydraException as exc:
        match = re.search(r"Could not override '([^']+)'", str(exc))
        if match and known is not None and match.group(1) not in known:
            raise _unknown_key(match.group(1), known) from None
        raise ConfigError(_one_line(f"bad override: {exc}")) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(f"recipe {path}: {exc}")) from None
    OmegaConf.set_struct(cfg, False)
    return cfg


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node:
            full = f"{prefix}.{k}" if prefix else str(k)
            keys.append(full)
            if OmegaConf.is_missing(node, k):
                continue
            keys.extend(_all_keys(node[k], full))
    return keys


def apply_schema(cfg: DictConfig, schema: type) -> DictConfig:
    """Merge ``cfg`` into the typed schema: unknown keys, wrong types and unset keys are errors."""
    merged = typed(cfg, schema)
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"config key {missing[0]!r} is not set (the recipe must give it)")
    return merged


def typed(cfg: DictConfig, schema: type) -> DictConfig:
    """Merge ``cfg`` into the typed schema: unknown keys and wrong types become ConfigError.

    Unset (``???``) keys stay unset: :func:`apply_schema` refuses them; ``further-pt config``
    shows them.
    """
    base = OmegaConf.structured(schema)
    known = _all_keys(base)
    try:
        merged = OmegaConf.merge(base, cfg)
    except ConfigKeyError as exc:
        raise _unknown_key(exc.full_key or str(exc.key), known) from None
    except ValidationError as exc:
        raise ConfigError(
            f"config key {exc.full_key!r}: {_one_line(exc.msg).split(' full_key')[0]}"
        ) from None
    assert isinstance(merged, DictConfig)
    return merged


def load(argv: list[str], schema: type, *, kind: str,
         validate: Callable[[DictConfig], None] | None = None) -> DictConfig:
    """Recipe + overrides -> typed, validated config. Raises ConfigError.

    ``kind`` names the job (``pretrain``, ``finetune``, ...) in the error for a recipe
    of another kind: one whose top-level keys the schema does not know.
    """
    recipe, overrides = split_recipe_arg(argv)
    cfg = apply_schema(compose_kind(recipe, overrides, schema, kind), schema)
    if validate is not None:
        validate(cfg)
    return cfg


def compose_kind(recipe: str, overrides: list[str], schema: type, kind: str) -> DictConfig:
    """:func:`compose` for a job of ``kind``: a recipe of another kind, or an unknown key in an
    override, is a ConfigError naming it."""
    raw = compose(recipe, [])
    foreign = sorted(set(raw) - set(OmegaConf.structured(schema)))
    if foreign:
        raise ConfigError(f"recipe {recipe!r} is not a {kind} recipe (it has {foreign[0]!r}); "
                          "`further-pt recipes` lists each recipe with its kind")
    return compose(recipe, overrides, _all_keys(OmegaConf.structured(schema)))


# --------------------------------------------------------------------------- values


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r}: {message}")


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


def _check_file(key: str, path: str | None) -> None:
    if path is not None and not path.startswith("hf:") and not os.path.isfile(
            os.path.expanduser(path)):
        raise ConfigError(f"config key {key!r}: file {path} does not exist")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, f"must be one of {', '.join(choices)}; got {value!r}")


def validate_finetune(cfg: DictConfig, *, check_files: bool = True) -> None:
    """Value checks of a fine-tuning config; files are checked here, before any work.

    ``check_files=False``: the values alone (``further-pt config`` without ``--check``).
    """
    m, d, h, t, e = cfg.model, cfg.data, cfg.head, cfg.train, cfg.eval
    _require(bool(cfg.output_dir), "output_dir", "must be a folder path")
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
    _choice("eval.metric", e.metric, ("accuracy", "macro_f1", "error_rate"))
    _require(e.batch_size > 0, "eval.batch_size", "must be > 0")
    _validate_loop(cfg, check_files=check_files)


def flatten(node: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": value}``."""
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for k, v in node.items():
            flat.update(flatten(v, f"{prefix}{sep}{k}" if prefix else str(k), sep))
        return flat
    return {prefix: node}


def to_yaml(cfg: DictConfig | ListConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
