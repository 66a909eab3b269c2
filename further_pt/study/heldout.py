"""Held-out text: the documents no pretraining run of the experiment sees, and each encoder's
MLM loss on them.

Two sets, written once under ``output_dir/data/`` (a resumed or grown experiment reads them):

- **general** (``forgetting.docs``): the last documents of the cross-domain corpus, taken out
  of every pretraining run that reads it. A domain-pretrained encoder's loss there is the
  report's forgetting column: what the domain did to general text.
- **in-domain** (``forgetting.in_domain_docs``): a seeded sample of the in-domain corpus that
  excludes the task's training texts (the ITPT corpus) and every selected (kNN-TAPT)
  document, and is taken out of IDPT's and CDPT's corpus. Every variant's loss there is the
  held-out in-domain column: how well each corpus taught the domain, on text none trained on.
  A sample rather than the file's tail, because corpora are often concatenations of sources
  (debian-sections: Debian, then npm, then PyPI) and a tail would be one source.
"""

from __future__ import annotations

import json
import math
import random
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from further_pt.config.validate import expand_paths
from further_pt.data import corpus, labelled
from further_pt.errors import ConfigError
from further_pt.files import atomic_write_lines, atomic_write_text
from further_pt.objectives import evaluation

SEED = 0  # the in-domain sample's seed: fixed, so every run of an experiment holds out the same


def _norm(text: str) -> str:
    """A document as `further-pt select` writes it (whitespace runs as one space), so that
    the same text matches across the task file, the selected corpus and the in-domain one."""
    return " ".join(text.split())


def _files(specs: Iterable[str], key: str) -> list[str]:
    """Local one-document-per-line text files only: rows of json/csv/parquet, zstd, or
    blank-line documents would be split wrongly, so they are refused with the way out."""
    files = [f for spec in specs for f in expand_paths(spec)]
    for f in files:
        if (f.startswith(("hf:", "builtin:")) or corpus.builder_for(f) != "text"
                or f.lower().endswith(".zst")):
            raise ConfigError(f"config key '{key}': {f} is not a local text file (one document "
                              "per line, optionally .gz/.bz2/.xz), so documents cannot be held "
                              "out of it; set forgetting.docs / forgetting.in_domain_docs to 0, "
                              "or give text files")
    return files


def _stream(files: Iterable[str]) -> Iterator[str]:
    """The documents of text files, one per non-blank line, in order (\\r\\n or \\n ends
    a line)."""
    for path in files:
        with corpus.open_bytes(path) as fh:
            yield from (x.decode("utf-8", "replace").rstrip("\r\n") for x in fh if x.strip())


def check(cfg: Any) -> None:
    """What :func:`split_general` and :func:`split_in_domain` will refuse, checked before any
    file is written or stage run (the experiment calls it before saving its config)."""
    for key in ("docs", "in_domain_docs"):
        if cfg.forgetting[key] < 0:
            raise ConfigError(f"config key 'forgetting.{key}': must be >= 0, got "
                              f"{cfg.forgetting[key]}")
    holds = {"cross_domain": cfg.forgetting.docs, "in_domain": cfg.forgetting.in_domain_docs}
    for name, docs in holds.items():
        if docs and cfg.corpora[name]:
            _files(cfg.corpora[name], f"corpora.{name}")
    if any(holds.values()) and any("txt_documents=blank_line" in o.replace(" ", "")
                                   for o in cfg.pretrain.overrides):
        raise ConfigError("config key 'pretrain.overrides': data.txt_documents=blank_line "
                          "documents cannot be held out line by line; set forgetting.docs and "
                          "forgetting.in_domain_docs to 0")


def split_general(cfg: Any, out: Path, exclude: Path | None = None
                  ) -> tuple[list[str], Path | None]:
    """The general corpus minus its last ``forgetting.docs`` documents (the files pretraining
    reads), and those documents apart (None when there are none to hold out). ``exclude``:
    a held-out in-domain file whose documents are also taken out of the general corpus (CDPT
    trains on both, and a general corpus of all domains may hold in-domain text)."""
    keep = cfg.forgetting.docs
    if not cfg.corpora.cross_domain or (keep == 0 and exclude is None):
        return list(cfg.corpora.cross_domain), None
    data = out / "data"
    train, held = data / "general-train.txt", data / "general-heldout.txt"
    if not train.is_file():
        lines = list(_stream(_files(cfg.corpora.cross_domain, "corpora.cross_domain")))
        if keep and len(lines) <= 2 * keep:
            raise ConfigError(f"corpora.cross_domain has {len(lines)} documents: too few to hold "
                              f"out forgetting.docs={keep}")
        gone = set() if exclude is None else {_norm(x) for x in _read(exclude)}
        data.mkdir(parents=True, exist_ok=True)
        if keep:
            atomic_write_lines(held, (f"{x}\n" for x in lines[-keep:]))
        atomic_write_lines(train, (f"{x}\n" for x in lines[:len(lines) - keep]
                                   if _norm(x) not in gone))
    return [str(train)], held if keep else None


