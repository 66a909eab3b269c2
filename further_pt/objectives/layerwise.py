"""Layerwise: per-layer learning rates (Sun et al. 2019 sec. 5.3.3) and gradual unfreezing (ULMFiT).

A classifier splits into *layer groups*, bottom to top: the embeddings, each
encoder layer, and the head (everything outside the encoder: classifier,
pooling heads). With base lr ``lr`` and decay ``xi``, the top encoder layer
gets ``lr``, layer ``l`` of ``L`` gets ``lr * xi**(L - l)``, the embeddings
``lr * xi**L``, and the head its own ``head_lr``. ``xi = 1`` is plain
fine-tuning; ULMFiT's discriminative rate is ``xi = 1/2.6``.

The groups are found generically for any encoder the Auto* classes load: the
embeddings are ``base_model.embeddings`` and the layers the longest
``ModuleList`` of identical blocks inside the encoder (BERT, RoBERTa,
ELECTRA, DeBERTa-v2/v3: ``encoder.layer``; DistilBERT: ``transformer.layer``).
Encoder parameters outside both (a pooler, DeBERTa's relative embeddings and
final LayerNorm) join the nearest group: a pooler the top layer, the rest the
embeddings. An architecture with no such list is a clear error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class UnsupportedArchitecture(ValueError):
    """The encoder's embeddings or layer list cannot be found."""


@dataclass
class LayerGroup:
    name: str  # "embeddings", "layer_0", ..., "head"
    params: list[tuple[str, nn.Parameter]]
    lr: float


def _layer_list(encoder: nn.Module) -> tuple[str, nn.ModuleList]:
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in encoder.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            same = len({type(m) for m in module}) == 1
            if same and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise UnsupportedArchitecture(
            f"cannot find the layer list of {type(encoder).__name__}: layer-wise learning rates "
            "and gradual unfreezing need an encoder with a ModuleList of layers")
    return best


def layer_groups(model: nn.Module, *, lr: float, xi: float, head_lr: float) -> list[LayerGroup]:
    """Split ``model`` (a HF model with ``base_model``, plus any head modules) into layer groups.

    Returns groups bottom to top: embeddings, layer_0 .. layer_{L-1}, head. Every
    trainable parameter is in exactly one group.
    """
    base = getattr(model, "base_model", None)
    inner = getattr(model, "model", None)
    if base is None and inner is not None:  # a wrapper around a HF model
        base = inner.base_model
    if base is None or not hasattr(base, "embeddings"):
        raise UnsupportedArchitecture(
            f"cannot find the embeddings of {type(model).__name__} (no base_model.embeddings)")
    _, layers = _layer_list(base)
    n_layers = len(layers)
    base_ids = {id(p) for p in base.parameters()}
    layer_of = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    groups = [LayerGroup("embeddings", [], lr * xi ** n_layers)]
    groups += [LayerGroup(f"layer_{i}", [], lr * xi ** (n_layers - 1 - i)) for i in range(n_layers)]
    groups.append(LayerGroup("head", [], head_lr))
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        if id(param) in layer_of:
            groups[1 + layer_of[id(param)]].params.append((name, param))
        elif id(param) in base_ids:
            top = "pooler" in name.split(".")
            groups[n_layers if top else 0].params.append((name, param))
        else:
            groups[-1].params.append((name, param))
    return groups


def optimizer_groups(groups: list[LayerGroup], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: per layer group, one with weight decay (matrices), one without."""
    return [g for group in groups for g in param_groups(
        (p for _, p in group.params), weight_decay, lr=group.lr, name=group.name)]


class GradualUnfreezing:
    """ULMFiT's gradual unfreezing: the head first, then one more group from the top each stage.

    Stage 0 trains only the head; stage ``k`` adds the top ``k`` encoder groups
    (layers, then the embeddings last). A frozen parameter's gradient is dropped
    before the optimizer step, so AdamW leaves it, its moments and its weight
    decay untouched (and DDP still works, since no parameter changes
    ``requires_grad`` after wrapping).
    """

    def __init__(self, groups: list[LayerGroup], every_steps: int) -> None:
        self.order = list(reversed(groups))  # head, layer_{L-1}, ..., embeddings
        self.every_steps = every_steps

    def stage(self, step: int) -> int:
        return min(step // self.every_steps, len(self.order) - 1)

    def trainable_groups(self, step: int) -> list[str]:
        return [g.name for g in self.order[: self.stage(step) + 1]]

    def drop_frozen_grads(self, step: int) -> None:
        for group in self.order[self.stage(step) + 1:]:
            for _, param in group.params:
                param.grad = None


def param_groups(params: Iterable[torch.nn.Parameter], weight_decay: float, **extra: Any
                 ) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on biases and LayerNorm (1-D) weights.

    ``extra`` keys (an ``lr``, a group ``name``) go into both groups; empty groups are left out.
    """
    trainable = [p for p in params if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    return [{"params": group, "weight_decay": wd, **extra}
            for group, wd in ((decay, weight_decay), (no_decay, 0.0)) if group]


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current lr of each named layer group (for logs and plots)."""
    return {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
