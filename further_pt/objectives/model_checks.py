"""Model-dependent checks of a fine-tuning recipe: keys valid or not only for a given model.

``head.layers`` / ``head.pooling`` against the model's config and the tokenizer's special
tokens, checked by :class:`~further_pt.objectives.classification.Classification` before any
work, so that a bad value is one line naming the key rather than an IndexError in the first
training step, after the output dir was claimed.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import AutoModelForSequenceClassification

from further_pt.errors import ConfigError


def check_head(config: Any, head: DictConfig, *, trust_remote_code: bool = False) -> None:
    """``head.layers`` / ``head.pooling`` against the model's config, before any work.

    These keys are valid or not only for a given model, so the recipe checks cannot
    see them; unchecked, a bad index is an IndexError and a missing pooler a
    TypeError in the first training step, after the output dir was claimed.
    """
    if head.pooling == "pooler":  # the pooler's output is used whatever head.layers lists
        missing = _missing_pooler(config, trust_remote_code)
        if missing is not None:
            raise ConfigError(
                f"config key 'head.pooling': pooler, but {config.model_type!r} models "
                f"({missing}) have no pooler; use cls, cls_raw, mean, max or concat")
        return
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or list(head.layers) == [-1]:
        return  # [-1] is the last hidden state of any model
    states = layers + 1  # heads.py indexes out.hidden_states: the embeddings, then each layer
    for index in head.layers:
        if not -states <= index < states:
            raise ConfigError(
                f"config key 'head.layers': {index} addresses no hidden state of the "
                f"{layers}-layer model (valid: {-states}..{layers}; 0 = the embeddings "
                f"output, -1 = the last layer)")


def _missing_pooler(config: Any, trust_remote_code: bool) -> str | None:
    """The sequence-classification class, if the encoder it builds has no pooler; else None.

    Only the class can tell (RoBERTa's builds its encoder without the pooler that BERT's
    has), so it is instantiated on the meta device: no weights, no memory. A class
    that cannot be built there is not judged (None).
    """
    try:
        with torch.device("meta"):
            built = AutoModelForSequenceClassification.from_config(
                copy.deepcopy(config), trust_remote_code=trust_remote_code)
    except Exception:  # a check that cannot decide must not block the run
        return None
    if getattr(built.base_model, "pooler", None) is not None:
        return None
    return type(built).__name__


def check_special_tokens(tokenizer: Any, *, pairs: bool) -> None:
    """Inputs are ``[CLS] text [SEP]`` padded with the pad token: the tokenizer must have them.

    Unchecked, a missing token is a ``None`` among the ids, which fails deep in
    tokenization or collation after the output dir was claimed.
    """
    needed = ("pad",) if pairs else ("cls", "sep", "pad")  # pairs: the tokenizer adds its own
    for name in needed:
        if getattr(tokenizer, f"{name}_token_id", None) is None:
            raise ConfigError(
                f"model.tokenizer: {type(tokenizer).__name__} has no {name} token; "
                "classification inputs are [CLS] text [SEP], padded")
