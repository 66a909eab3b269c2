"""Objective: the MLM (+ NSP) losses of a pretraining model, with a sparse MLM head.

The Hugging Face pretraining models run the MLM head (a hidden->hidden
transform and a hidden->vocabulary projection) at *every* position, although
only the ~15% masked positions carry a label. The head works position by
position, so running it on the masked positions alone gives the same logits
there and the same loss, at a fraction of the cost: for BERT-base at 128
tokens, with 20 predictions, the vocabulary projection shrinks ~6x.

:class:`PretrainingObjective` wraps the HF model (so the wrapper is what DDP
sees and gradients still synchronise) and returns the losses. It uses the
sparse path when :data:`SPARSE_LAYOUTS` knows the model class - where its
encoder is and which modules map hidden states to logits, read off each class's
``forward`` in transformers v5 - and the model's own full forward pass otherwise
(``sparse=False`` forces it). Classes are named exactly rather than detected by
attribute, so a look-alike with another head signature falls back to the dense
path instead of computing something else. Saved weights are the HF model's own,
untouched layout.

Shapes are static, as in NVIDIA's BERT: each row contributes ``max_predictions``
positions (:func:`masked_positions`: its labelled positions first, then unlabelled
fillers whose label is -100), gathered rather than picked with a boolean mask. A
boolean index has a data-dependent shape: it waits for the GPU to count the mask and
breaks ``torch.compile`` graphs and CUDA graphs. The loss (a mean over the labelled
positions) is unchanged.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Head = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Losses:
    total: torch.Tensor
    mlm: torch.Tensor
    nsp: torch.Tensor | None = None
    nsp_correct: torch.Tensor | None = None


def _bert(m: Any) -> tuple[nn.Module, Head]:
    return m.bert, m.cls.predictions  # transform -> decoder


def _roberta(m: Any) -> tuple[nn.Module, Head]:
    return m.roberta, m.lm_head  # dense -> gelu -> layer_norm -> decoder


def _distilbert_head(m: Any, h: torch.Tensor) -> torch.Tensor:
    return m.vocab_projector(m.vocab_layer_norm(m.activation(m.vocab_transform(h))))


def _distilbert(m: Any) -> tuple[nn.Module, Head]:
    return m.distilbert, partial(_distilbert_head, m)


def _electra_head(m: Any, h: torch.Tensor) -> torch.Tensor:
    return m.generator_lm_head(m.generator_predictions(h))


def _electra(m: Any) -> tuple[nn.Module, Head]:  # the generator
    return m.electra, partial(_electra_head, m)


def _deberta_v2_head(m: Any, h: torch.Tensor) -> torch.Tensor:
    # lm_predictions projects onto the (tied) input embeddings, passed at call time
    return m.lm_predictions(h, m.deberta.embeddings.word_embeddings)


def _deberta_v2(m: Any) -> tuple[nn.Module, Head]:
    if m.legacy:  # the default: cls.predictions, transform -> decoder
        return m.deberta, m.cls
    return m.deberta, partial(_deberta_v2_head, m)


def _modernbert_head(m: Any, h: torch.Tensor) -> torch.Tensor:
    return m.decoder(m.head(h))


def _modernbert(m: Any) -> tuple[nn.Module, Head]:
    # transformers v5 ModernBERT runs padded (no unpadding inside the model), so the
    # hidden state at each real position is the one its own forward feeds the head.
    return m.model, partial(_modernbert_head, m)


#: HF class name -> (encoder, head) of a model of that class. Each head maps hidden states
#: of shape (N, hidden) to logits (N, vocab), as the class's own forward does.
SPARSE_LAYOUTS: dict[str, Callable[[Any], tuple[nn.Module, Head]]] = {
    "BertForPreTraining": _bert,
    "BertForMaskedLM": _bert,
    "RobertaForMaskedLM": _roberta,
    "XLMRobertaForMaskedLM": _roberta,
    "CamembertForMaskedLM": _roberta,
    "DistilBertForMaskedLM": _distilbert,
    "ElectraForMaskedLM": _electra,
    "DebertaV2ForMaskedLM": _deberta_v2,
    "ModernBertForMaskedLM": _modernbert,
}


def sparse_layout(model: nn.Module) -> tuple[nn.Module, Head] | None:
    """``(encoder, head)`` for the sparse path, or None where the class is not in the table."""
    layout = SPARSE_LAYOUTS.get(type(model).__name__)
    return layout(model) if layout is not None else None


def _takes_token_types(model: nn.Module) -> bool:
    """Token types only where the model has several and its forward accepts them.

    DistilBERT and ModernBERT have none; RoBERTa and DeBERTa-v2 keep one (or zero) types, so
    passing all-zero ids would change nothing but the embedding lookup's cost.
    """
    if getattr(model.config, "type_vocab_size", 0) <= 1:
        return False
    return "token_type_ids" in inspect.signature(model.forward).parameters


def _nsp_head(model: nn.Module) -> nn.Module | None:
    cls = getattr(model, "cls", None)
    return getattr(cls, "seq_relationship", None) if cls is not None else None


def masked_positions(labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions, labels)``, both ``(batch, k)``: each row's labelled positions in order,
    padded with unlabelled positions (label -100). Rows must hold at most ``k`` labels
    (masking chooses at most ``objective.max_predictions_per_seq``). No host sync."""
    k = min(k, labels.shape[1])
    unlabelled = (labels == -100).to(torch.int32)
    positions = torch.argsort(unlabelled, dim=1, stable=True)[:, :k]
    return positions, labels.gather(1, positions)


