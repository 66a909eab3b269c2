"""Schedules: learning rate over optimizer steps, as torch LR schedulers.

- ``stlr``: slanted triangular learning rates, Howard & Ruder (2018) eq. 3::

      cut = floor(T * cut_frac)
      p   = t / cut                                   if t < cut
            1 - (t - cut) / (cut * (1 / cut_frac - 1))  otherwise
      lr  = lr_max * (1 + p * (ratio - 1)) / ratio

  a short linear rise from lr_max/ratio to lr_max, then a long linear fall back
  to lr_max/ratio at t = T.
- ``linear``: linear warmup over ``warmup_steps`` then linear decay to 0 at T
  (BERT, keras_bert's AdamWarmup);
- ``cosine``: linear warmup then a half cosine to 0;
- ``constant``: linear warmup then flat.

T counts optimizer steps of the whole run (epochs x steps per epoch, after
gradient accumulation, across processes), and every schedule multiplies each
parameter group's own lr, so layer-wise rates keep their ratios.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

SCHEDULES = ("stlr", "linear", "cosine", "constant")


def stlr_factor(step: int, total_steps: int, cut_frac: float, ratio: float) -> float:
    """The STLR multiplier of lr_max at optimizer step ``step`` (0-based) of ``total_steps``."""
    cut = max(math.floor(total_steps * cut_frac), 1)
    p = step / cut if step < cut else 1 - (step - cut) / (cut * (1 / cut_frac - 1))
    p = max(p, 0.0)
    return (1 + p * (ratio - 1)) / ratio


def build(name: str, optimizer: Optimizer, *, total_steps: int, warmup_steps: int = 0,
          cut_frac: float = 0.1, ratio: float = 32.0) -> LambdaLR:
    """A LambdaLR for the named schedule."""
    if name == "stlr":
        return LambdaLR(optimizer, lambda s: stlr_factor(s, total_steps, cut_frac, ratio))
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    hf_name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[name]
    return get_scheduler(hf_name, optimizer, num_warmup_steps=warmup_steps,
                         num_training_steps=total_steps)
