"""Heads: how an encoder's hidden states become class scores.

``pooling: cls`` with the last layer and one segment is the standard Hugging
Face head (``AutoModelForSequenceClassification``: BERT's pooler, RoBERTa's
classification head): the saved model is a plain HF folder that the Auto class
and a ``text-classification`` pipeline load. Every other choice is a custom
head on top of ``base_model``'s hidden states:

- pooling (per sequence): ``pooler`` (the encoder's pooler output), ``cls_raw``
  (the first token's hidden state), ``mean`` / ``max`` over real tokens, and
  ULMFiT's ``concat`` = [first token ; mean ; max];
- layer selection (Sun et al. Table 3): ``layers`` lists hidden layers
  (``-1`` last, ``0`` the embeddings output), combined by ``concat``/``mean``/``max``;
- hierarchical long text (Sun et al. Table 2): each of k segments is encoded
  and pooled, then the segment vectors are combined by ``mean``, ``max`` or a
  learned self-attention pooling (a scored softmax over the segments),
  ignoring padding segments;
- multi-task: one linear classifier per task on the shared pooled vector.

A custom head is saved beside the HF folder as ``head.safetensors`` and
``head_config.json``; :func:`load_classifier` rebuilds the whole model. The HF folder
itself never predicts with an untrained head: it holds the custom head when its own can
compute it exactly, else the standard loaders refuse it (:mod:`.standard_folder`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification

from further_pt.objectives import standard_folder

HEAD_CONFIG = "head_config.json"
HEAD_WEIGHTS = "head.safetensors"


@dataclass
class HeadSpec:
    """The ``head`` section of a recipe, plus the label names of each task."""

    pooling: str
    layers: list[int]
    layer_combine: str
    segment_pooling: str
    dropout: float
    tasks: dict[str, list[str]]  # task -> label names

    @property
    def standard(self) -> bool:
        return self.pooling == "cls" and list(self.layers) == [-1] and len(self.tasks) <= 1


class Classifier(nn.Module):
    """A HF sequence-classification model, plus a custom head when the spec asks for one."""

    def __init__(self, model: nn.Module, spec: HeadSpec, *, hierarchical: bool = False) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.hierarchical = hierarchical
        self.custom = not spec.standard or hierarchical
        if self.custom:
            hidden = model.config.hidden_size
            n_layers = len(spec.layers) if spec.layer_combine == "concat" else 1
            width = hidden * n_layers * (3 if spec.pooling == "concat" else 1)
            self.dropout = nn.Dropout(spec.dropout)
            self.heads = nn.ModuleDict({task: nn.Linear(width, len(names))
                                        for task, names in spec.tasks.items()})
            if hierarchical and spec.segment_pooling == "attention":
                self.segment_score = nn.Linear(width, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                segment_mask: torch.Tensor | None = None, task: str | None = None
                ) -> torch.Tensor:
        if not self.custom:
            return self.model(**self._inputs(input_ids, attention_mask, token_type_ids)).logits
        vector = self.vector(input_ids, attention_mask, token_type_ids, segment_mask)
        head = self.heads[task] if task is not None else next(iter(self.heads.values()))
        return head(self.dropout(vector))

    def logits_by_task(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       token_type_ids: torch.Tensor | None = None,
                       segment_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every task's logits from one pass of the encoder (predicting with a multi-task
        model: ``forward`` per task would run the encoder once per task)."""
        if not self.custom:
            return {next(iter(self.spec.tasks)): self.forward(input_ids, attention_mask,
                                                               token_type_ids)}
        vector = self.dropout(self.vector(input_ids, attention_mask, token_type_ids,
                                          segment_mask))
        return {task: head(vector) for task, head in self.heads.items()}

    def _inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                token_type_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        # attention_mask None: a batch without padding; the model then builds no mask (and
        # reads nothing back from the device to decide whether it may skip one)
        inputs = {"input_ids": input_ids}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        if token_type_ids is not None and getattr(self.model.config, "type_vocab_size", 0) > 1:
            inputs["token_type_ids"] = token_type_ids
        return inputs

    def vector(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               token_type_ids: torch.Tensor | None, segment_mask: torch.Tensor | None
               ) -> torch.Tensor:
        """The pooled vector a custom head classifies (segments pooled too)."""
        inputs = self._inputs(input_ids, attention_mask, token_type_ids)
        if self.hierarchical:  # (B, S, L) -> (B*S, L)
            batch, n_seg = input_ids.shape[:2]
            inputs = {k: v.reshape(batch * n_seg, -1) for k, v in inputs.items()}
        vector = self.pool(inputs)
        if self.hierarchical:
            vector = self.pool_segments(vector.reshape(batch, n_seg, -1), segment_mask)
        return vector

    def pool(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        spec = self.spec
        need_all = list(spec.layers) != [-1]
        out = self.model.base_model(**inputs, output_hidden_states=need_all)
        if spec.pooling == "pooler":
            return out.pooler_output
        states = [out.hidden_states[i] for i in spec.layers] if need_all else [
            out.last_hidden_state]
        given = inputs.get("attention_mask")
        mask = (torch.ones_like(inputs["input_ids"]) if given is None else given
                ).unsqueeze(-1).to(states[0].dtype)
        pooled = [_pool_tokens(h, mask, spec.pooling) for h in states]
        if len(pooled) == 1:
            return pooled[0]
        if spec.layer_combine == "concat":
            return torch.cat(pooled, dim=-1)
        stacked = torch.stack(pooled)
        return stacked.mean(0) if spec.layer_combine == "mean" else stacked.max(0).values

    def pool_segments(self, vectors: torch.Tensor, segment_mask: torch.Tensor | None
                      ) -> torch.Tensor:
        """(B, S, D) segment vectors -> (B, D), padding segments ignored."""
        if segment_mask is None:
            segment_mask = torch.ones(vectors.shape[:2], dtype=torch.bool, device=vectors.device)
        how = self.spec.segment_pooling
        if how == "max":
            return vectors.masked_fill(~segment_mask.unsqueeze(-1), float("-inf")).max(1).values
        if how == "attention":
            scores = self.segment_score(vectors).squeeze(-1)
            weights = scores.masked_fill(~segment_mask, float("-inf")).softmax(dim=1)
            return (weights.unsqueeze(-1) * vectors).sum(1)
        m = segment_mask.unsqueeze(-1).to(vectors.dtype)
        return (vectors * m).sum(1) / m.sum(1).clamp(min=1)

    def save(self, folder: Path, tokenizer: Any) -> None:
        """A HF folder; a custom head adds head.safetensors and head_config.json, and is
        either carried into the HF head (exactly) or makes the standard loaders refuse."""
        standard = standard_folder.standard_state(self) if self.custom else None
        self.model.save_pretrained(folder, state_dict=standard)
        tokenizer.save_pretrained(folder)
        if self.custom and standard is None:
            standard_folder.refuse_standard_loaders(folder)
        if self.custom:
            from safetensors.torch import save_file

            state = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                     if not k.startswith("model.")}
            save_file(state, str(folder / HEAD_WEIGHTS))
            (folder / HEAD_CONFIG).write_text(json.dumps(
                {**asdict(self.spec), "hierarchical": self.hierarchical}, indent=1))