def _gather_rows(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``values[b, positions[b, j]]`` for ``values`` of shape (batch, seq, width)."""
    return values.gather(1, positions.unsqueeze(-1).expand(-1, -1, values.shape[-1]))


class PretrainingObjective(nn.Module):
    """``forward(batch, labels)`` -> :class:`Losses`; ``self.model`` is the HF model to save."""

    def __init__(self, model: nn.Module, *, nsp: bool, max_predictions: int,
                 sparse: bool = True) -> None:
        super().__init__()
        self.model = model
        self.nsp = nsp
        self.max_predictions = max_predictions
        layout = sparse_layout(model) if sparse else None
        # A tuple is a plain attribute, not a submodule: parameters stay named `model.*` only.
        self._layout = layout
        self.nsp_head = _nsp_head(model) if nsp else None
        self.sparse = layout is not None and (not nsp or self.nsp_head is not None)
        self.token_types = _takes_token_types(model)
        # Head warm-up: the encoder runs without building a graph; only the heads learn.
        self.encoder_frozen = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                token_type_ids: torch.Tensor | None, labels: torch.Tensor,
                next_sentence_label: torch.Tensor | None = None) -> Losses:
        # attention_mask None: no padding (packed blocks); the model then builds no mask
        inputs = {"input_ids": input_ids}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        if self.token_types and token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        positions, targets = masked_positions(labels, self.max_predictions)
        if self.sparse:
            assert self._layout is not None
            encoder, head = self._layout
            with torch.no_grad() if self.encoder_frozen else contextlib.nullcontext():
                out = encoder(**inputs)
            picked = _gather_rows(out.last_hidden_state, positions)  # (batch, k, hidden)
            mlm_logits = head(picked.reshape(-1, picked.shape[-1]))
            nsp_logits = self.nsp_head(out.pooler_output) if self.nsp else None
        else:
            out = self.model(**inputs)
            logits = out.prediction_logits if self.nsp else out.logits
            mlm_logits = _gather_rows(logits, positions).reshape(-1, logits.shape[-1])
            nsp_logits = out.seq_relationship_logits if self.nsp else None
        mlm = F.cross_entropy(mlm_logits.float(), targets.reshape(-1), ignore_index=-100)
        if not self.nsp:
            return Losses(total=mlm, mlm=mlm)
        assert nsp_logits is not None and next_sentence_label is not None
        nsp = F.cross_entropy(nsp_logits.float(), next_sentence_label)
        correct = (nsp_logits.argmax(-1) == next_sentence_label).sum()
        return Losses(total=mlm + nsp, mlm=mlm, nsp=nsp, nsp_correct=correct)


def unwrap(objective: Any, accelerator: Any) -> Any:
    """The HF model inside a (possibly DDP-wrapped) objective."""
    return accelerator.unwrap_model(objective).model