def _read(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]  # written as "doc\n" per line


def _task_texts(cfg: Any) -> set[str]:
    """The labelled training file's texts (what fine-tuning reads, and ITPT by default) and
    the within-task corpus where one is given (what ITPT reads then)."""
    column = cfg.task.text_column
    texts: set[str] = set()
    for path in [cfg.task.train_file, *(f for spec in cfg.corpora.within_task or []
                                        for f in expand_paths(spec))]:
        if path.startswith("builtin:"):  # the embedded offline corpus: not in any domain file
            continue
        if corpus.builder_for(path) == "text" and not path.startswith("hf:"):
            texts |= {_norm(x) for x in _stream([path])}
        else:  # rows of a labelled or columnar file (ITPT reads their task.text_column)
            ds = labelled.read_labelled(path, columns=[column])
            texts |= {_norm(str(x)) for x in ds[column]}
    return texts


def split_in_domain(cfg: Any, out: Path, *, pretrains_on_it: bool
                    ) -> tuple[list[str], Path | None]:
    """The in-domain corpus for IDPT/CDPT minus ``forgetting.in_domain_docs`` held-out
    documents, and those apart (None when there are none to hold out).

    The held-out documents are drawn (seed 0) from the distinct documents that are neither a
    task training text nor in a selected corpus, so no variant has trained on them. The corpus
    is streamed (two passes, only line numbers kept), so its size is not bounded by memory.
    The corpus without them is written only when ``pretrains_on_it`` (IDPT or CDPT is in the
    grid): otherwise the original files stand and no copy of a large corpus is made.
    """
    docs = cfg.forgetting.in_domain_docs
    if not cfg.corpora.in_domain or not docs:
        return list(cfg.corpora.in_domain), None
    data = out / "data"
    train, held = data / "in-domain-train.txt", data / "in-domain-heldout.txt"
    files = _files(cfg.corpora.in_domain, "corpora.in_domain")
    if not held.is_file():
        seen = _task_texts(cfg) | {_norm(x) for x in _stream(
            _files(cfg.corpora.selected or [], "corpora.selected"))}
        eligible = array("q", (i for i, x in enumerate(_stream(files)) if _norm(x) not in seen))
        if len(eligible) <= 2 * docs:
            raise ConfigError(f"corpora.in_domain has {len(eligible)} documents that no variant "
                              f"trains on: too few to hold out forgetting.in_domain_docs={docs}")
        # twice as many as needed, in random order: a duplicated document counts once
        order = random.Random(SEED).sample(eligible, min(len(eligible), 2 * docs))
        wanted = set(order)
        texts = {i: x for i, x in enumerate(_stream(files)) if i in wanted}
        distinct = list(dict.fromkeys(_norm(texts[i]) for i in order))
        if len(distinct) < docs:
            raise ConfigError(f"corpora.in_domain: too few distinct documents to hold out "
                              f"forgetting.in_domain_docs={docs}")
        data.mkdir(parents=True, exist_ok=True)
        atomic_write_lines(held, (f"{x}\n" for x in distinct[:docs]))
    if not pretrains_on_it:
        return list(cfg.corpora.in_domain), held
    if not train.is_file():
        chosen = set(_read(held))
        atomic_write_lines(train, (f"{x}\n" for x in _stream(files) if _norm(x) not in chosen))
    return [str(train)], held


def pretrain_overrides(cfg: Any, held: Path | None) -> list[str]:
    """``pretrain.overrides``, preceded by ``data.eval_files=[held]`` so that every pretraining
    run reports its loss on the held-out in-domain text as it trains (eval_loss in its
    metrics.jsonl, drawn beside the training loss in the report's plot); not where the
    overrides (or an ablation's) choose their own held-out text, which the pretraining
    config would refuse beside it."""
    own = any(o.replace(" ", "").startswith(("data.eval_files=", "data.eval_fraction="))
              for o in [*cfg.pretrain.overrides, *(x for a in cfg.ablations for x in a.overrides)])
    return ([f"data.eval_files=[{held}]"] if held and not own else []) + list(
        cfg.pretrain.overrides)


def losses(models: dict[str, str], texts: list[str], cached: Path, *, max_seq_length: int
           ) -> dict[str, float | None]:
    """Each model's MLM loss on ``texts`` (None: no trained MLM head, see
    :func:`evaluation.mlm_loss`), kept in ``cached`` so a resumed experiment measures only
    the models it has not measured."""
    found = json.loads(cached.read_text()) if cached.is_file() else {}
    for key, model_dir in models.items():
        if key not in found and key != "feat":  # BERT-Feat's encoder is the base's
            found[key] = evaluation.mlm_loss(model_dir, texts, max_seq_length=max_seq_length,
                                             seed=0)
    atomic_write_text(cached, json.dumps(found, indent=1))
    return found


def perplexity(loss: float | None) -> float | None:
    """exp(mean MLM loss): the masked-token perplexity (None stays None)."""
    return None if loss is None else math.exp(loss)
