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


@torch.no_grad()
def predict(classifier: torch.nn.Module, loader: DataLoader, device: torch.device,
            task: str | None = None) -> tuple[list[int], list[int], list[list[float]]]:
    """(predicted ids, reference ids, probabilities) over ``loader``, in order."""
    was_training = classifier.training
    classifier.eval()
    preds, refs, probs = [], [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = classifier(**batch, task=task).float()
        p = logits.softmax(-1)
        preds += p.argmax(-1).tolist()
        probs += p.tolist()
        refs += labels.tolist()
    classifier.train(was_training)
    return preds, refs, probs


def is_better(metric: str, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return new < best if metric == "error_rate" else new > best


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
