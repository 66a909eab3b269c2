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

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
import filelock
import torch
from omegaconf import DictConfig

from further_pt.data import corpus, instances, masking, order, vocab
from further_pt.data.tokenizer import load_tokenizer, train_wordpiece
from further_pt.errors import ConfigError, DataError
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
        num_proc=preprocessing_workers(d.preprocessing_workers, len(documents)))


def read_corpus(cfg: DictConfig, sources: list[corpus.Source]) -> list[datasets.Dataset]:
    """Every source's documents, read (or found cached) by one process while the others wait."""
    with preparation_lock(corpus.default_cache_dir(cfg.data.cache_dir), "the corpus"):
        return [source_documents(cfg, s) for s in sources]


def training_set(cfg: DictConfig, docs: list[datasets.Dataset], tokenizer: Any
                 ) -> datasets.Dataset:
    """The sources' instances, built (or found cached) once, mixed by ``data.source_weights``."""
    with preparation_lock(corpus.default_cache_dir(cfg.data.cache_dir),
                                 "the pretraining instances"):
        per_source = [source_instances(cfg, doc, tokenizer) for doc in docs]
    return corpus.mix(per_source, cfg.data.source_weights, cfg.seed)


# The seed part of the held-out masks: no training step has it, so they never repeat a
# training step's masks, and they are the same at every evaluation and in every process.
EVAL_SEED_PART = -1


def held_out_documents(cfg: DictConfig, docs: list[datasets.Dataset]
                       ) -> tuple[list[datasets.Dataset], list[datasets.Dataset] | None]:
    """(the documents to train on, the held-out documents or None).

    ``data.eval_files`` are read as sources of their own; ``data.eval_fraction`` takes a
    seeded share of each source's documents out of training: whole documents, so no block of
    a held-out document is ever trained on.
    """
    d = cfg.data
    cache = corpus.default_cache_dir(d.cache_dir)
    if d.eval_files is not None:
        with preparation_lock(cache, "the held-out documents"):
            held = [source_documents(cfg, s)
                    for s in corpus.resolve_sources(d.eval_files, "data.eval_files")]
        return docs, held
    if d.eval_fraction is None:
        return docs, None
    train, held = [], []
    with preparation_lock(cache, "the held-out split"):
        for i, doc in enumerate(docs, start=1):
            n_held = max(1, round(len(doc) * d.eval_fraction))
            if n_held >= len(doc):
                raise DataError(f"data.eval_fraction={d.eval_fraction}: source {i} of "
                                f"data.train_files has {len(doc)} document(s), too few to hold "
                                "some out and train on the rest")
            split = doc.train_test_split(test_size=n_held, seed=cfg.seed, shuffle=True)
            train.append(split["train"])
            held.append(split["test"])
    return train, held


def evaluation_rows(cfg: DictConfig, held: list[datasets.Dataset], tokenizer: Any
                    ) -> list[dict[str, torch.Tensor]]:
    """The held-out instances, masked once: every evaluation scores the same positions.

    Built like the training instances (NSP pairs or packed blocks), at most
    ``eval.max_sequences`` of them (a seeded choice), each masked as training masks
    (``objective.*``) from a seed of its own index, so the masks do not depend on batches,
    processes or the step: two evaluations of one model give the same loss.
    """
    with preparation_lock(corpus.default_cache_dir(cfg.data.cache_dir),
                                 "the held-out instances"):
        built = [source_instances(cfg, doc, tokenizer) for doc in held]
    ds = built[0] if len(built) == 1 else datasets.concatenate_datasets(built)
    if len(ds) == 0:
        raise DataError("the held-out documents (data.eval_files / data.eval_fraction) give no "
                        "sequence: they are empty or shorter than a sequence's special tokens")
    chosen = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed))
    chosen = chosen[:cfg.eval.max_sequences].sort().values.tolist()
    o = cfg.objective
    special = masking.special_ids_tensor(tokenizer)
    continuation = (masking.word_continuation_table(tokenizer)
                    if o.masking in ("whole_word", "span") else None)
    rows = []
    for index in chosen:  # each masked from a seed of its own index in the held-out set
        one = instances.collate([ds[index]], pad_id=tokenizer.pad_token_id)
        gen = torch.Generator().manual_seed(order.step_seed(cfg.seed, EVAL_SEED_PART, index))
        masked, labels = masking.mask_tokens(
            one["input_ids"], one["attention_mask"], special_ids=special,
            mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
            masked_lm_prob=o.masked_lm_prob, max_predictions=o.max_predictions_per_seq,
            continuation=continuation, strategy=o.masking, span_p=o.span_geometric_p,
            span_max_length=o.span_max_words, generator=gen)
        rows.append({**{key: value[0] for key, value in one.items()},
                     "input_ids": masked[0], "labels": labels[0]})
    logger.info("held-out evaluation: %d sequences of %d held-out, %d masked tokens", len(rows),
                len(ds), sum(int((r["labels"] != -100).sum()) for r in rows))
    return rows


