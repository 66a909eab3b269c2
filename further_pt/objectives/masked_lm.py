"""Pretraining objective: masked-LM (+ NSP) on a corpus, for the Trainer.

:class:`MaskedLM` brings what is pretraining's own: the model with its MLM (+ NSP)
heads (a head warm-up for heads the encoder lacks), dynamic masking redrawn at every step
(token, whole-word or span), the sparse MLM loss and BERT's linear schedule. The Trainer
(:mod:`further_pt.train.trainer`) runs the loop.

It is built in two steps because the checks must come before any work: the
constructor reads only configs (the model's heads, its positions and
vocabulary against the tokenizer); :meth:`build` reads the corpus, claims the
output dir, builds the instances and the model.

Reading the corpus, making a tokenizer from it and building the instances is the data
package's (:mod:`further_pt.data.prepare`, the same code ``further-pt prepare`` runs ahead
of the job); what stays here is what an objective is: the model, the loss, the schedule.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from further_pt.data import corpus, instances, masking, prepare, streaming, tokenizer, vocab
from further_pt.errors import ConfigError
from further_pt.files import atomic_write_text
from further_pt.objectives import encoder, evaluation, layerwise, schedules
from further_pt.objectives.base import Run, Stream
from further_pt.objectives.mlm_loss import PretrainingObjective

logger = logging.getLogger("further_pt.objectives.masked_lm")

# Keys that may change between a run and its resumption (everything else must match).
RESUMABLE_KEYS = (
    "output_dir", "overwrite_output_dir", "train.max_steps", "train.log_every_steps",
    "checkpoint.every_steps", "checkpoint.keep_last", "data.dataloader_workers",
    "data.preprocessing_workers", "data.cache_dir", "train.trackers",
    "train.stop_check_every_steps", "train.collective_timeout_s", "train.compile",
    "eval.every_steps", "eval.batch_size",
)


class MaskedLM:
    """The MLM (+ NSP) objective. ``MaskedLM(cfg, resume_from)`` checks; ``build`` loads."""

    name = "pretrain"
    find_unused_parameters = False  # a head warm-up under DDP computes (then drops) all grads

    def __init__(self, cfg: DictConfig, resume_from: Path | None) -> None:
        """Read-only checks: the model has the heads the objective needs, and fits the data.

        ``resume_from`` is this process's own choice of checkpoint, made before the process
        group exists; :meth:`build` reads the model again if the main process chose another.
        """
        self.cfg = cfg
        self.sources = corpus.resolve_sources(cfg.data.train_files)
        self.new_words: list[Any] | None = None
        held_out = cfg.data.eval_files is not None or cfg.data.eval_fraction is not None
        # The held-out MLM loss, every eval.every_steps (None: no held-out set, no evaluation)
        self.metric = "loss" if held_out else None
        self.eval_every_steps = cfg.eval.every_steps if held_out else None
        self.eval_rows: list[dict[str, torch.Tensor]] = []
        self._read_model(resume_from)

    def _read_model(self, resume_from: Path | None) -> None:
        """The model's config and tokenizer, from ``resume_from`` (else the recipe's model),
        checked against the objective and the data; a from-scratch start has neither yet."""
        cfg, m = self.cfg, self.cfg.model
        self.resume_from = resume_from
        if resume_from is not None:
            self.model_config = encoder.load_config(str(resume_from))
        elif m.from_scratch is None:
            self.model_config = encoder.load_config(m.name_or_path,
                                                    trust_remote_code=m.trust_remote_code)
        else:
            self.model_config = None  # built once the tokenizer is trained
        self.tokenizer: Any = None
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
            return tokenizer.load_tokenizer(str(self.resume_from))
        m = self.cfg.model
        return tokenizer.load_tokenizer(m.tokenizer or m.name_or_path,
                                        trust_remote_code=m.trust_remote_code)

    def build(self, trainer: Run) -> None:
        """Corpus -> (claim the output dir) -> tokenizer -> instances -> model -> masking."""
        cfg, acc = self.cfg, trainer.accelerator
        d, o = cfg.data, cfg.objective
        if trainer.resume_from != self.resume_from:
            # This process saw another checkpoint (or none) than the main one, whose choice
            # every process resumes (Trainer.start): its config and tokenizer are the ones.
            self._read_model(trainer.resume_from)
        self.seed, self.rank = cfg.seed, trainer.rank
        if d.streaming:  # read on the fly: only the held-out files are read now
            docs = []
            _, held = prepare.held_out_documents(cfg, [])
            stream = streaming.training_stream(cfg, self.sources, self.tokenizer,
                                               rank=trainer.rank, world=trainer.world)
        else:
            docs = prepare.read_corpus(cfg, self.sources)
            docs, held = prepare.held_out_documents(cfg, docs)
        trainer.claim()  # the input is readable: only now does the run write its output dir
        base_tokenizer = self.tokenizer
        if self.tokenizer is None:
            self.tokenizer = prepare.scratch_tokenizer(cfg, docs, trainer.output_dir)
            self.model_config = encoder.scratch_config(cfg, self.tokenizer)
            encoder.pretraining_class(self.model_config, o.nsp)
        elif cfg.model.extend_vocab is not None and self.resume_from is None:
            self.tokenizer, self.new_words = prepare.extend_vocabulary(
                cfg, docs, self.tokenizer, trainer.output_dir)
        tok = self.tokenizer
        if d.streaming:
            train_set = stream
            self.corpora = [{"source": src.spec} for src in self.sources]
            self.sequences = self.tokens = None
        else:
            train_set = prepare.training_set(cfg, docs, tok)
            self.corpora = [{"source": src.spec, "documents": len(doc),
                             "fingerprint": doc._fingerprint}
                            for src, doc in zip(self.sources, docs, strict=True)]
            self.sequences = len(train_set)
            self.tokens = int(instances.lengths(train_set).sum()) if len(train_set) else 0
        if held is not None:
            self.eval_rows = prepare.evaluation_rows(cfg, held, tok)
        on_gpu = acc.device.type == "cuda"
        self.streams = [Stream(
            "corpus", train_set, self._collate(tok, pad_to_multiple_of=8 if on_gpu else None),
            lengths=instances.lengths(train_set) if d.group_by_length and not d.streaming
            else None,
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

    def _collate(self, tok: Any, pad_to_multiple_of: int | None) -> masking.MaskingCollate:
        """Pad and mask in the DataLoader (its workers, with data.dataloader_workers > 0): on
        the host, ahead of the step, so the step never waits on masking's Python loops."""
        o = self.cfg.objective
        return masking.MaskingCollate(
            pad_id=tok.pad_token_id, pad_to_multiple_of=pad_to_multiple_of, seed=self.seed,
            rank=self.rank, special_ids=masking.special_ids_tensor(tok),
            mask_token_id=tok.mask_token_id, vocab_size=len(tok),
            masked_lm_prob=o.masked_lm_prob, max_predictions=o.max_predictions_per_seq,
            continuation=(masking.word_continuation_table(tok)
                          if o.masking in ("whole_word", "span") else None),
            strategy=o.masking, span_p=o.span_geometric_p, span_max_length=o.span_max_words)

    def _plan_head_warmup(self, trainer: Run, net: Any, new_heads: list[str]
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
            atomic_write_text(path, json.dumps({"steps": steps, "heads": heads},
                                               indent=1))
        return steps, heads

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

    def loss(self, module: Any, batch: dict[str, torch.Tensor], *, stream: str, step: int,
             micro: int) -> tuple[torch.Tensor, dict[str, tuple[Any, Any]]]:
        """The MLM (+ NSP) loss of a batch the stream's collate masked (:meth:`_collate`).

        Without ``attention_mask`` (a batch with no padding: packed blocks) the model attends
        everywhere and builds no mask, so no step reads the device to ask whether it may skip
        one (transformers' ``padding_mask.all()``).
        """
        # Head warm-up on one process: no graph through the frozen encoder (3x less work).
        # Under DDP every parameter must get a gradient, so it is computed and dropped.
        self.module.encoder_frozen = step < self.warmup_steps and self.world == 1
        labels = batch["labels"]
        losses = module(batch["input_ids"], batch.get("attention_mask"),
                        batch["token_type_ids"], labels, batch.get("next_sentence_label"))
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

    def evaluate(self, module: Any, shard: Any) -> dict[str, Any]:
        """The held-out MLM loss and perplexity (the same masked positions every time)."""
        return evaluation.heldout_loss(module, self.eval_rows, batch_size=self.cfg.eval.batch_size,
                                       pad_id=self.tokenizer.pad_token_id, shard=shard)

    def better(self, new: float, best: float | None) -> bool:
        """Lower held-out loss, when the recipe keeps a best model (checkpoint.keep_best_by)."""
        if self.cfg.checkpoint.keep_best_by != "eval_loss":
            return False
        return best is None or new < best

    def export(self, module: Any, folder: Path) -> None:
        encoder.save_folder(module.model, self.tokenizer, folder)

    def card(self) -> dict[str, Any]:
        """What the model card says of this objective (see :mod:`further_pt.train.model_card`)."""
        cfg, o, d = self.cfg, self.cfg.objective, self.cfg.data
        held = ("no held-out set" if not self.metric else
                f"the held-out documents data.eval_files ({', '.join(d.eval_files)})"
                if d.eval_files is not None else
                f"held-out documents: a seeded {d.eval_fraction:g} of the corpus documents, "
                "never trained on")
        data = [f"- `{c['source']}`: " + (f"{c['documents']:,} documents (datasets "
                                           f"fingerprint `{c['fingerprint']}`)"
                                           if "documents" in c else "streamed")
                for c in self.corpora]
        data.append((f"- {self.sequences:,} training sequences of up to {d.max_seq_length} "
                     f"tokens, {self.tokens:,} tokens in all" if self.sequences is not None else
                     f"- read on the fly (data.streaming) as blocks of {d.max_seq_length} tokens")
                    + (f"; sources mixed by weight {list(d.source_weights)}"
                       if d.source_weights is not None else ""))
        if self.metric:
            data.append(f"- evaluation: {len(self.eval_rows):,} sequences of {held}")
        return {
            "pipeline_tag": "fill-mask",
            "tags": ["further-pretraining", "masked-lm"],
            "title": (f"`{cfg.model.name_or_path}` further pretrained" if cfg.model.name_or_path
                      else "A BERT built from a config (model.from_scratch) and pretrained")
                     + " on the corpora below (masked LM"
                     + (" + next-sentence prediction" if o.nsp else "") + ").",
            "summary": [f"- masking: {o.masking}, masked_lm_prob {o.masked_lm_prob:g}, at most "
                        f"{o.max_predictions_per_seq} predictions per sequence"],
            "data": data,
            "eval_dataset": held,
            "metrics": {"eval_loss": ("loss", "held-out MLM loss"),
                        "eval_perplexity": ("perplexity", "held-out perplexity")},
            "schedule": f", {self.cfg.train.warmup_steps:,} warm-up steps then linear decay to 0",
        }

    def summary(self) -> dict[str, Any]:
        return {"eval_sequences": len(self.eval_rows)} if self.metric else {}

    def flops_per_token(self) -> float | None:
        """The encoder at the full sequence length, and the MLM head on the masked share.

        During a head warm-up without a graph through the encoder (one process), the
        encoder only runs forward: a third of its training FLOPs.
        """
        o, seq = self.cfg.objective, self.cfg.data.max_seq_length
        # The dense path (an architecture without a known head layout) scores every position.
        share = min(o.masked_lm_prob, o.max_predictions_per_seq / seq) if self.module.sparse else 1
        config = self.module.model.config
        total = encoder.encoder_flops_per_token(config, seq, head_fraction=share)
        if not (self.module.encoder_frozen and self.module.sparse):
            return total
        encoder_flops = encoder.encoder_flops_per_token(config, seq)
        return encoder_flops / 3 + (total - encoder_flops)
