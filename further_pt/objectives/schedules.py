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
- :func:`with_head_warmup`: ``head_steps`` steps in which only the newly
  initialised heads learn (at their own constant rate; every other group at 0),
  then the main schedule, shifted to start at step ``head_steps``.

T counts optimizer steps of the whole run (epochs x steps per epoch, after
gradient accumulation, across processes), and every schedule multiplies each
parameter group's own lr, so layer-wise rates keep their ratios.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


def linear_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to 1 over ``warmup_steps``, then linear decay to 0 at ``total_steps``.

    The formula of transformers' ``get_linear_schedule_with_warmup``, as a function.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def with_head_warmup(optimizer: Optimizer, *, head_steps: int, head_factor: float,
                     head_groups: set[str], main: Callable[[int], float]) -> LambdaLR:
    """A head warm-up phase, then ``main`` (a factor of step) for every group.

    During steps ``0 .. head_steps - 1`` the groups named in ``head_groups`` get
    ``head_factor`` x their lr (a constant warm-up rate) and all others 0 (the
    caller also drops their gradients, so AdamW neither moves them nor decays
    them, nor accumulates moments); from ``head_steps`` on every group follows
    ``main(step - head_steps)``: the recipe's schedule starts when the warm-up ends.
    """
    def factor(is_head: bool) -> Callable[[int], float]:
        def f(step: int) -> float:
            if step < head_steps:
                return head_factor if is_head else 0.0
            return main(step - head_steps)
        return f

    return LambdaLR(optimizer, [factor(g.get("name") in head_groups)
                                for g in optimizer.param_groups])
