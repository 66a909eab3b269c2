"""Prepare: a pretraining recipe's corpus -> the training set the run draws batches from.

Documents are read per source (:mod:`.corpus`), a tokenizer is made from them when the run
makes its own (a WordPiece vocabulary from scratch, or a domain vocabulary extension), NSP
pairs or packed blocks are built once and cached (:mod:`.instances`), and the sources are
mixed by weight. The masked-LM objective calls these functions in its ``build``, and
``further-pt prepare`` calls the same ones ahead of the run, on a CPU machine, into the
shared ``data.cache_dir``: one code path, so the ``datasets`` cache keys (a fingerprint of
the documents, the tokenizer and every argument) cannot drift apart, and what prepare builds
is what the run looks up.

Every process of a run calls them; the preparation waits on a file lock in the cache dir,
never in a collective that could time out, so the other processes load what the first built.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
from omegaconf import DictConfig

from further_pt.data import corpus, instances, vocab
from further_pt.data.tokenizer import load_tokenizer, train_wordpiece
from further_pt.errors import ConfigError
from further_pt.files import atomic_write_text

logger = logging.getLogger(__name__)


# The run (MaskedLM.build) and `further-pt prepare` call these same two functions, so the
# datasets cache keys (a fingerprint of the documents, the tokenizer and every argument
# below) cannot drift apart: what prepare builds is what the run looks up.


def source_documents(cfg: DictConfig, source: corpus.Source) -> datasets.Dataset:
    """One source's documents (a ``text`` column), read and cached under ``data.cache_dir``."""
    d = cfg.data
    return corpus.load_documents(source, txt_documents=d.txt_documents,
                                 text_column=d.text_column,
                                 cache_dir=corpus.default_cache_dir(d.cache_dir),
                                 max_documents=d.max_documents)


def source_instances(cfg: DictConfig, documents: datasets.Dataset, tokenizer: Any
                     ) -> datasets.Dataset:
    """One source's documents -> NSP pairs or packed blocks, through the datasets cache.

    The tokenizer's truncation and padding are cleared first. Building clears them
    anyway (whole texts are encoded), but the cache key hashes the tokenizer as it
    comes in: a ``truncation`` block in tokenizer.json (all-MiniLM-L6-v2 has one) would
    otherwise key the first source differently from a tokenizer saved after a build
    (a checkpoint's, on resume), and the instances would be rebuilt for nothing.
    """
    instances.untruncated(tokenizer)
    d = cfg.data
    return instances.build_instances(
        documents, tokenizer, nsp=cfg.objective.nsp, max_seq_length=d.max_seq_length,
        short_seq_prob=d.short_seq_prob, txt_documents=d.txt_documents, seed=cfg.seed,
        num_proc=corpus.preprocessing_workers(d.preprocessing_workers, len(documents)))


def read_corpus(cfg: DictConfig, sources: list[corpus.Source]) -> list[datasets.Dataset]:
    """Every source's documents, read (or found cached) by one process while the others wait."""
    with corpus.preparation_lock(corpus.default_cache_dir(cfg.data.cache_dir), "the corpus"):
        return [source_documents(cfg, s) for s in sources]


def training_set(cfg: DictConfig, docs: list[datasets.Dataset], tokenizer: Any
                 ) -> datasets.Dataset:
    """The sources' instances, built (or found cached) once, mixed by ``data.source_weights``."""
    with corpus.preparation_lock(corpus.default_cache_dir(cfg.data.cache_dir),
                                 "the pretraining instances"):
        per_source = [source_instances(cfg, doc, tokenizer) for doc in docs]
    return corpus.mix(per_source, cfg.data.source_weights, cfg.seed)


def scratch_tokenizer(cfg: DictConfig, docs: list[datasets.Dataset], output_dir: Path) -> Any:
    """A WordPiece tokenizer trained on the corpus (main process), saved in the run."""
    folder = output_dir / "tokenizer"
    with corpus.preparation_lock(output_dir, "the tokenizer"):
        if not (folder / "tokenizer.json").is_file():
            fs = cfg.model.from_scratch
            per_source = math.ceil(fs.tokenizer_training_docs / len(docs))
            texts = (text for doc in docs for text in islice(
                (row["text"] for row in doc), per_source))
            tok = train_wordpiece(texts, vocab_size=fs.vocab_size, lowercase=fs.lowercase,
                                  max_seq_length=fs.max_position_embeddings)
            tok.save_pretrained(folder)
        return load_tokenizer(str(folder))


