"""Segments: labelled examples -> token ids, cut to the model's length the ways Sun et al.
compare for long texts (sec. 5.3.1: head, tail, head + tail, or several segments pooled),
and batches of them.

Reading the files and the labels is :mod:`.labelled`'s; this is what happens once a text and
its label id are known.
"""

from __future__ import annotations

import hashlib
from typing import Any

import datasets
import torch

from further_pt.data import instances


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
    labels: list[Any],
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
        encoded = instances.encode_plain(tokenizer, texts)
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

    return instances.tokenizer_fingerprint(tokenizer)


def collate(rows: list[dict[str, Any]], pad_id: int, pad_to_multiple_of: int | None = None
            ) -> dict[str, torch.Tensor]:
    """Pad to the longest row. Segmented rows give (batch, segments, length) + ``segment_mask``.

    ``pad_to_multiple_of`` (8 on GPUs) rounds the padded length up: tensor-core matmuls
    want dimensions in multiples of 8, and fewer distinct shapes mean fewer kernels to pick.
    """
    values = [r["labels"] for r in rows]  # class ids; multi-hot rows or targets: floats
    labels = torch.tensor(values, dtype=torch.long if isinstance(values[0], int) else
                          torch.float32)
    first = rows[0]["input_ids"]
    if first and isinstance(first[0], list):  # hierarchical segments
        n_seg = max(len(r["input_ids"]) for r in rows)
        length = max(len(p) for r in rows for p in r["input_ids"])
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
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
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    types = torch.zeros_like(ids)
    attn = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"])
        types[i, :n] = torch.as_tensor(r["token_type_ids"])
        attn[i, :n] = 1
    return {"input_ids": ids, "attention_mask": attn, "token_type_ids": types, "labels": labels}
