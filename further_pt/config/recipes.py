"""Recipes: find, compose with command-line overrides, type.

A run is configured by one YAML recipe (``recipe=NAME`` picks
``recipes/NAME.yaml``; ``recipe=path/to/file.yaml`` picks a file) plus Hydra
``key=value`` overrides. We use Hydra's compose API rather than
``@hydra.main`` on purpose: ``@hydra.main`` changes the working directory and
creates an ``outputs/`` folder per process, which surprises users under
``accelerate launch`` with several processes.

The schemas below give types only. Every field is ``MISSING``: all defaults
live in ``recipes/``, and a recipe that forgets a key is an error naming it.
Validation (:mod:`.validate`) happens before any model or data is loaded, and every
problem is reported as one line naming the key or file (:class:`ConfigError`).
"""

from __future__ import annotations

import difflib
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
from further_pt.errors import ConfigError, one_line

__all__ = ["ConfigError", "ExperimentSchema", "FinetuneSchema", "PretrainSchema",
           "available_recipes", "load"]



# --------------------------------------------------------------------------- recipes


def recipes_dir() -> Path:
    """Where the shipped recipes are: inside an installed wheel, else the checkout's top level."""
    here = Path(__file__).resolve().parents[1]  # further_pt/
    for candidate in (here / "recipes", here.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"no recipes folder found next to {here}; reinstall further_pt")


#: The top-level key that marks a composed recipe as each kind of job.
KIND_MARKERS = {"pretrain": "objective", "finetune": "head", "experiment": "variants"}


def kind_of(recipe: str) -> str:
    """The kind of a recipe (``pretrain``, ``finetune``, ``experiment``), from the keys of its
    composed form (bases included); ``unknown`` for none of them."""
    keys = set(compose(recipe, []))
    return next((kind for kind, marker in KIND_MARKERS.items() if marker in keys), "unknown")


def describe(name: str) -> str:
    """A shipped recipe's first comment line: what it is."""
    lines = (recipes_dir() / f"{name}.yaml").read_text().splitlines()
    first = next((line for line in lines if line.startswith("#")), "#")
    return first.lstrip("# ").strip()


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
        raise ConfigError(one_line(f"bad override: {exc}")) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(one_line(f"recipe {path}: {exc}")) from None
    OmegaConf.set_struct(cfg, False)
    return cfg



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
            f"config key {exc.full_key!r}: {one_line(exc.msg).split(' full_key')[0]}"
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
