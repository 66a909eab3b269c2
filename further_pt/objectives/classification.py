"""Fine-tuning objective: text classification with Sun et al.'s and ULMFiT's strategies.

Single-label, multi-label or regression (``task.kind``: :mod:`.kinds` says what each makes
of the labels, the loss, the metrics and the predictions).

:class:`Classification` brings what is fine-tuning's own: labelled data read,
checked and tokenized per task (long texts truncated head / tail / head+tail or
cut into segments), a classifier with its pooling and layer selection (one head
per task in multi-task training), layer groups with their own learning rates
(layer-wise decay), BERT-Feat's frozen encoder, gradual unfreezing, the
schedule (STLR, warmup + linear / cosine / constant), the task kind's loss (single-label
cross-entropy weighted by class with ``train.class_weights``), evaluation on the dev set (each
epoch end, or every ``eval.every_steps``), and the saved model folder. The Trainer
(:mod:`further_pt.train.trainer`) runs the loop, keeps the best evaluation and stops early
after ``train.early_stopping_patience``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification

from further_pt.data import (
    corpus,
    imbalance,
    instances,
    labelled,
    segments,
    targets,
    tokenizer,
)
from further_pt.data.prepare import preparation_lock
from further_pt.objectives import encoder, evaluation, kinds, layerwise, schedules
from further_pt.objectives.base import Run, Stream
from further_pt.objectives.heads import Classifier, HeadSpec, load_classifier
from further_pt.objectives.model_checks import check_head, check_special_tokens

logger = logging.getLogger("further_pt.objectives.classification")

RESUMABLE_KEYS = ("output_dir", "overwrite_output_dir", "train.log_every_steps",
                  "checkpoint.keep_last", "data.dataloader_workers", "data.cache_dir",
                  "eval.batch_size", "train.trackers", "train.stop_check_every_steps",
                  "train.collective_timeout_s", "train.compile")


@dataclass
class Task:
    name: str
    labels: list[str]
    train: Any  # tokenized datasets.Dataset
    eval: Any | None
    eval_file: str | None
    class_weights: list[float] | None = None  # by class id: the weighted cross-entropy's


def load_tasks(cfg: DictConfig, tokenizer: Any) -> tuple[list[Task], dict[str, Any]]:
    """Read, check, (subsample,) label and tokenize every task; and what was dropped or kept.

    Every text and label is checked when read (a bad row is an error naming file,
    row, column and value, or with ``data.invalid_rows=skip`` is dropped and
    counted). ``data.max_train_examples`` keeps a seeded, stratified subsample of
    each training file: the same rows for the same seed whatever the starting
    model, so variants are compared on identical data. Eval files are never
    subsampled. Labels are read as ``task.kind`` says (:func:`kinds.read`).
    ``train.class_weights`` (single-label) are computed on the training rows kept, logged and
    reported (``class_weights`` of each task's entry).
    """
    d, kind = cfg.data, cfg.task.kind
    specs = cfg.tasks or [{"name": "main", "train_file": d.train_file, "eval_file": d.eval_file,
                           "text_column": d.text_column, "label_column": d.label_column}]
    cache = str(Path(d.cache_dir).expanduser() / "datasets") if d.cache_dir else None
    tasks, report = [], {}
    for spec in specs:
        columns = [spec["text_column"], spec["label_column"]]
        texts = [spec["text_column"]]
        if d.text_pair_column:
            columns.insert(1, d.text_pair_column)
            texts.append(d.text_pair_column)
        read = partial(labelled.load_labelled, columns=columns, cache_dir=cache,
                       text_columns=texts, label_column=spec["label_column"],
                       invalid_rows=d.invalid_rows, label_role=targets.ROLES[kind])
        train, dropped = read(spec["train_file"])
        names, labels = kinds.read(train, spec["label_column"], spec["train_file"], kind)
        if len(specs) == 1:  # before tokenizing: a misspelt label fails in seconds
            imbalance.check_labels(cfg.train.class_weights, names, spec["train_file"])
        entry: dict[str, Any] = {"invalid_train_rows_skipped": dropped,
                                 "train_examples_available": len(labels)}
        if d.max_train_examples is not None:
            keep = kinds.sample(labels, d.max_train_examples, cfg.seed, kind=kind,
                                num_names=len(names), where=spec["train_file"])
            logger.info("%s: %s (seed %d)", spec["name"], kinds.describe(
                [labels[i] for i in keep], names, len(labels), kind), cfg.seed)
            train, labels = train.select(keep), [labels[i] for i in keep]
        entry["train_examples"] = len(labels)
        weights = imbalance.class_weights(cfg.train.class_weights, names, labels)
        if weights is not None:
            entry["class_weights"] = dict(zip(names, weights, strict=True))
            logger.info("%s: class weights (train.class_weights=%s): %s", spec["name"],
                        "balanced" if cfg.train.class_weights == "balanced" else "given",
                        imbalance.describe(weights, names))
        encode = partial(segments.tokenize, tokenizer=tokenizer,
                         text_column=spec["text_column"], text_pair_column=d.text_pair_column,
                         strategy=d.truncation, max_seq_length=d.max_seq_length,
                         head_tokens=head_tokens(d), max_segments=d.max_segments)
        evaluated = None
        if spec["eval_file"]:
            raw, entry["invalid_eval_rows_skipped"] = read(spec["eval_file"])
            eval_labels = kinds.read(raw, spec["label_column"], spec["eval_file"], kind,
                                     names)[1]
            evaluated = encode(raw, labels=eval_labels)
        tasks.append(Task(spec["name"], names, encode(train, labels=labels), evaluated,
                          spec["eval_file"], weights))
        report[spec["name"]] = entry
    if len(specs) > 1:  # a label of any task
        imbalance.check_labels(cfg.train.class_weights, {n for t in tasks for n in t.labels},
                               "the tasks' training data")
    return tasks, report


def head_tokens(data: DictConfig) -> int:
    """``data.head_tokens``, with ``auto`` = a quarter of the token budget (Sun et al.'s 128
    of 510, rounded), so changing ``max_seq_length`` alone keeps head+tail consistent."""
    if data.head_tokens == "auto":
        return round((data.max_seq_length - 2) / 4)
    return int(data.head_tokens)


def build_classifier(cfg: DictConfig, tasks: list[Task], source: str | Path) -> Classifier:
    """A sequence classifier from any encoder folder or hub id, with the recipe's head; its
    config's ``problem_type`` names the task kind (multi-label: a sigmoid per class)."""
    first, kind = tasks[0].labels, cfg.task.kind
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    if kinds.PROBLEM_TYPES[kind]:
        kwargs["problem_type"] = kinds.PROBLEM_TYPES[kind]
    hf = AutoModelForSequenceClassification.from_pretrained(
        str(source), num_labels=kinds.num_outputs(kind, first), id2label=dict(enumerate(first)),
        label2id={n: i for i, n in enumerate(first)}, **kwargs)
    h = cfg.head
    spec = HeadSpec(pooling=h.pooling, layers=list(h.layers), layer_combine=h.layer_combine,
                    segment_pooling=h.segment_pooling, dropout=h.dropout,
                    tasks={t.name: t.labels for t in tasks})
    return Classifier(hf, spec, hierarchical=cfg.data.truncation == "segments")


class Classification:
    """Fine-tuning for classification. ``Classification(cfg, resume_from)`` checks; ``build``."""

    name = "finetune"

    def __init__(self, cfg: DictConfig, resume_from: Path | None) -> None:
        """Read-only checks: the model's config and tokenizer exist and fit the data.

        ``resume_from`` is this process's own choice of checkpoint, made before the process
        group exists; :meth:`build` reads the model again if the main process chose another.
        """
        self.cfg = cfg
        self.kind = cfg.task.kind
        self.metric = kinds.resolve_metric(self.kind, cfg.eval.metric)
        # multi_label: each task's decision threshold, saved with the model; under
        # task.threshold=tune each evaluation sets it (the one chosen on dev)
        self.thresholds: dict[str, Any] = {}
        self.eval_every_steps = cfg.eval.every_steps  # None: the Trainer evaluates at epoch ends
        self.early_stopping_patience = cfg.train.early_stopping_patience  # None: off
        self._read_model(resume_from)
        # DDP's search for unused parameters costs a graph walk every step: only custom heads
        # need it (another pooling leaves the pooler unused, an earlier layer the ones above,
        # a multi-task step the other tasks' heads). The standard head uses every parameter.
        h = cfg.head
        self.find_unused_parameters = not (
            h.pooling == "cls" and list(h.layers) == [-1] and len(cfg.tasks or []) <= 1
            and cfg.data.truncation != "segments")
        self.unfreezing: layerwise.GradualUnfreezing | None = None

    def _read_model(self, resume_from: Path | None) -> None:
        """The config and tokenizer of ``resume_from`` (else the recipe's model), checked."""
        cfg, m = self.cfg, self.cfg.model
        self.resume_from = resume_from
        source = str(resume_from or m.name_or_path)
        self.model_config = encoder.load_config(source, trust_remote_code=m.trust_remote_code)
        self.tokenizer = tokenizer.load_tokenizer(str(resume_from or m.tokenizer or source),
                                                  trust_remote_code=m.trust_remote_code)
        encoder.check_compatible(self.model_config, self.tokenizer, cfg.data.max_seq_length,
                                 needs_mask=False)
        check_special_tokens(self.tokenizer, pairs=cfg.data.text_pair_column is not None)
        check_head(self.model_config, cfg.head, trust_remote_code=m.trust_remote_code)

    def build(self, trainer: Run) -> None:
        """Tasks -> (claim the output dir) -> streams -> classifier -> layer groups."""
        cfg, t = self.cfg, self.cfg.train
        if trainer.resume_from != self.resume_from:
            # This process saw another checkpoint (or none) than the main one, whose choice
            # every process resumes (Trainer.start): its config and tokenizer are the ones.
            self._read_model(trainer.resume_from)
        # A file lock, not a barrier (main_process_first): tokenizing a large task may outlast
        # train.collective_timeout_s. The first process fills the cache, the others load it.
        with preparation_lock(corpus.default_cache_dir(cfg.data.cache_dir), "the labelled data"):
            self.tasks, self.data_report = load_tasks(cfg, self.tokenizer)
        trainer.claim()
        self.device = trainer.accelerator.device
        self.class_weights = {task.name: torch.tensor(task.class_weights, device=self.device)
                              for task in self.tasks if task.class_weights is not None}
        # GPUs: lengths in multiples of 8 for the tensor cores
        self.collate = partial(segments.collate, pad_id=self.tokenizer.pad_token_id,
                               pad_to_multiple_of=8 if self.device.type == "cuda" else None)
        collate = self.collate
        self.streams = [Stream(task.name, task.train, collate, drop_last=False,
                               lengths=instances.lengths(task.train) if cfg.data.group_by_length
                               else None) for task in self.tasks]

        torch.manual_seed(cfg.seed)
        if self.resume_from is not None:
            extra = ({"attn_implementation": cfg.model.attn_implementation}
                     if cfg.model.attn_implementation else {})
            classifier = load_classifier(self.resume_from, **extra)
        else:
            classifier = build_classifier(cfg, self.tasks, cfg.model.name_or_path)
        if classifier.custom:  # the HF head is unused beside a custom one: keep it out of DDP
            base_ids = {id(p) for p in classifier.model.base_model.parameters()}
            for p in classifier.model.parameters():
                if id(p) not in base_ids:
                    p.requires_grad_(False)
        groups = layerwise.layer_groups(classifier, lr=t.lr, xi=t.layer_decay, head_lr=t.head_lr)
        if t.freeze_encoder:  # BERT-Feat: only the head learns
            for group in groups[:-1]:
                for _, p in group.params:
                    p.requires_grad_(False)
        self.groups = [layerwise.LayerGroup(g.name, [(n, p) for n, p in g.params
                                                     if p.requires_grad], g.lr) for g in groups]
        self.module = classifier

    # ------------------------------------------------------------------ the Trainer's interface

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.cfg.train.epochs * steps_per_epoch

    def optimizer_groups(self) -> list[dict[str, Any]]:
        return layerwise.optimizer_groups([g for g in self.groups if g.params],
                                          self.cfg.train.weight_decay)

    def schedule(self, optimizer: Any, *, total_steps: int, steps_per_epoch: int) -> Any:
        """The lr schedule; and, under gradual unfreezing, which groups train when."""
        t = self.cfg.train
        if t.unfreeze != "none":
            every = steps_per_epoch if t.unfreeze == "epoch" else t.unfreeze_every_steps
            self.unfreezing = layerwise.GradualUnfreezing(self.groups, every)
        return schedules.build(t.schedule, optimizer, total_steps=total_steps,
                               warmup_steps=round(t.warmup_ratio * total_steps),
                               cut_frac=t.stlr_cut_frac, ratio=t.stlr_ratio)

    def loss(self, module: Any, batch: dict[str, torch.Tensor], *, stream: str, step: int,
             micro: int) -> tuple[torch.Tensor, dict[str, tuple[Any, Any]]]:
        labels = batch.pop("labels")
        return kinds.loss(self.kind, module(**batch, task=stream).float(), labels,
                          weight=self.class_weights.get(stream))

    def before_optimizer_step(self, step: int) -> None:
        if self.unfreezing is not None:
            self.unfreezing.drop_frozen_grads(step)

    def evaluate(self, classifier: Any, shard: Any = None) -> dict[str, Any]:
        """Every task's dev metrics (``eval_*``); with several tasks, their means too.

        With a ``shard`` (:class:`~further_pt.objectives.base.EvalShard`) this process predicts its
        slice of each dev set and the slices are gathered in order before the metrics.
        """
        results: dict[str, Any] = {}
        for task in self.tasks:
            if task.eval is None:
                continue
            data = task.eval if shard is None else task.eval.select(shard.span(len(task.eval)))
            loader = DataLoader(data, batch_size=self.cfg.eval.batch_size, collate_fn=self.collate)
            scores, refs = evaluation.predict(classifier, loader, self.device, task.name,
                                              self.kind)
            if shard is not None:
                scores, refs = shard.gather(scores), shard.gather(refs)
            prefix = "eval_" if len(self.tasks) == 1 else f"eval_{task.name}_"
            results.update(evaluation.compute(self.kind, scores, refs, task.labels, prefix,
                                              threshold=self.cfg.task.threshold,
                                              metric=self.metric))
            if self.kind == "multi_label":  # what the model saved after this evaluation uses
                self.thresholds[task.name] = results[f"{prefix}threshold"]
        if len(self.tasks) > 1 and results:
            for key in kinds.METRICS[self.kind]:
                values = [results[f"eval_{t.name}_{key}"] for t in self.tasks
                          if t.eval is not None]
                results[f"eval_{key}"] = sum(values) / len(values)
        return results

    def card(self) -> dict[str, Any]:
        """What the model card says of this objective (see :mod:`further_pt.train.model_card`)."""
        cfg, t = self.cfg, self.cfg.train
        data = [f"- task `{task.name}`: {len(task.train):,} training examples, "
                f"{len(task.labels)} labels ({', '.join(task.labels[:12])}"
                f"{', ...' if len(task.labels) > 12 else ''})" for task in self.tasks]
        if self.kind == "regression":
            data = [f"- task `{task.name}`: {len(task.train):,} training examples, target "
                    f"`{task.labels[0]}`" for task in self.tasks]
        what = {"single_label": "text classification", "regression": "text regression",
                "multi_label": "multi-label text classification"}[self.kind]
        dev = [task.eval_file for task in self.tasks if task.eval_file]
        prefix = "" if len(self.tasks) == 1 else "mean over tasks: "
        return {
            "pipeline_tag": "text-classification",
            "tags": ["text-classification"],
            "title": f"`{cfg.model.name_or_path}` fine-tuned for {what}.",
            "summary": [f"- head: {cfg.head.pooling} pooling, layers {list(cfg.head.layers)}; "
                        f"truncation {cfg.data.truncation} at {cfg.data.max_seq_length} tokens",
                        f"- {t.epochs} epochs, layer-wise lr decay {t.layer_decay:g}, "
                        f"unfreezing {t.unfreeze}"
                        + (f", class weights {t.class_weights}" if t.class_weights else "")],
            "data": data,
            "eval_dataset": ", ".join(dev) or "no dev set",
            "metrics": {f"eval_{k}": (k, prefix + k.replace("_", " "))
                        for k in kinds.METRICS[self.kind]},
            "schedule": f", {t.schedule} schedule",
        }

    def better(self, new: float, best: float | None) -> bool:
        return evaluation.is_better(self.metric, new, best)

    def export(self, classifier: Any, folder: Path) -> None:
        """The classifier's HF folder plus the preprocessing that predict mode must repeat."""
        classifier.save(folder, self.tokenizer)
        resolved = OmegaConf.to_container(self.cfg.data, resolve=True)
        preprocessing = {k: resolved[k] for k in evaluation.PREPROCESSING_KEYS}
        preprocessing["head_tokens"] = head_tokens(self.cfg.data)  # auto, resolved
        d = self.cfg.data  # each task's columns: predict reads every task of a multi-task model
        preprocessing["tasks"] = {str(s["name"]): {"text_column": str(s["text_column"]),
                                                   "label_column": str(s["label_column"])}
                                  for s in self.cfg.tasks or [{"name": "main", "text_column":
                                  d.text_column, "label_column": d.label_column}]}
        preprocessing["task_kind"] = self.kind
        if self.kind == "multi_label":  # tune: the last evaluation's (this model's) threshold
            given = self.cfg.task.threshold  # tune before any evaluation: 0.5 meanwhile
            found = {t.name: self.thresholds.get(t.name, 0.5 if given == "tune" else given)
                     for t in self.tasks}
            preprocessing["threshold"] = found[self.tasks[0].name]  # predict's (first) task
            preprocessing["thresholds"] = found
        (folder / evaluation.PREPROCESSING).write_text(json.dumps(preprocessing, indent=1))

    def summary(self) -> dict[str, Any]:
        """What was read: rows skipped as invalid, examples available and used, per task."""
        return {"data": self.data_report if len(self.tasks) > 1 else self.data_report["main"]}

    def flops_per_token(self) -> float | None:
        """The encoder's training FLOPs per token at the recipe's sequence length.

        BERT-Feat's frozen encoder only runs forward: a third of that. (Under gradual
        unfreezing the frozen layers still run backward for the ones above them: counted
        as training.)
        """
        flops = encoder.encoder_flops_per_token(self.module.model.config,
                                                self.cfg.data.max_seq_length)
        return flops / 3 if self.cfg.train.freeze_encoder else flops
