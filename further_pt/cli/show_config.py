"""``further-pt config``: a recipe composed with its bases and overrides, before any data.

The first command a new user runs: every key with its value and, beside it, what it does
(the recipe's own comment where it sets the key, else its base's), each key a run still
needs marked. ``--check`` runs the job's own loader instead, so it passes or fails exactly as
the run's first second would.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from further_pt import finetune, pretrain
from further_pt.config import keys, recipes, validate
from further_pt.config.schema import REQUIRED_ONE_OF
from further_pt.errors import ConfigError
from further_pt.study import experiment


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
    return recipes.kind_of(recipe)


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


def mark_unset(text: str, unset: dict[str, str], comments: dict[str, str] | None = None
               ) -> tuple[str, list[str]]:
    """Append ``NOT_SET`` to the YAML line of each unset key, and each key's comment to its
    line; (text, the unset keys in line order).

    The YAML is OmegaConf's: two spaces per level, a list's items at their key's level.
    """
    comments = comments or {}
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
            elif comments.get(key):
                line = f"{line}  # {comments[key]}"
        lines.append(line)
    return "\n".join(lines) + "\n", found + [k for k in unset if k not in found]


def command(args: list[str]) -> int:
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
    body, unset = mark_unset(recipes.to_yaml(shown.cfg), shown.unset,
                             keys.comments(recipes.recipe_path(recipe)))
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
