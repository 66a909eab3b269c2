"""Pretraining objective: masked-LM (+ NSP) on a corpus, for the Trainer.

:class:`MaskedLM` brings what is pretraining's own: the tokenizer (the
model's, a checkpoint's, or a WordPiece one trained on the corpus), the corpus
read per source, NSP pairs or packed blocks built once and cached, sources
mixed by weight, the model with its MLM (+ NSP) heads, dynamic masking redrawn
at every step (token, whole-word or span), and the sparse MLM loss. The Trainer
(:mod:`further_pt.train.trainer`) runs the loop.

It is built in two steps because the checks must come before any work: the
constructor reads only configs (the model's heads, its positions and
vocabulary against the tokenizer); :meth:`build` reads the corpus, claims the
output dir, builds the instances and the model.

:func:`prepare` (``further-pt prepare``) builds the same instances ahead of the run,
on a CPU machine, into the shared ``data.cache_dir``: :func:`source_documents` and
:func:`source_instances` are the one code path both take, so the cache keys agree.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
import torch
from omegaconf import DictConfig

from further_pt.data import corpus, instances, masking, vocab
from further_pt.errors import ConfigError
from further_pt.objectives import encoder, layerwise, schedules
from further_pt.objectives.mlm_loss import PretrainingObjective
from further_pt.train import checkpoint, hardware
from further_pt.train.launch import step_seed
from further_pt.train.trainer import Stream, Trainer

logger = logging.getLogger("further_pt.objectives.masked_lm")

# Keys that may change between a run and its resumption (everything else must match).
RESUMABLE_KEYS = (
    "output_dir", "overwrite_output_dir", "train.max_steps", "train.log_every_steps",
    "checkpoint.every_steps", "checkpoint.keep_last", "data.dataloader_workers",
    "data.preprocessing_workers", "data.cache_dir", "train.trackers",
    "train.stop_check_every_steps", "train.collective_timeout_s", "train.compile",
)


# ---------------------------------------------------------------- data: shared with `prepare`
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


class MaskedLM:
    """The MLM (+ NSP) objective. ``MaskedLM(cfg, resume_from)`` checks; ``build`` loads."""

    name = "pretrain"
    metric = None  # no evaluation during pretraining
    find_unused_parameters = False  # a head warm-up under DDP computes (then drops) all grads

    def __init__(self, cfg: DictConfig, resume_from: Path | None) -> None:
        """Read-only checks: the model has the heads the objective needs, and fits the data."""
        self.cfg, self.resume_from = cfg, resume_from
        self.sources = corpus.resolve_sources(cfg.data.train_files)
        m = cfg.model
        if resume_from is not None:
            self.model_config = encoder.load_config(str(resume_from))
        elif m.from_scratch is None:
            self.model_config = encoder.load_config(m.name_or_path,
                                                  trust_remote_code=m.trust_remote_code)
        else:
            self.model_config = None  # built once the tokenizer is trained
        self.tokenizer: Any = None
        self.new_words: list[Any] | None = None
        if self.model_config is not None:
            encoder.pretraining_class(self.model_config, cfg.objective.nsp)
            self.tokenizer = self._given_tokenizer()
            encoder.check_compatible(self.model_config, self.tokenizer, cfg.data.max_seq_length)
            if cfg.objective.masking in ("whole_word", "span"):  # build() needs word boundaries
                masking.word_boundary_scheme(self.tokenizer)
            if m.extend_vocab is not None and getattr(self.tokenizer, "backend_tokenizer",
                                                      None) is None:
                raise ConfigError(f"model.extend_vocab: the tokenizer of {m.name_or_path} is a "
                                  "slow (Python) tokenizer; vocabulary extension edits a fast "
                                  "tokenizer's tokenizer.json")

    def _given_tokenizer(self) -> Any:
        if self.resume_from is not None:
            return encoder.load_tokenizer(str(self.resume_from))
        m = self.cfg.model
        return encoder.load_tokenizer(m.tokenizer or m.name_or_path,
                                    trust_remote_code=m.trust_remote_code)

    def build(self, trainer: Trainer) -> None:
        """Corpus -> (claim the output dir) -> tokenizer -> instances -> model -> masking."""
        cfg, acc = self.cfg, trainer.accelerator
        d, o = cfg.data, cfg.objective
        self.resume_from = trainer.resume_from  # the main process's choice (Trainer.start)
        self.seed, self.rank = cfg.seed, trainer.rank
        # Preparation waits on a file lock, never in a collective that could time out.
        cache = corpus.default_cache_dir(d.cache_dir)
        with corpus.preparation_lock(cache, "the corpus"):
            docs = [source_documents(cfg, s) for s in self.sources]
        trainer.claim()  # the input is readable: only now does the run write its output dir
        base_tokenizer = self.tokenizer
        if self.tokenizer is None:
            self.tokenizer = self._scratch_tokenizer(docs, trainer)
            self.model_config = encoder.scratch_config(cfg, self.tokenizer)
            encoder.pretraining_class(self.model_config, o.nsp)
        elif cfg.model.extend_vocab is not None and self.resume_from is None:
            self.tokenizer, self.new_words = self._extend_vocabulary(docs, trainer)
        tok = self.tokenizer
        with corpus.preparation_lock(cache, "the pretraining instances"):
            per_source = [source_instances(cfg, doc, tok) for doc in docs]
        train_set = corpus.mix(per_source, d.source_weights, cfg.seed)
        on_gpu = acc.device.type == "cuda"
        self.streams = [Stream(
            "corpus", train_set,
            partial(instances.collate, pad_id=tok.pad_token_id,
                    pad_to_multiple_of=8 if on_gpu else None),
            lengths=instances.lengths(train_set) if d.group_by_length else None,
            drop_last=True)]

        torch.manual_seed(cfg.seed)  # every rank builds the same weights from the same seed
        m = cfg.model
        new_heads: list[str] = []
        if self.resume_from is not None or m.from_scratch is None:
            source = self.resume_from or m.name_or_path
            net, new_heads = encoder.load_pretraining_model(
                source, self.model_config, nsp=o.nsp, attn_implementation=m.attn_implementation,
                trust_remote_code=m.trust_remote_code)
        else:
            net = encoder.new_pretraining_model(self.model_config, nsp=o.nsp,
                                              attn_implementation=m.attn_implementation)
        if self.new_words is not None:  # rows of the new tokens: the mean of their pieces
            vocab.extend_model(net, base_tokenizer, tok, self.new_words)
        self.module = PretrainingObjective(net, nsp=o.nsp,
                                           max_predictions=o.max_predictions_per_seq)
        self.world = trainer.world
        self.warmup_steps, heads = self._plan_head_warmup(trainer, net, new_heads)
        head_names = set(heads)
        named = list(net.named_parameters())
        self.head_params = [p for n, p in named if n in head_names]
        self.encoder_params = [p for n, p in named if n not in head_names]
        # Masking runs on the host (prepare_batch), so these stay on the CPU.
        self.special_ids = masking.special_ids_tensor(tok)
        self.continuation = (masking.word_continuation_table(tok)
                             if o.masking in ("whole_word", "span") else None)

    def _plan_head_warmup(self, trainer: Trainer, net: Any, new_heads: list[str]
                          ) -> tuple[int, list[str]]:
        """How many steps the heads learn alone, and which parameters are "the heads".

        ``auto`` warms up only heads the loaded model lacked (newly initialised);
        an integer warms up those, or every parameter outside the encoder if none
        was missing. The plan is written to ``head_warmup.json`` on a fresh start
        and read back on resume (the checkpoint has its heads, so ``auto`` could
        not tell any more).
        """
        path = trainer.output_dir / "head_warmup.json"
        if self.resume_from is not None and path.is_file():
            plan = json.loads(path.read_text())
            return plan["steps"], plan["heads"]
        hw = self.cfg.objective.head_warmup
        if new_heads and trainer.is_main:
            logger.info("the loaded model lacks %d head tensors, newly initialised: %s",
                        len(new_heads), ", ".join(new_heads))
        steps = (hw.auto_steps if new_heads else 0) if hw.steps == "auto" else int(hw.steps)
        prefix = f"{net.base_model_prefix}."
        heads = (new_heads or [n for n, _ in net.named_parameters()
                               if not n.startswith(prefix)]) if steps else []
        if steps and trainer.is_main:
            logger.info("head warm-up: %s learn alone for %d steps at lr %g with the encoder "
                        "frozen; then the whole model trains for train.max_steps=%d steps "
                        "under the recipe's schedule (warmup_steps counted from there)",
                        ", ".join(heads), steps, hw.lr, self.cfg.train.max_steps)
        if trainer.is_main:
            checkpoint.atomic_write_text(path, json.dumps({"steps": steps, "heads": heads},
                                                          indent=1))
        return steps, heads

    def _extend_vocabulary(self, docs: list[Any], trainer: Trainer) -> tuple[Any, list[Any]]:
        """Frequent corpus words the tokenizer splits become tokens (main process chooses)."""
        folder = trainer.output_dir / "tokenizer"
        chosen = folder / "extend_vocab.json"
        ev, base = self.cfg.model.extend_vocab, self.tokenizer
        with corpus.preparation_lock(trainer.output_dir, "the vocabulary extension"):
            if not chosen.is_file():
                texts = (row["text"] for doc in docs for row in doc)
                words = vocab.choose_words(texts, base, max_new_tokens=ev.max_new_tokens,
                                           min_frequency=ev.min_frequency)
                vocab.extend_tokenizer(base, words).save_pretrained(folder)
                checkpoint.atomic_write_text(chosen, json.dumps(words))
                sample = [row["text"] for doc in docs for row in islice(doc, 2000)]
                logger.info("vocabulary extension: %d new tokens (first 20: %s); tokens per "
                            "document on %d documents: %.1f -> %.1f", len(words),
                            ", ".join(w for w, _, _ in words[:20]), len(sample),
                            vocab.tokens_per_document(sample, base),
                            vocab.tokens_per_document(sample, encoder.load_tokenizer(str(folder))))
            return encoder.load_tokenizer(str(folder)), json.loads(chosen.read_text())

    def _scratch_tokenizer(self, docs: list[Any], trainer: Trainer) -> Any:
        """A WordPiece tokenizer trained on the corpus (main process), saved in the run."""
        folder = trainer.output_dir / "tokenizer"
        with corpus.preparation_lock(trainer.output_dir, "the tokenizer"):
            if not (folder / "tokenizer.json").is_file():
                fs = self.cfg.model.from_scratch
                per_source = math.ceil(fs.tokenizer_training_docs / len(docs))
                texts = (text for doc in docs for text in islice(
                    (row["text"] for row in doc), per_source))
                tok = encoder.train_wordpiece(texts, vocab_size=fs.vocab_size,
                                            lowercase=fs.lowercase,
                                            max_seq_length=fs.max_position_embeddings)
                tok.save_pretrained(folder)
            return encoder.load_tokenizer(str(folder))

    # ------------------------------------------------------------------ the Trainer's interface

    def total_steps(self, steps_per_epoch: int) -> int:
        """The head warm-up's steps, then ``train.max_steps`` steps of the whole model."""
        return self.warmup_steps + self.cfg.train.max_steps

    def optimizer_groups(self) -> list[dict[str, Any]]:
        wd = self.cfg.train.weight_decay
        if not self.warmup_steps:
            return layerwise.param_groups(self.module.parameters(), wd, name="model")
        return (layerwise.param_groups(self.encoder_params, wd, name="encoder")
                + layerwise.param_groups(self.head_params, wd, name="heads"))

    def schedule(self, optimizer: Any, *, total_steps: int, steps_per_epoch: int) -> Any:
        """Linear warmup over ``train.warmup_steps``, then linear decay to 0 (BERT).

        After a head warm-up, which runs at ``objective.head_warmup.lr`` on the heads
        alone: the same schedule then starts at its own step 0.
        """
        t = self.cfg.train
        if not self.warmup_steps:
            return schedules.build("linear", optimizer, total_steps=total_steps,
                                   warmup_steps=t.warmup_steps)
        return schedules.with_head_warmup(
            optimizer, head_steps=self.warmup_steps,
            head_factor=self.cfg.objective.head_warmup.lr / t.lr, head_groups={"heads"},
            main=lambda s: schedules.linear_factor(s, t.warmup_steps, t.max_steps))

    def prepare_batch(self, batch: dict[str, torch.Tensor], *, stream: str, step: int,
                      micro: int) -> dict[str, torch.Tensor]:
        """Mask on the host, before the copy to the device: a pure function of (seed, step,
        rank, micro-batch), so a resumed run masks as the uninterrupted one did.

        On the host because whole-word and span masking walk words in Python (``.tolist()``,
        numpy): on a GPU batch each of those would wait for the device to drain. Here the
        CPU works while the GPU runs the previous step.
        """
        o = self.cfg.objective
        gen = torch.Generator().manual_seed(step_seed(self.seed, step, self.rank, micro))
        masked_ids, labels = masking.mask_tokens(
            batch["input_ids"], batch["attention_mask"], special_ids=self.special_ids,
            mask_token_id=self.tokenizer.mask_token_id, vocab_size=len(self.tokenizer),
            masked_lm_prob=o.masked_lm_prob, max_predictions=o.max_predictions_per_seq,
            continuation=self.continuation, strategy=o.masking, span_p=o.span_geometric_p,
            span_max_length=o.span_max_words, generator=gen)
        return {**batch, "input_ids": masked_ids, "labels": labels}

    def loss(self, module: Any, batch: dict[str, torch.Tensor], *, stream: str, step: int,
             micro: int) -> tuple[torch.Tensor, dict[str, tuple[Any, Any]]]:
        """The MLM (+ NSP) loss of a batch :meth:`prepare_batch` masked."""
        # Head warm-up on one process: no graph through the frozen encoder (3x less work).
        # Under DDP every parameter must get a gradient, so it is computed and dropped.
        self.module.encoder_frozen = step < self.warmup_steps and self.world == 1
        labels = batch["labels"]
        losses = module(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                        labels, batch.get("next_sentence_label"))
        metrics: dict[str, tuple[Any, Any]] = {"mlm_loss": (losses.mlm.detach(), 1)}
        if losses.nsp is not None:
            metrics["nsp_loss"] = (losses.nsp.detach(), 1)
            metrics["nsp_accuracy"] = (losses.nsp_correct, labels.shape[0])
        return losses.total, metrics

    def before_optimizer_step(self, step: int) -> None:
        """During the head warm-up the encoder gets no update, decay or optimizer moments."""
        if step < self.warmup_steps:
            for p in self.encoder_params:
                p.grad = None

    def evaluate(self, model_: Any, shard: Any) -> dict[str, Any]:
        return {}

    def better(self, new: float, best: float | None) -> bool:
        return False

    def export(self, module: Any, folder: Path) -> None:
        encoder.save_folder(module.model, self.tokenizer, folder)

    def summary(self) -> dict[str, Any]:
        return {}

    def flops_per_token(self) -> float | None:
        """The encoder at the full sequence length, and the MLM head on the masked share.

        During a head warm-up without a graph through the encoder (one process), the
        encoder only runs forward: a third of its training FLOPs.
        """
        o, seq = self.cfg.objective, self.cfg.data.max_seq_length
        # The dense path (an architecture without a known head layout) scores every position.
        share = min(o.masked_lm_prob, o.max_predictions_per_seq / seq) if self.module.sparse else 1
        config = self.module.model.config
        total = hardware.encoder_flops_per_token(config, seq, head_fraction=share)
        if not (self.module.encoder_frozen and self.module.sparse):
            return total
        encoder = hardware.encoder_flops_per_token(config, seq)
        return encoder / 3 + (total - encoder)


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


