"""Pretraining objective: masked-LM (+ NSP) on a corpus, for the Trainer.

:class:`MaskedLM` brings what is pretraining's own: the tokenizer (the
model's, a checkpoint's, or a WordPiece one trained on the corpus), the corpus
read per source, NSP pairs or packed blocks built once and cached, sources
mixed by weight, the model with its MLM (+ NSP) heads, dynamic masking redrawn
at every step (token, whole-word or span), and the sparse MLM loss. The Trainer
(:mod:`further_pt.trainer`) runs the loop.

It is built in two steps because the checks must come before any work: the
constructor reads only configs (the model's heads, its positions and
vocabulary against the tokenizer); :meth:`build` reads the corpus, claims the
output dir, builds the instances and the model.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from further_pt import corpus, instances, layerwise, masking, model, schedules
from further_pt.objective import PretrainingObjective
from further_pt.trainer import Stream, Trainer
from further_pt.training import step_seed

logger = logging.getLogger("further_pt.pretraining")

# Keys that may change between a run and its resumption (everything else must match).
RESUMABLE_KEYS = (
    "output_dir", "overwrite_output_dir", "train.max_steps", "train.log_every_steps",
    "checkpoint.every_steps", "checkpoint.keep_last", "data.dataloader_workers",
    "data.preprocessing_workers", "data.cache_dir",
)


class MaskedLM:
    """The MLM (+ NSP) objective. ``MaskedLM(cfg, resume_from)`` checks; ``build`` loads."""

    name = "pretrain"
    metric = None  # no evaluation during pretraining
    find_unused_parameters = False

    def __init__(self, cfg: DictConfig, resume_from: Path | None) -> None:
        """Read-only checks: the model has the heads the objective needs, and fits the data."""
        self.cfg, self.resume_from = cfg, resume_from
        self.sources = corpus.resolve_sources(cfg.data.train_files)
        m = cfg.model
        if resume_from is not None:
            self.model_config = model.load_config(str(resume_from))
        elif m.from_scratch is None:
            self.model_config = model.load_config(m.name_or_path,
                                                  trust_remote_code=m.trust_remote_code)
        else:
            self.model_config = None  # built once the tokenizer is trained
        self.tokenizer: Any = None
        if self.model_config is not None:
            model.pretraining_class(self.model_config, cfg.objective.nsp)
            self.tokenizer = self._given_tokenizer()
            model.check_compatible(self.model_config, self.tokenizer, cfg.data.max_seq_length)

    def _given_tokenizer(self) -> Any:
        if self.resume_from is not None:
            return model.load_tokenizer(str(self.resume_from))
        m = self.cfg.model
        return model.load_tokenizer(m.tokenizer or m.name_or_path,
                                    trust_remote_code=m.trust_remote_code)

    def build(self, trainer: Trainer) -> None:
        """Corpus -> (claim the output dir) -> tokenizer -> instances -> model -> masking."""
        cfg, acc = self.cfg, trainer.accelerator
        d, o = cfg.data, cfg.objective
        self.seed, self.rank = cfg.seed, trainer.rank
        cache_dir = corpus.default_cache_dir(d.cache_dir)
        with acc.main_process_first():
            docs = [corpus.load_documents(s, txt_documents=d.txt_documents,
                                          text_column=d.text_column, cache_dir=cache_dir,
                                          max_documents=d.max_documents) for s in self.sources]
        trainer.claim()  # the input is readable: only now does the run write its output dir
        if self.tokenizer is None:
            self.tokenizer = self._scratch_tokenizer(docs, trainer)
            self.model_config = model.scratch_config(cfg, self.tokenizer)
            model.pretraining_class(self.model_config, o.nsp)
        tok = self.tokenizer
        with acc.main_process_first():
            per_source = [instances.build_instances(
                doc, tok, nsp=o.nsp, max_seq_length=d.max_seq_length,
                short_seq_prob=d.short_seq_prob, txt_documents=d.txt_documents, seed=cfg.seed,
                num_proc=d.preprocessing_workers) for doc in docs]
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
        if self.resume_from is not None or m.from_scratch is None:
            source = self.resume_from or m.name_or_path
            net = model.load_pretraining_model(source, self.model_config, nsp=o.nsp,
                                               attn_implementation=m.attn_implementation,
                                               trust_remote_code=m.trust_remote_code)
        else:
            net = model.new_pretraining_model(self.model_config, nsp=o.nsp,
                                              attn_implementation=m.attn_implementation)
        self.module = PretrainingObjective(net, nsp=o.nsp)
        self.special_ids = masking.special_ids_tensor(tok).to(acc.device)
        self.continuation = (masking.word_continuation_table(tok).to(acc.device)
                             if o.masking in ("whole_word", "span") else None)

    def _scratch_tokenizer(self, docs: list[Any], trainer: Trainer) -> Any:
        """A WordPiece tokenizer trained on the corpus (main process), saved in the run."""
        folder = trainer.output_dir / "tokenizer"
        with trainer.accelerator.main_process_first():
            if not (folder / "tokenizer.json").is_file() and trainer.is_main:
                fs = self.cfg.model.from_scratch
                per_source = math.ceil(fs.tokenizer_training_docs / len(docs))
                texts = (text for doc in docs for text in islice(
                    (row["text"] for row in doc), per_source))
                tok = model.train_wordpiece(texts, vocab_size=fs.vocab_size,
                                            lowercase=fs.lowercase,
                                            max_seq_length=fs.max_position_embeddings)
                tok.save_pretrained(folder)
            return model.load_tokenizer(str(folder))

    # ------------------------------------------------------------------ the Trainer's interface

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.cfg.train.max_steps

    def optimizer_groups(self) -> list[dict[str, Any]]:
        return layerwise.param_groups(self.module.parameters(), self.cfg.train.weight_decay,
                                      name="model")

    def schedule(self, optimizer: Any, *, total_steps: int, steps_per_epoch: int) -> Any:
        """Linear warmup over ``train.warmup_steps``, then linear decay to 0 (BERT)."""
        return schedules.build("linear", optimizer, total_steps=total_steps,
                               warmup_steps=self.cfg.train.warmup_steps)

    def loss(self, module: Any, batch: dict[str, torch.Tensor], *, stream: str, step: int,
             micro: int) -> tuple[torch.Tensor, dict[str, tuple[Any, Any]]]:
        """Mask (a pure function of seed, step, rank, micro-batch), then the MLM (+ NSP) loss."""
        o = self.cfg.objective
        gen = torch.Generator(device=batch["input_ids"].device).manual_seed(
            step_seed(self.seed, step, self.rank, micro))
        masked_ids, labels = masking.mask_tokens(
            batch["input_ids"], batch["attention_mask"], special_ids=self.special_ids,
            mask_token_id=self.tokenizer.mask_token_id, vocab_size=len(self.tokenizer),
            masked_lm_prob=o.masked_lm_prob, max_predictions=o.max_predictions_per_seq,
            continuation=self.continuation, strategy=o.masking, span_p=o.span_geometric_p,
            span_max_length=o.span_max_words, generator=gen)
        losses = module(masked_ids, batch["attention_mask"], batch["token_type_ids"], labels,
                        batch.get("next_sentence_label"))
        metrics: dict[str, tuple[Any, Any]] = {"mlm_loss": (losses.mlm.detach(), 1)}
        if losses.nsp is not None:
            metrics["nsp_loss"] = (losses.nsp.detach(), 1)
            metrics["nsp_accuracy"] = (losses.nsp_correct, labels.shape[0])
        return losses.total, metrics

    def before_optimizer_step(self, step: int) -> None:
        pass

    def evaluate(self, model_: Any) -> dict[str, Any]:
        return {}

    def better(self, new: float, best: float | None) -> bool:
        return False

    def export(self, module: Any, folder: Path) -> None:
        model.save_folder(module.model, self.tokenizer, folder)

    def summary(self) -> dict[str, Any]:
        return {}