def scratch_tokenizer(cfg: DictConfig, docs: list[datasets.Dataset], output_dir: Path) -> Any:
    """A WordPiece tokenizer trained on the corpus (main process), saved in the run.

    ``tokenizers``' WordPiece training is not deterministic (huggingface/tokenizers#1794:
    the ids of ``##`` pieces follow a hash map's iteration order and break ties between
    merges), so the same corpus can give a different vocabulary, and so a different model,
    on every run. The first run therefore keeps what it trained in ``data.cache_dir``,
    keyed by the documents' fingerprints and every setting of the training, and a run with
    the same corpus and settings reuses it: two runs of one recipe from scratch, or a run
    and its benchmark reference, start from the same vocabulary. A resumed run reads the
    one in its own output_dir.
    """
    folder = output_dir / "tokenizer"
    with preparation_lock(output_dir, "the tokenizer"):
        if not (folder / "tokenizer.json").is_file():
            cached = _cached_tokenizer_folder(cfg, docs)
            with preparation_lock(cached.parent, "the tokenizer"):
                if (cached / "tokenizer.json").is_file():
                    logger.info("tokenizer: the WordPiece vocabulary already trained on these "
                                "documents with these settings (%s)", cached)
                else:
                    fs = cfg.model.from_scratch
                    per_source = math.ceil(fs.tokenizer_training_docs / len(docs))
                    texts = (text for doc in docs for text in islice(
                        (row["text"] for row in doc), per_source))
                    tok = train_wordpiece(texts, vocab_size=fs.vocab_size,
                                          lowercase=fs.lowercase,
                                          max_seq_length=fs.max_position_embeddings)
                    partial = cached.with_name(cached.name + ".tmp")
                    shutil.rmtree(partial, ignore_errors=True)
                    tok.save_pretrained(partial)
                    os.replace(partial, cached)
            partial = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(cached, partial)
            os.replace(partial, folder)
        return load_tokenizer(str(folder))


def _cached_tokenizer_folder(cfg: DictConfig, docs: list[datasets.Dataset]) -> Path:
    """Where the cache keeps the vocabulary trained on ``docs`` with the recipe's settings."""
    import tokenizers

    fs = cfg.model.from_scratch
    key = json.dumps({
        "documents": [doc._fingerprint for doc in docs], "vocab_size": fs.vocab_size,
        "lowercase": fs.lowercase, "training_docs": fs.tokenizer_training_docs,
        "max_positions": fs.max_position_embeddings, "tokenizers": tokenizers.__version__,
    }, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return corpus.default_cache_dir(cfg.data.cache_dir) / "tokenizers" / f"wordpiece-{digest}"


def extend_vocabulary(cfg: DictConfig, docs: list[datasets.Dataset], base: Any,
                      output_dir: Path) -> tuple[Any, list[Any]]:
    """Frequent corpus words the tokenizer splits become tokens (main process chooses)."""
    folder = output_dir / "tokenizer"
    chosen = folder / "extend_vocab.json"
    ev = cfg.model.extend_vocab
    with preparation_lock(output_dir, "the vocabulary extension"):
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
    if cfg.data.streaming:
        raise ConfigError("config key 'data.streaming': a streamed corpus is read, tokenized and "
                          "packed on the fly by the run itself: there is nothing to prepare")
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
    docs, _ = held_out_documents(cfg, docs)  # the run trains on what eval_fraction leaves
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


@contextlib.contextmanager
def preparation_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold ``folder/.further_pt-prepare.lock`` (a file lock) while preparing ``what``.

    Data preparation - reading and tokenizing a corpus, training a tokenizer - can take
    longer than any collective timeout, so processes must not wait for it in a barrier
    (``main_process_first``): past ``train.collective_timeout_s`` the job would abort and
    lose the unfinished cache, again on every rerun. They queue on this lock instead,
    which has no timeout: the first process prepares and fills the cache, the others
    then find it and load it. Where the cache is node-local each node prepares once; on
    shared storage the job prepares once.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(folder / ".further_pt-prepare.lock"))
    if not _try_lock(lock):
        logger.info("waiting for another process to finish preparing %s (%s)", what, folder)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _try_lock(lock: filelock.FileLock) -> bool:
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return False
    return True


def preprocessing_workers(value: int | str, documents: int) -> int:
    """``data.preprocessing_workers``: a number, or ``auto`` = the cores this process may use.

    While one process prepares, the others on its node wait on the lock, so it may use
    every core it is allowed (``sched_getaffinity``: cgroups, taskset, container limits),
    but no more than one worker per 2,000 documents: each worker is a new process, which
    costs more than it saves on a small corpus.
    """
    if value != "auto":
        return int(value)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, documents // 2000))
