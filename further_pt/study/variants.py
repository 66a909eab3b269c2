"""Variants: the names of the study's rows and stages (BERT-FiT, BERT-ITPT-FiT, ...), shared
by the report's tables and its plots.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

NAMES = {"fit": "BERT-FiT", "itpt": "BERT-ITPT-FiT", "idpt": "BERT-IDPT-FiT",
         "cdpt": "BERT-CDPT-FiT", "selected": "BERT-kNN-TAPT-FiT", "feat": "BERT-Feat",
         "linear": "TF-IDF + LogReg"}


def size_tag(size: int | None) -> str:
    """A training-set size in stage names and tables: ``n400``, or ``all`` for the whole file."""
    return "all" if size is None else f"n{size}"


def finetune_stage(variant: str, size: int | None, seed: int) -> str:
    """The stage (and folder) of one variant at one size and seed: ``finetune-itpt-n400-seed1``."""
    return f"finetune-{variant}-{size_tag(size)}-seed{seed}"


PRETRAINED = ("itpt", "idpt", "cdpt", "selected")


def variant_keys(cfg: Any) -> list[str]:
    """Every fine-tuned row of the grid: the variants, then the ablations."""
    return [*cfg.variants, *(a.name for a in cfg.get("ablations") or [])]


def keys_at(cfg: Any, size: int | None) -> list[str]:
    """The rows fine-tuned at one training size: every variant, and the ablations whose own
    ``train_sizes`` (null = all of the grid's) include it, so that an ablation can be limited
    to the size where it is informative without paying for the others."""
    limited = {a.name: list(a.train_sizes) for a in cfg.get("ablations") or []
               if a.get("train_sizes") is not None}
    return [k for k in variant_keys(cfg) if k not in limited or size in limited[k]]


def label(cfg: Any, key: str) -> str:
    """A row's name: BERT-ITPT-FiT, ..., or an ablation as its variant's name and its own."""
    if key in NAMES:
        return NAMES[key]
    ablation = next(a for a in cfg.ablations if a.name == key)
    return f"{NAMES[ablation.variant]} ({key})"


def pretrained(cfg: Any, key: str) -> bool:
    """Whether the row's encoder was further pretrained in the grid (pretrain-<key>/)."""
    return key in PRETRAINED or key in [a.name for a in cfg.get("ablations") or []]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def size_label(r: dict[str, Any]) -> str:
    if r["train_size"] == "all":
        return "all" if r["train_examples"] is None else f"all ({r['train_examples']})"
    return str(r["train_size"])
