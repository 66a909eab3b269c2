"""Base: the interface between an objective and the Trainer that runs it.

An objective (masked-LM pretraining, classification fine-tuning, ...) is a model, a loss
and a metric; the Trainer (:mod:`further_pt.train.trainer`) owns what every run shares
(processes, the step, checkpoints, logging). An objective is duck-typed against
:class:`Objective`::

    module: nn.Module                    # what trains; Accelerate wraps it
    streams: list[Stream]                # datasets to draw batches from
    find_unused_parameters: bool         # DDP flag (custom heads leave params unused)
    optimizer_groups() -> list[dict]     # AdamW parameter groups, each with its own lr
    schedule(optimizer, total_steps=, steps_per_epoch=) -> LR scheduler
    total_steps(steps_per_epoch) -> int
    loss(module, batch, stream=, step=, micro=) -> (loss, {name: (numerator, denominator)})
    before_optimizer_step(step) -> None  # e.g. gradual unfreezing drops frozen gradients
    eval_every_steps: int | None         # optional: evaluate every N steps (None: epoch ends)
    early_stopping_patience: int | None  # optional: stop after N evaluations without a new best
    evaluate(model, shard) -> dict       # at epoch ends, unless metric is None: every process
                                         # its EvalShard of the dev set, results gathered; under
                                         # FSDP the main process alone (shard None), on the
                                         # gathered whole model
    better(new, best) -> bool            # compares evaluate()[objective.metric]
    export(model, folder) -> None        # a Hugging Face folder that from_pretrained loads
    summary() -> dict                    # extra keys for metrics.json
    card() -> dict                       # what the model card says (train/model_card.py)
    flops_per_token() -> float | None    # training FLOPs per token, for the logged MFU

An objective is built in two steps, because every check must come before any work: its
constructor reads configs only; ``build(run)`` then reads data and makes the model, inside a
:class:`Run` (the Trainer, seen through what an objective may use of it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch


@dataclass
class Stream:
    """A dataset the Trainer draws batches from (one per task in multi-task fine-tuning)."""

    name: str
    dataset: Any
    collate: Any  # rows (data.order.Rows: a list that knows its epoch and position) -> batch
    lengths: torch.Tensor | None = None  # per-example lengths: batches of similar length
    drop_last: bool = False  # pretraining: only full batches; fine-tuning: every example


@dataclass(frozen=True)
class EvalShard:
    """This process's share of an evaluation set, and how the shares come back together.

    Evaluating on the main process alone leaves N-1 GPUs waiting; each process instead
    predicts a contiguous slice and ``gather`` (Accelerate's ``gather_for_metrics`` on
    Python objects) concatenates the slices in rank order, so the metrics are those of
    the whole set, in order, computed once.
    """

    rank: int
    world: int
    gather: Any  # list -> list: every process's list, concatenated in rank order

    def span(self, n: int) -> range:
        return range(n * self.rank // self.world, n * (self.rank + 1) // self.world)


class Objective(Protocol):
    name: str
    module: torch.nn.Module
    streams: list[Stream]
    metric: str | None
    find_unused_parameters: bool

    def optimizer_groups(self) -> list[dict[str, Any]]: ...
    def schedule(self, optimizer: Any, *, total_steps: int, steps_per_epoch: int) -> Any: ...
    def total_steps(self, steps_per_epoch: int) -> int: ...
    def loss(self, module: Any, batch: dict[str, torch.Tensor], *, stream: str, step: int,
             micro: int) -> tuple[torch.Tensor, dict[str, tuple[Any, Any]]]: ...
    def before_optimizer_step(self, step: int) -> None: ...
    def evaluate(self, model: Any, shard: EvalShard | None) -> dict[str, Any]: ...
    def better(self, new: float, best: float | None) -> bool: ...
    def export(self, model: Any, folder: Path) -> None: ...
    def summary(self) -> dict[str, Any]: ...
    def card(self) -> dict[str, Any]: ...
    def flops_per_token(self) -> float | None: ...


class Run(Protocol):
    """What an objective's ``build`` uses of the run it is built in (the Trainer).

    ``claim`` writes the output dir's config.yaml: an objective calls it once its inputs
    have been read and before it writes anything there (a tokenizer trained on the corpus),
    so a bad input never leaves a half-made run behind.
    """

    accelerator: Any
    output_dir: Path
    resume_from: Path | None  # the checkpoint every process resumes from (the main one's)

    @property
    def is_main(self) -> bool: ...
    @property
    def rank(self) -> int: ...
    @property
    def world(self) -> int: ...
    def claim(self) -> None: ...