def prepare(cfg: DictConfig) -> list[PreparedSource]:
    """Read every source and build its instances into the datasets cache, as the run will.

    Tokenizing a large corpus takes a while on CPU; done ahead on a cheap machine into a
    ``data.cache_dir`` on shared storage, the GPU job finds its instances cached and starts
    training at once. Only read-only work: the run's own checks (:class:`MaskedLM`'s
    constructor: model config and tokenizer), no weights, no Accelerator, no output dir.
    Sources are all read before any is tokenized, as the run does, so a bad file fails
    in seconds. ``model.from_scratch`` and ``model.extend_vocab`` runs make their
    tokenizer from the corpus inside the run: the instances' tokenizer is unknown here.
    """
    m = cfg.model
    for key, what in (("from_scratch", "trains a new tokenizer"),
                      ("extend_vocab", "extends its tokenizer")):
        if m[key] is not None:
            raise ConfigError(
                f"config key 'model.{key}': the run {what} on the corpus in its output dir, so "
                "prepare cannot know the tokenizer the instances need; prepare works with a "
                "given tokenizer (model.tokenizer or model.name_or_path) only")
    objective = MaskedLM(cfg, None)
    docs, read = [], []
    for source in objective.sources:
        start = time.perf_counter()
        docs.append(source_documents(cfg, source))
        read.append(time.perf_counter() - start)
    done = []
    for source, doc, seconds in zip(objective.sources, docs, read, strict=True):
        start = time.perf_counter()
        built = source_instances(cfg, doc, objective.tokenizer)
        files = built.cache_files
        done.append(PreparedSource(
            spec=source.spec, documents=len(doc), instances=len(built),
            tokens=int(instances.lengths(built).sum()) if len(built) else 0,
            cache_folder=Path(files[0]["filename"]).parent if files else None,
            read_seconds=seconds, build_seconds=time.perf_counter() - start))
    return done
