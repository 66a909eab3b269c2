"""Evaluation: predictions over a dev set and the metrics of a classifier (files of texts:
:mod:`.prediction`).

Metrics are computed with the ``evaluate`` library from metric modules shipped
in ``further_pt/metric_modules`` and loaded by local path, so they work offline
and give online and offline users the same numbers (``evaluate.load("accuracy")``
fetches its script from the hub). ``evaluate`` is imported lazily: it costs
seconds.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForMaskedLM

from further_pt.data import instances
from further_pt.data.instances import pack_documents
from further_pt.data.masking import mask_tokens, special_ids_tensor
from further_pt.data.tokenizer import load_tokenizer
from further_pt.objectives import kinds, scoring

MODULES = Path(__file__).resolve().parent / "metric_modules"
PREPROCESSING = "preprocessing.json"  # how the model's training text was cut: predict does the same
PREPROCESSING_KEYS = ("text_column", "text_pair_column", "label_column", "max_seq_length",
                      "truncation", "head_tokens", "max_segments")


@cache
def _metric(name: str) -> Any:
    import evaluate

    return evaluate.load(str(MODULES / f"{name}.py"))


def compute_metrics(predictions: list[int], references: list[int], label_names: list[str],
                    prefix: str = "eval_") -> dict[str, Any]:
    """Accuracy, error rate, macro-F1, per-class F1 and the confusion matrix."""
    ids = list(range(len(label_names)))
    accuracy = _metric("accuracy").compute(predictions=predictions,
                                           references=references)["accuracy"]
    per_class = _metric("f1").compute(predictions=predictions, references=references,
                                      labels=ids, average=None)["f1"]
    matrix = _metric("confusion_matrix").compute(predictions=predictions, references=references,
                                                 labels=ids)["confusion_matrix"]
    return {
        f"{prefix}accuracy": accuracy,
        f"{prefix}error_rate": 1.0 - accuracy,
        f"{prefix}macro_f1": sum(per_class) / len(per_class),
        f"{prefix}per_class_f1": dict(zip(label_names, per_class, strict=True)),
        f"{prefix}confusion_matrix": matrix,
        f"{prefix}examples": len(references),
    }


def compute(kind: str, scores: list[Any], references: list[Any], names: list[str],
            prefix: str = "eval_", *, threshold: float | str = 0.5,
            metric: str = "micro_f1") -> dict[str, Any]:
    """The dev metrics of a task kind from :func:`predict`'s scores (as lists): single-label's
    :func:`compute_metrics` of the most probable classes, else :mod:`.scoring`'s."""
    if kind == "single_label":
        preds = [max(range(len(row)), key=row.__getitem__) for row in scores]
        return compute_metrics(preds, references, names, prefix)
    if kind == "multi_label":
        return scoring.multi_label(scores, references, names, prefix=prefix,
                                   threshold=threshold, metric=metric)
    return scoring.regression(scores, references, prefix=prefix)


