"""Objective: the MLM (+ NSP) losses of a pretraining model, with a sparse MLM head.

The Hugging Face pretraining models run the MLM head (a hidden->hidden
transform and a hidden->vocabulary projection) at *every* position, although
only the ~15% masked positions carry a label. The head works position by
position, so running it on the masked positions alone gives the same logits
there and the same loss, at a fraction of the cost: for BERT-base at 128
tokens, with 20 predictions, the vocabulary projection shrinks ~6x.

:class:`PretrainingObjective` wraps the HF model (so the wrapper is what DDP
sees and gradients still synchronise) and returns the losses. It uses the
sparse path when it knows where the model keeps its encoder and MLM head
(BERT-, RoBERTa- and similar models) and the model's own full forward pass
otherwise; ``sparse=False`` forces the dense path. Saved weights are the HF
model's own, untouched layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Losses:
    total: torch.Tensor
    mlm: torch.Tensor
    nsp: torch.Tensor | None = None
    nsp_correct: torch.Tensor | None = None


def _mlm_head(model: nn.Module) -> nn.Module | None:
    cls = getattr(model, "cls", None)
    if cls is not None and hasattr(cls, "predictions"):  # BERT family
        return cls.predictions
    lm_head = getattr(model, "lm_head", None)  # RoBERTa family
    if isinstance(lm_head, nn.Module):
        return lm_head
    return None


def _nsp_head(model: nn.Module) -> nn.Module | None:
    cls = getattr(model, "cls", None)
    return getattr(cls, "seq_relationship", None) if cls is not None else None


class PretrainingObjective(nn.Module):
    """``forward(batch, labels)`` -> :class:`Losses`; ``self.model`` is the HF model to save."""

    def __init__(self, model: nn.Module, *, nsp: bool, sparse: bool = True) -> None:
        super().__init__()
        self.model = model
        self.nsp = nsp
        self.mlm_head = _mlm_head(model) if sparse else None
        self.nsp_head = _nsp_head(model) if nsp else None
        self.sparse = self.mlm_head is not None and (not nsp or self.nsp_head is not None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor, labels: torch.Tensor,
                next_sentence_label: torch.Tensor | None = None) -> Losses:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if getattr(self.model.config, "type_vocab_size", 0) > 1:
            inputs["token_type_ids"] = token_type_ids
        chosen = labels != -100
        if self.sparse:
            out = self.model.base_model(**inputs)
            mlm_logits = self.mlm_head(out.last_hidden_state[chosen])
            nsp_logits = self.nsp_head(out.pooler_output) if self.nsp else None
        else:
            out = self.model(**inputs)
            logits = out.prediction_logits if self.nsp else out.logits
            mlm_logits = logits[chosen]
            nsp_logits = out.seq_relationship_logits if self.nsp else None
        mlm = F.cross_entropy(mlm_logits.float(), labels[chosen])
        if not self.nsp:
            return Losses(total=mlm, mlm=mlm)
        assert nsp_logits is not None and next_sentence_label is not None
        nsp = F.cross_entropy(nsp_logits.float(), next_sentence_label)
        correct = (nsp_logits.argmax(-1) == next_sentence_label).sum()
        return Losses(total=mlm + nsp, mlm=mlm, nsp=nsp, nsp_correct=correct)


def unwrap(objective: Any, accelerator: Any) -> Any:
    """The HF model inside a (possibly DDP-wrapped) objective."""
    return accelerator.unwrap_model(objective).model