def _pool_tokens(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    first = hidden[:, 0]
    if how in ("cls", "cls_raw"):
        return first
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    if how == "mean":
        return mean
    largest = hidden.masked_fill(mask == 0, float("-inf")).max(1).values
    if how == "max":
        return largest
    return torch.cat([first, mean, largest], dim=-1)  # concat (ULMFiT)


def load_classifier(folder: str | Path, **kwargs: Any) -> Classifier:
    """Load a fine-tuned model saved by further_pt, custom head included."""

    folder = Path(folder)
    if standard_folder.refused(folder) and "config" not in kwargs:
        kwargs["config"] = standard_folder.loadable_config(
            folder, trust_remote_code=kwargs.get("trust_remote_code", False))
    model = AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)
    config_path = folder / HEAD_CONFIG
    if not config_path.is_file():
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        spec = HeadSpec(pooling="cls", layers=[-1], layer_combine="concat",
                        segment_pooling="mean", dropout=0.0, tasks={"main": names})
        return Classifier(model, spec)
    raw = json.loads(config_path.read_text())
    hierarchical = raw.pop("hierarchical")
    classifier = Classifier(model, HeadSpec(**raw), hierarchical=hierarchical)
    missing, unexpected = classifier.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)),
                                                     strict=False)
    if unexpected or any(not k.startswith("model.") for k in missing):
        raise ValueError(f"{folder}: head weights do not match head_config.json")
    return classifier