def extend_vocabulary(cfg: DictConfig, docs: list[datasets.Dataset], base: Any,
                      output_dir: Path) -> tuple[Any, list[Any]]:
    """Frequent corpus words the tokenizer splits become tokens (main process chooses)."""
    folder = output_dir / "tokenizer"
    chosen = folder / "extend_vocab.json"
    ev = cfg.model.extend_vocab
    with corpus.preparation_lock(output_dir, "the vocabulary extension"):
        if not chosen.is_file():
            texts = (row["text"] for doc in docs for row in doc)
            words = vocab.choose_words(texts, base, max_new_tokens=ev.max_new_tokens,
                                       min_frequency=ev.min_frequency)
            vocab.extend_tokenizer(base, words).save_pretrained(folder)
            atomic_write_text(chosen, json.dumps(words))
            sample = [row["text"] for doc in docs for row in islice(doc, 2000)]
            logger.info("vocabulary extension: %d new tokens (first 20: %s); tokens per "
                        "document on %d documents: %.1f -> %.1f", len(words),
                        ", ".join(w for w, _, _ in words[:20]), len(sample),
                        vocab.tokens_per_document(sample, base),
                        vocab.tokens_per_document(sample, load_tokenizer(str(folder))))
        return load_tokenizer(str(folder)), json.loads(chosen.read_text())


# ------------------------------------------------------------------ `further-pt prepare`


@dataclass(frozen=True)
class PreparedSource:
    """What ``prepare`` built for one ``data.train_files`` entry, as it reports it."""

    spec: str
    documents: int
    instances: int
    tokens: int
    cache_folder: Path | None  # None: datasets caching is off, nothing was kept
    read_seconds: float
    build_seconds: float


def check_preparable(cfg: DictConfig) -> None:
    """``model.from_scratch`` and ``model.extend_vocab`` runs make their tokenizer from the
    corpus inside the run: the instances' tokenizer is unknown ahead of it."""
    m = cfg.model
    for key, what in (("from_scratch", "trains a new tokenizer"),
                      ("extend_vocab", "extends its tokenizer")):
        if m[key] is not None:
            raise ConfigError(
                f"config key 'model.{key}': the run {what} on the corpus in its output dir, so "
                "prepare cannot know the tokenizer the instances need; prepare works with a "
                "given tokenizer (model.tokenizer or model.name_or_path) only")


def prepare(cfg: DictConfig, sources: list[corpus.Source], tokenizer: Any
            ) -> list[PreparedSource]:
    """Read every source and build its instances into the datasets cache, as the run will.

    Tokenizing a large corpus takes a while on CPU; done ahead on a cheap machine into a
    ``data.cache_dir`` on shared storage, the GPU job finds its instances cached and starts
    training at once. Only read-only work: the caller has made the run's own checks (the
    masked-LM objective's constructor: model config and ``tokenizer``); no weights, no
    Accelerator, no output dir. Sources are all read before any is tokenized, as the run
    does, so a bad file fails in seconds.
    """
    check_preparable(cfg)
    docs, read = [], []
    for source in sources:
        start = time.perf_counter()
        docs.append(source_documents(cfg, source))
        read.append(time.perf_counter() - start)
    done = []
    for source, doc, seconds in zip(sources, docs, read, strict=True):
        start = time.perf_counter()
        built = source_instances(cfg, doc, tokenizer)
        files = built.cache_files
        done.append(PreparedSource(
            spec=source.spec, documents=len(doc), instances=len(built),
            tokens=int(instances.lengths(built).sum()) if len(built) else 0,
            cache_folder=Path(files[0]["filename"]).parent if files else None,
            read_seconds=seconds, build_seconds=time.perf_counter() - start))
    return done
