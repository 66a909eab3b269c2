"""Dropout on CPUs: the same Bernoulli masks as ``nn.Dropout``, drawn about 5x faster.

Profiling a MiniLM pretraining step on a 2-core CPU (fp32, batch 16 x 128) put
``aten::bernoulli_`` at 14% of the step: torch draws a CPU dropout mask one float at
a time from its Mersenne twister. This module draws 64 random bits per call instead
and cuts them into four 15-bit uniform integers, each compared with a threshold: a
position is dropped with probability ``round(p * 32768) / 32768`` (0.1000061 for
p = 0.1) and kept ones are scaled by the inverse keep rate, so the expected output is
the input, as with ``nn.Dropout``. Masks come from torch's default CPU generator, the
one checkpoints save, so a resumed run draws the masks it would have drawn.

:func:`install` puts it into a model that trains on a CPU:

- every ``nn.Dropout`` submodule becomes :class:`Dropout` (a subclass: ``.p`` and
  ``isinstance`` checks still hold);
- a Hugging Face model on ``sdpa`` attention switches to :data:`ATTENTION`, which is
  ``sdpa`` itself whenever attention dropout is off (evaluation, ``p = 0``) and, when
  it is on, the softmax(QK^T)V that sdpa's CPU fallback computes in that case, with
  the fast mask on the probabilities, in fp32. Calls it does not handle (bf16/fp16
  inputs, a causal mask, sliding windows, soft-capping, grouped-query heads, ...) go
  to sdpa unchanged.

On GPUs none of this is used: their dropout kernels are fused and fast. The
recipes' ``train.fast_cpu_dropout: true`` turns it on; ``false`` keeps torch's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

#: The attention implementation name registered with transformers.
ATTENTION = "further_pt_cpu_sdpa"
_LEVELS = 32768  # 15 bits per draw: four draws from each 64-bit random word


def drop_mask(shape: torch.Size | tuple[int, ...], p: float) -> tuple[torch.Tensor, float]:
    """A bool mask, True where a value is dropped, and the scale for the kept ones."""
    n = math.prod(shape)
    threshold = round(p * _LEVELS)
    if threshold >= _LEVELS:
        return torch.ones(shape, dtype=torch.bool), 0.0
    # random_() on int64 gives 63 uniform bits; each int16 view holds 15 of them below its
    # sign bit, which the & clears.
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_()
    drop = (words.view(torch.int16)[:n] & (_LEVELS - 1)) < threshold
    return drop.view(shape), _LEVELS / (_LEVELS - threshold)


class _MaskedScale(torch.autograd.Function):
    """``x * keep * scale``, saving the 1-byte mask (nn.Dropout saves a float one)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        drop, scale = drop_mask(x.shape, p)
        ctx.save_for_backward(drop)
        ctx.scale = scale
        return x.masked_fill(drop, 0.0).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (drop,) = ctx.saved_tensors
        return grad.masked_fill(drop, 0.0).mul_(ctx.scale), None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the fast mask on CPU tensors."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return nn.functional.dropout(x, p, training)
    return _MaskedScale.apply(x, p)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with :func:`dropout`'s mask (``inplace`` is not honoured: never needed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


#: Keyword arguments models pass along that sdpa ignores too (flags and packing metadata).
_PLAIN_KWARGS = {"position_ids", "output_attentions", "output_hidden_states", "return_dict",
                 "use_cache", "deterministic", "cu_seq_lens_q", "cu_seq_lens_k",
                 "max_length_q", "max_length_k"}


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0,
              scaling: float | None = None, is_causal: bool | None = None,
              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """sdpa, except that attention dropout on a CPU uses the fast mask (see the module doc)."""
    unhandled = [k for k, v in kwargs.items()
                 if v is not None and v is not False and k not in _PLAIN_KWARGS]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if (dropout == 0.0 or query.device.type != "cpu" or causal or unhandled
            or query.dtype != torch.float32  # bf16/fp16: sdpa's math keeps more precision
            or key.shape[1] != query.shape[1]):  # grouped-query attention: sdpa handles it
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    empty_rows = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # sdpa's masks: True = may attend
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            empty_rows = ~attention_mask.any(-1, keepdim=True)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    if empty_rows is not None:  # a query that may attend to nothing gets 0, as in sdpa
        probs = probs.masked_fill(empty_rows, 0.0)
    out = torch.matmul(_MaskedScale.apply(probs, dropout), value)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def install(module: nn.Module) -> dict[str, int]:
    """Use the fast CPU dropout in ``module`` (in place); returns what was switched, to log."""
    swapped = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, Dropout(child.p))
                swapped += 1
    switched = 0
    for sub in module.modules():  # parents first: a model's submodels share its config
        if isinstance(sub, PreTrainedModel) and sub.config._attn_implementation == "sdpa":
            sub.set_attn_implementation(ATTENTION)  # a remote-code model may decline
            switched += sub.config._attn_implementation == ATTENTION
    return {"dropout_modules": swapped, "attention_models": switched}