@torch.no_grad()
def predict(classifier: torch.nn.Module, loader: DataLoader, device: torch.device,
            task: str | None = None, kind: str = "single_label"
            ) -> tuple[list[Any], list[Any]]:
    """(scores, references) over ``loader``, in order, as lists: class probabilities
    (:func:`kinds.scores`: softmax, or a sigmoid per class) or predicted values."""
    was_training = classifier.training
    classifier.eval()
    scores, refs = [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        refs.append(batch.pop("labels").cpu())
        scores.append(kinds.scores(kind, classifier(**batch, task=task)).cpu())
    classifier.train(was_training)
    if not scores:
        return [], []
    return torch.cat(scores).tolist(), torch.cat(refs).tolist()


#: Metrics for which lower is better (the best epoch, sweeps).
LOWER_IS_BETTER = ("error_rate", "mse", "mae", "hamming_loss")


def is_better(metric: str, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return new < best if metric in LOWER_IS_BETTER else new > best


def task_kind(preprocessing: dict[str, Any], config: dict[str, Any]) -> str:
    """The ``task.kind`` a folder was trained for: preprocessing.json's, else config.json's
    ``problem_type`` (a folder from before task kinds, or another tool's), else single-label."""
    if preprocessing.get("task_kind"):
        return preprocessing["task_kind"]
    by_type = {v: k for k, v in kinds.PROBLEM_TYPES.items() if v}
    return by_type.get(config.get("problem_type"), "single_label")


@torch.no_grad()
def mlm_loss(model_dir: str | Path, texts: list[str], *, max_seq_length: int, seed: int,
             batch_size: int = 16) -> float | None:
    """Mean MLM loss of a pretrained encoder on ``texts`` (packed blocks, fixed masks).

    The forgetting measure of the experiment report: the same texts, blocks and
    masks for every model (given the same tokenizer), so the losses compare. None
    when the folder holds no MLM head (a sentence-transformers base, an encoder
    saved without its pretraining heads): its loss would score a randomly
    initialised head, not what the encoder knows.
    """
    tokenizer = load_tokenizer(str(model_dir))
    model, info = AutoModelForMaskedLM.from_pretrained(str(model_dir), output_loading_info=True)
    model.eval()
    prefix = f"{model.base_model_prefix}."
    if any(not k.startswith(prefix) for k in info.get("missing_keys") or []):
        return None
    ids = instances.encode_plain(tokenizer, texts)
    blocks = pack_documents([x for x in ids if x], max_seq_length=max_seq_length,
                            cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id)
    gen = torch.Generator().manual_seed(seed)
    special = special_ids_tensor(tokenizer)
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        chunk = blocks[i:i + batch_size]
        longest = max(len(b) for b in chunk)
        input_ids = torch.full((len(chunk), longest), tokenizer.pad_token_id)
        attention = torch.zeros_like(input_ids)
        for j, b in enumerate(chunk):
            input_ids[j, :len(b)] = torch.tensor(b)
            attention[j, :len(b)] = 1
        masked, labels = mask_tokens(input_ids, attention, special_ids=special,
                                     mask_token_id=tokenizer.mask_token_id,
                                     vocab_size=len(tokenizer), masked_lm_prob=0.15,
                                     max_predictions=max_seq_length, generator=gen)
        logits = model(input_ids=masked, attention_mask=attention).logits
        chosen = labels != -100
        total += torch.nn.functional.cross_entropy(logits[chosen], labels[chosen],
                                                   reduction="sum").item()
        count += int(chosen.sum())
    return total / max(count, 1)


def pad_rows(rows: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack masked rows into a batch as training collates them, the labels padded with -100."""
    batch = instances.collate(rows, pad_id=pad_id)
    labels = torch.full_like(batch["input_ids"], -100)
    for i, r in enumerate(rows):
        labels[i, :len(r["labels"])] = r["labels"]
    return {**batch, "labels": labels}


def heldout_loss(module: Any, rows: list[dict[str, torch.Tensor]], *, batch_size: int,
                 pad_id: int, shard: Any = None) -> dict[str, float]:
    """Held-out MLM loss (mean cross-entropy over the masked positions) and perplexity.

    ``module`` is a pretraining module (:class:`~further_pt.objectives.mlm_loss.
    PretrainingObjective`), ``rows`` the held-out sequences with their fixed masks
    (:func:`further_pt.data.prepare.evaluation_rows`). With a ``shard`` each process scores its
    slice and the (sum, count) pairs are gathered, so the figure is that of the whole set,
    whatever the number of processes. In eval mode (no dropout) and fp32; the training mode
    is restored after.
    """
    mine = rows if shard is None else [rows[i] for i in shard.span(len(rows))]
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    with torch.no_grad():
        for i in range(0, len(mine), batch_size):
            batch = {k: v.to(device) for k, v in pad_rows(mine[i:i + batch_size], pad_id).items()}
            losses = module(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                            batch["labels"], batch.get("next_sentence_label"))
            n = (batch["labels"] != -100).sum()
            total += losses.mlm.double() * n
            count += n
    module.train(was_training)
    pairs = [(float(total), int(count))]  # one read of the device per evaluation
    if shard is not None:
        pairs = shard.gather(pairs)
    loss_sum, tokens = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    loss = loss_sum / max(tokens, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(loss), "eval_masked_tokens": tokens}
