"""Batches: the micro-batches a run trains on, one resumable stream per dataset.

Each stream (one dataset: the corpus, or a task of a multi-task run) has its own
:class:`~further_pt.data.order.ResumableSampler` and DataLoader, so a run resumes at the
exact micro-batch it stopped at. With several streams, each step draws one in proportion
to its size, from a generator seeded by (seed, step): the same draw on every process and in
a resumed run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader

from further_pt.data import order, streaming
from further_pt.errors import SetupError
from further_pt.objectives.base import Stream


class Batches:
    """The streams' samplers and loaders, the steps an epoch takes, and the draw per step."""

    def __init__(self, streams: list[Stream], *, seed: int, rank: int, world: int,
                 batch_size: int, accumulation: int, workers: int, pin_memory: bool) -> None:
        """Build every stream's sampler and loader; refuse a stream with no full batch."""
        self.seed, self.batch_size = seed, batch_size
        self.names = [s.name for s in streams]
        # a streamed corpus (data.streaming): no length, read in order with a counted skip
        self.streamed = {s.name: s for s in streams if isinstance(s.dataset,
                                                                  datasets.IterableDataset)}
        self.grouped = any(s.lengths is not None for s in streams) or bool(self.streamed)
        self._iters: dict[str, Iterator[tuple[int, int, Any]]] = {}
        if self.streamed:
            if len(streams) > 1:
                raise SetupError("a streamed corpus is the run's one stream")
            self.steps_per_epoch = None  # unknown: the run is counted in steps
            return
        self.sizes = torch.tensor([float(len(s.dataset)) for s in streams])
        self.samplers: dict[str, order.ResumableSampler] = {}
        self.loaders: dict[str, DataLoader] = {}
        for s in streams:
            self.samplers[s.name] = order.ResumableSampler(
                len(s.dataset), seed=seed, rank=rank, world_size=world, lengths=s.lengths,
                batch_size=batch_size)
            # Batches that know their (epoch, position): a collate that draws randomness
            # (masking) seeds it from them, in the workers, and resumes exactly.
            self.loaders[s.name] = DataLoader(
                order.Positioned(s.dataset), batch_sampler=order.PositionedBatches(
                    self.samplers[s.name], batch_size, s.drop_last),
                collate_fn=s.collate, num_workers=workers,
                pin_memory=pin_memory, persistent_workers=workers > 0,
                prefetch_factor=4 if workers > 0 else None,
                # Its own generator: a new iterator otherwise draws from the global RNG,
                # which would shift dropout after a resume.
                generator=torch.Generator().manual_seed(seed))
        micro_per_epoch = {s.name: (self.samplers[s.name].per_rank // batch_size if s.drop_last
                                    else math.ceil(self.samplers[s.name].per_rank / batch_size))
                           for s in streams}
        empty = [name for name, n in micro_per_epoch.items() if n == 0]
        if empty:
            s = next(x for x in streams if x.name == empty[0])
            raise SetupError(
                f"the training data ({empty[0]}) gives {len(s.dataset)} examples, fewer than one "
                f"batch of {batch_size} x {world} process(es); add data or lower "
                "train.batch_size")
        self.steps_per_epoch: int | None = sum(math.ceil(n / accumulation)
                                                for n in micro_per_epoch.values())

    def start(self, positions: dict[str, list[int]]) -> None:
        """Iterate every stream from its saved ``[epoch, example]`` position."""
        self._iters = {name: streaming.micro_batches(
            self.streamed[name].dataset, batch_size=self.batch_size,
            collate=self.streamed[name].collate, epoch=positions[name][0],
            position=positions[name][1]) if name in self.streamed else
            order.micro_batches(self.loaders[name], self.samplers[name], self.batch_size,
                                *positions[name]) for name in self.names}

    def stream_at(self, step: int) -> str:
        """The stream step ``step`` trains on: drawn by size, the same on every process."""
        if len(self.names) == 1:
            return self.names[0]
        gen = torch.Generator().manual_seed(order.step_seed(self.seed, step))
        return self.names[int(torch.multinomial(self.sizes, 1, generator=gen))]

    def next(self, name: str) -> tuple[int, int, dict[str, torch.Tensor]]:
        """The stream's next micro-batch, with the (epoch, example) position after it."""
        return next(self._iters[name])


def host_side(batch: dict[str, torch.Tensor], *, pin: bool = False
              ) -> tuple[dict[str, torch.Tensor], int]:
    """The batch as the model takes it, and its count of real tokens: both decided on the host.

    A batch without padding (packed pretraining blocks; fine-tuning batches of full-length
    texts) goes without its all-ones ``attention_mask``: the model then attends everywhere
    and builds no mask. Given one, transformers' mask code asks the device whether it is all
    ones (``padding_mask.all()``) to skip it, and every step would wait for the accelerator
    there. Asked here of the batch still on the CPU, the answer costs nothing.

    ``pin`` (a CUDA device): tensors not yet in pinned memory (a streamed corpus is collated
    outside the DataLoader's pinning) are pinned, so the copy to the device is asynchronous.
    """
    if pin:
        batch = {k: v if v.is_pinned() else v.pin_memory() for k, v in batch.items()}
    mask = batch.get("attention_mask")
    if mask is None:
        return batch, batch["input_ids"].numel()
    tokens = int(mask.sum())
    if tokens == mask.numel():
        batch = {k: v for k, v in batch.items() if k != "attention_mask"}
    return batch, tokens
