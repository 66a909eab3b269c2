"""Classification data: labelled files -> token ids, with the long-text strategies of Sun et al.

Files are ``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet`` (optionally compressed)
or ``hf:owner/name[:split]``; ``text_column`` (and ``text_pair_column`` for
pairs) hold the text, ``label_column`` the label. Labels are mapped to ids from
the training set, sorted; a label in evaluation data that training never saw
is an error naming the file, the row and the label.

Long texts (Sun et al. 2019, sec. 5.3.1, Table 2), ``max_seq_length`` counting
``[CLS]`` and ``[SEP]``:

- ``head``: the first ``max_seq_length - 2`` tokens;
- ``tail``: the last ``max_seq_length - 2`` tokens;
- ``head_tail``: the first ``head_tokens`` and the last
  ``max_seq_length - 2 - head_tokens`` (the paper's best: 128 + 382 of 510);
- ``segments``: the whole text cut into up to ``max_segments`` consecutive
  pieces of ``max_seq_length - 2`` tokens, each ``[CLS] piece [SEP]``, for the
  hierarchical classifier (see heads.py).

Text pairs are truncated longest-first by the tokenizer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import datasets
import torch

from further_pt.config import ConfigError
from further_pt.corpus import builder_for, check_file, load_files

STRATEGIES = ("head", "tail", "head_tail", "segments")


def read_labelled(path: str, *, columns: Sequence[str] | None, cache_dir: str | None = None
                  ) -> datasets.Dataset:
    """Read a labelled file (or ``hf:name[:split]``) keeping ``columns``; name what is missing."""
    if path.startswith("hf:"):
        name, _, split = path.removeprefix("hf:").partition(":")
        ds = datasets.load_dataset(name, split=split or "train")
    else:
        builder = builder_for(path)
        if builder == "text":
            raise ConfigError(f"{path}: labelled data must be .jsonl, .csv, .tsv or .parquet")
        check_file(path, "labelled data")
        kwargs: dict[str, Any] = {"delimiter": "\t"} if ".tsv" in path.lower() else {}
        ds = load_files(builder, [path], "labelled data", cache_dir=cache_dir, **kwargs)
    if len(ds) == 0:
        raise ConfigError(f"{path}: holds no rows")
    if columns is None:  # keep every column
        return ds
    for column in columns:
        if column not in ds.column_names:
            raise ConfigError(f"{path}: no column {column!r} (columns: "
                              f"{', '.join(ds.column_names)})")
    return ds.select_columns(list(columns))


def label_names(train: datasets.Dataset, label_column: str, path: str) -> list[str]:
    names = sorted({str(v) for v in train[label_column]})
    if len(names) < 2:
        raise ConfigError(f"{path}: the training data has a single class ({names[0]!r}); "
                          "classification needs at least two")
    return names


def encode_labels(ds: datasets.Dataset, label_column: str, names: list[str], path: str
                  ) -> list[int]:
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for row, value in enumerate(ds[label_column]):
        if str(value) not in index:
            raise ConfigError(f"{path}: row {row + 1} has label {str(value)!r}, which the "
                              f"training data does not have (labels: {', '.join(names)})")
        ids.append(index[str(value)])
    return ids


def truncate(ids: list[int], strategy: str, budget: int, head_tokens: int) -> list[int]:
    """Keep ``budget`` tokens of ``ids`` by the strategy (``head``, ``tail`` or ``head_tail``)."""
    if len(ids) <= budget:
        return ids
    if strategy == "head":
        return ids[:budget]
    if strategy == "tail":
        return ids[len(ids) - budget:]
    head = min(head_tokens, budget)
    tail = budget - head
    return ids[:head] + (ids[len(ids) - tail:] if tail else [])


def segment(ids: list[int], budget: int, max_segments: int) -> list[list[int]]:
    pieces = [ids[i:i + budget] for i in range(0, max(len(ids), 1), budget)]
    return pieces[:max_segments]


def tokenize(
    ds: datasets.Dataset,
    tokenizer: Any,
    *,
    text_column: str,
    text_pair_column: str | None,
    labels: list[int],
    strategy: str,
    max_seq_length: int,
    head_tokens: int,
    max_segments: int,
) -> datasets.Dataset:
    """Rows -> ``input_ids`` (a list, or a list of segments) and ``labels``; cached by datasets."""
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    budget = max_seq_length - 2
    ds = ds.add_column("labels", labels)
    settings = (ds._fingerprint, _tok_fingerprint(tokenizer), text_column, text_pair_column,
                strategy, max_seq_length, head_tokens, max_segments, "v1")
    fingerprint = hashlib.sha256(repr(settings).encode()).hexdigest()[:32]

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [t or "" for t in batch[text_column]]
        if text_pair_column:
            pairs = [t or "" for t in batch[text_pair_column]]
            enc = tokenizer(texts, pairs, truncation="longest_first",
                            max_length=max_seq_length)
            return {"input_ids": enc["input_ids"],
                    "token_type_ids": enc.get("token_type_ids", [[0] * len(x) for x in
                                                                 enc["input_ids"]])}
        encoded = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(
            texts, add_special_tokens=False)]
        if strategy == "segments":
            ids = [[[cls_id, *piece, sep_id] for piece in segment(x, budget, max_segments)]
                   for x in encoded]
            return {"input_ids": ids, "token_type_ids": [[[0] * len(p) for p in x] for x in ids]}
        ids = [[cls_id, *truncate(x, strategy, budget, head_tokens), sep_id] for x in encoded]
        return {"input_ids": ids, "token_type_ids": [[0] * len(x) for x in ids]}

    keep = ["labels"]
    return ds.map(encode, batched=True, remove_columns=[c for c in ds.column_names
                                                        if c not in keep],
                  new_fingerprint=fingerprint, desc="tokenizing")


def _tok_fingerprint(tokenizer: Any) -> str:
    from further_pt.instances import tokenizer_fingerprint

    return tokenizer_fingerprint(tokenizer)


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row. Segmented rows give (batch, segments, length) + ``segment_mask``."""
    labels = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
    first = rows[0]["input_ids"]
    if first and isinstance(first[0], list):  # hierarchical segments
        n_seg = max(len(r["input_ids"]) for r in rows)
        length = max(len(p) for r in rows for p in r["input_ids"])
        ids = torch.full((len(rows), n_seg, length), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        seg_mask = torch.zeros((len(rows), n_seg), dtype=torch.bool)
        for i, r in enumerate(rows):
            for j, piece in enumerate(r["input_ids"]):
                ids[i, j, :len(piece)] = torch.as_tensor(piece)
                attn[i, j, :len(piece)] = 1
                seg_mask[i, j] = True
        return {"input_ids": ids, "attention_mask": attn, "token_type_ids": torch.zeros_like(ids),
                "segment_mask": seg_mask, "labels": labels}
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    types = torch.zeros_like(ids)
    attn = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"])
        types[i, :n] = torch.as_tensor(r["token_type_ids"])
        attn[i, :n] = 1
    return {"input_ids": ids, "attention_mask": attn, "token_type_ids": types, "labels": labels}
