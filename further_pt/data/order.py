"""Order: which examples a process sees at each step, and the seeds of each step's randomness.

Both are pure functions of (seed, step, rank), so a run resumed at step k draws the same
batches, masks and dropout as the uninterrupted run did at step k: the basis of exact
resume. :class:`ResumableSampler` can start at any example of any epoch, and sorts by length
within windows when asked (little padding) without changing what an epoch contains.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def step_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed that is a pure function of (seed, step, rank, ...)."""
    text = "-".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


class ResumableSampler(Sampler[int]):
    """Per-epoch shuffle of ``n`` indices, split across ranks, that starts anywhere in O(1).

    The order of epoch ``e`` is ``randperm(n)`` seeded with (seed, e); rank ``r``
    of ``w`` takes every ``w``-th index from ``r`` (a tail that does not divide
    evenly is left out, so all ranks take equal steps). Resuming sets the epoch
    and the offset into this rank's share: nothing is replayed.

    With ``lengths`` and ``batch_size`` (length grouping, as Hugging Face's
    ``LengthGroupedSampler``), each run of ``50 x batch_size`` indices of this
    rank's share is sorted by length, cut into batches, and the batches are
    shuffled: batches hold sequences of similar length, so dynamic padding adds
    little, while the order stays a pure function of (seed, epoch).
    """

    GROUP = 50  # batches per length-sorted group

    def __init__(self, n: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, lengths: torch.Tensor | None = None,
                 batch_size: int | None = None) -> None:
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.shuffle = shuffle
        self.lengths, self.batch_size = lengths, batch_size
        if lengths is not None and (batch_size is None or len(lengths) != n):
            raise ValueError("length grouping needs one length per index and a batch_size")
        self.epoch, self.start = 0, 0

    @property
    def per_rank(self) -> int:
        return self.n // self.world_size

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(self.per_rank - self.start, 0)

    def order(self) -> torch.Tensor:
        """This rank's full order for the current epoch."""
        gen = torch.Generator().manual_seed(step_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=gen) if self.shuffle else torch.arange(self.n)
        mine = order[self.rank: self.per_rank * self.world_size: self.world_size]
        if self.lengths is None:
            return mine
        assert self.batch_size is not None
        size = self.batch_size * self.GROUP
        groups = [mine[i:i + size] for i in range(0, len(mine), size)]
        ordered = torch.cat([g[self.lengths[g].argsort(descending=True, stable=True)]
                             for g in groups])
        batches = list(ordered.split(self.batch_size))
        full, tail = (batches[:-1], batches[-1:]) if len(batches[-1]) < self.batch_size else (
            batches, [])
        shuffled = torch.randperm(len(full), generator=gen).tolist() if self.shuffle else range(
            len(full))
        return torch.cat([full[i] for i in shuffled] + tail)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start:].tolist())


def micro_batches(loader: DataLoader, sampler: ResumableSampler, batch_size: int,
                  epoch: int, position: int) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(epoch, position_after, batch)`` forever, from micro-batch ``position``."""
    while True:
        sampler.set_position(epoch, position * batch_size)
        for batch in loader:
            position += 1
            yield epoch, position, batch
        epoch, position = epoch + 1, 0


class Rows(list):
    """A micro-batch's rows, and where it lies in the data order: ``(epoch, position)``.

    A collate function that draws randomness (dynamic masking) seeds it from these, so it
    can run in a DataLoader worker, ahead of the step, and a resumed run - which starts
    at the same ``(epoch, position)`` - draws what the uninterrupted run drew.
    """

    def __init__(self, rows: list[Any], *, epoch: int, position: int) -> None:
        super().__init__(rows)
        self.epoch, self.position = epoch, position


class PositionedBatches(Sampler[list[tuple[int, int, int]]]):
    """A batch sampler over a :class:`ResumableSampler` whose batches say where they are.

    Each batch is a list of ``(epoch, position, index)``: the epoch and the position of the
    micro-batch in this rank's order of it, read off the sampler's position when an
    iteration starts. :class:`Positioned` turns them back into :class:`Rows`.
    """

    def __init__(self, sampler: ResumableSampler, batch_size: int, drop_last: bool) -> None:
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch, position = self.sampler.epoch, self.sampler.start // self.batch_size
        indices = self.sampler.order()[self.sampler.start:].tolist()
        for first in range(0, len(indices), self.batch_size):
            chunk = indices[first:first + self.batch_size]
            if len(chunk) < self.batch_size and self.drop_last:
                return
            yield [(epoch, position, i) for i in chunk]
            position += 1


class Positioned(Dataset):
    """A map-style dataset read by ``(epoch, position, index)`` keys: a batch is :class:`Rows`."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        return self.dataset[key[2]]

    def __getitems__(self, keys: list[tuple[int, int, int]]) -> Rows:
        indices = [k[2] for k in keys]
        many = getattr(self.dataset, "__getitems__", None)
        rows = many(indices) if many is not None else [self.dataset[i] for i in indices]
        return Rows(rows, epoch=keys[0][0], position=keys[0][1])
