"""Streaming: corpora larger than the disk, read, tokenized and packed on the fly
(``data.streaming: true``).

Each source becomes a ``datasets`` IterableDataset through the same ``load_dataset`` call
the cached path uses (a builder with ``data_files`` for local files, a Hub id with its
config, split and revision), its documents shuffled in a seeded buffer, the sources
interleaved with ``data.source_weights`` as sampling probabilities (equal when null: a
stream's size is unknown), then tokenized and packed into full ``max_seq_length`` blocks
as they come. Every process reads its own share (``split_dataset_by_node``).

Resume is exact by a counted skip: the order is a pure function of (seed, epoch, rank,
processes), so a run that stopped after ``p`` micro-batches of an epoch reads and drops the
first ``p x batch`` blocks of that epoch again (the cost of the skip is that reading). The
stream is read in the training process (no DataLoader workers: with workers, each would
skip within its own shards and the position would no longer be exact).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from further_pt.data import builtin, corpus, instances, order
from further_pt.errors import DataError

#: Documents held in the shuffle buffer of each source (datasets' default is 1,000).
SHUFFLE_BUFFER = 10_000


def source_stream(cfg: DictConfig, source: corpus.Source) -> datasets.IterableDataset:
    """One source's documents as an IterableDataset with a ``text`` column."""
    d = cfg.data
    if source.hub is not None or source.spec.startswith("hf:"):
        ds, own_column = corpus.load_dataset_source(source, streaming=True)
        column = own_column or d.text_column
    else:
        files = list(source.files)
        if source.spec.startswith("builtin:"):
            files = [str(builtin.builtin_corpus(source.spec.removeprefix("builtin:"),
                                               corpus.default_cache_dir(d.cache_dir)))]
        builders = {corpus.builder_for(f) for f in files}
        if len(builders) > 1:
            raise DataError(f"data.train_files: {source.spec} mixes file kinds "
                            f"({', '.join(sorted(builders))}); with data.streaming give each "
                            "kind its own entry")
        builder = builders.pop()
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True,
                                   **corpus.builder_kwargs(builder, files, d.txt_documents))
        column = "text" if builder == "text" else d.text_column
    first = next(iter(ds.take(1)), None)  # read one row now: a wrong column fails before work
    if first is None:
        raise DataError(f"data.train_files: {source.spec} holds no row")
    if column not in first:
        raise DataError(f"data.train_files: {source.spec} has no column {column!r} (its columns: "
                        f"{', '.join(first)}); set data.text_column, or text_column in the entry")
    if column != "text":
        ds = ds.rename_column(column, "text")
    ds = ds.select_columns(["text"]).filter(
        lambda row: isinstance(row["text"], str) and bool(row["text"].strip()))
    if d.max_documents is not None:
        ds = ds.take(d.max_documents)
    return ds.shuffle(seed=cfg.seed, buffer_size=SHUFFLE_BUFFER)


def training_stream(cfg: DictConfig, sources: list[corpus.Source], tokenizer: Any, *,
                    rank: int, world: int) -> datasets.IterableDataset:
    """This process's share of the mixed, packed stream: rows of ``input_ids`` blocks."""
    streams = [source_stream(cfg, s) for s in sources]
    weights = cfg.data.source_weights
    if len(streams) == 1:
        mixed = streams[0]
    else:
        total = float(sum(weights)) if weights is not None else float(len(streams))
        probabilities = ([w / total for w in weights] if weights is not None
                         else [1.0 / len(streams)] * len(streams))
        mixed = datasets.interleave_datasets(streams, probabilities=probabilities, seed=cfg.seed,
                                             stopping_strategy="all_exhausted")
    instances.untruncated(tokenizer)
    n = cfg.data.max_seq_length
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id

    def pack(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = [x for x in instances.encode_plain(tokenizer, batch["text"]) if x]
        blocks = instances.pack_documents(ids, max_seq_length=n, cls_id=cls_id, sep_id=sep_id)
        return {"input_ids": [b for b in blocks if len(b) == n]}  # full blocks only

    packed = mixed.map(pack, batched=True, batch_size=256, remove_columns=["text"])
    return split_dataset_by_node(packed, rank=rank, world_size=world)


def micro_batches(dataset: datasets.IterableDataset, *, batch_size: int, collate: Any,
                  epoch: int, position: int) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """Yield ``(epoch, position_after, batch)`` forever from micro-batch ``position`` of
    ``epoch``: the stream reshuffled per epoch, the first ``position`` batches skipped."""
    while True:
        dataset.set_epoch(epoch)
        rest = dataset.skip(position * batch_size) if position else dataset
        rest.set_epoch(epoch)
        start = position
        # Its own generator: a new iterator otherwise draws from the global RNG, which would
        # shift the step's dropout in a resumed run (it starts its iterator at another step).
        loader = DataLoader(rest, batch_size=batch_size, collate_fn=list, drop_last=True,
                            generator=torch.Generator().manual_seed(epoch))
        for rows in loader:  # collated here, where the batch's position is known
            batch = collate(order.Rows(rows, epoch=epoch, position=position))
            position += 1
            yield epoch, position, batch
        if position == start == 0:
            raise DataError("the streamed corpus gives no full batch of blocks: it is empty, or "
                            "shorter than one batch per process")
        epoch, position = epoch + 1, 0
