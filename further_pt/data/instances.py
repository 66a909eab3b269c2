"""Instances: documents -> tokenized training sequences (NSP pairs or packed blocks), cached.

With NSP (``objective.nsp: true``) this follows Google BERT's
``create_pretraining_data.py``: each document is split into sentences, runs of
sentences are gathered up to a target length (``max_seq_length - 3``, or with
probability ``short_seq_prob`` a random shorter one), the run is cut at a random
sentence boundary into A and B, and half of the time B is replaced by text from
a random *other* document (``next_sentence_label`` 1 = random, 0 = actual
next, as ``BertForPreTraining`` expects). Sentences a random B displaced are put
back and reused. Differences from Google's script, both deliberate: the random
document is drawn from the same batch of ``_MAP_BATCH`` documents (so a corpus
streams instead of being held in memory), and instances are built once, not
``dupe_factor`` times, because masking is dynamic (redrawn every step).

Without NSP, documents are tokenized and packed back to back, separated by
``[SEP]``, into full ``[CLS] ... [SEP]`` blocks of ``max_seq_length`` tokens
(RoBERTa's FULL-SENTENCES), so no step is spent on padding.

Sentence splitting is rule-based (no model download): a split after ``.``, ``!``
or ``?`` followed by white space and an upper-case letter or digit. In
``blank_line`` documents each line already is a sentence.

Instances are computed with ``datasets.Dataset.map`` and cached by datasets
under a fingerprint of the documents, the tokenizer and every setting that
changes the result, so a second run (or another variant of an experiment
sharing a source) reuses them.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections.abc import Sequence
from itertools import chain
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch

logger = logging.getLogger(__name__)

INSTANCES_VERSION = "3"  # bump when the algorithm below changes, to invalidate caches
_MAP_BATCH = 1000
_SENTENCE_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(document: str, txt_documents: str = "line") -> list[str]:
    if txt_documents == "blank_line":
        parts = document.split("\n")
    else:
        parts = _SENTENCE_BOUNDARY.split(document)
    return [p.strip() for p in parts if p and p.strip()]


def truncate_seq_pair(a: list[int], b: list[int], max_tokens: int, rng: random.Random) -> None:
    """Trim the longer of A and B, from the front or the back at random, until both fit."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def create_nsp_instances(
    documents: Sequence[Sequence[Sequence[int]]],
    *,
    max_seq_length: int,
    short_seq_prob: float,
    cls_id: int,
    sep_id: int,
    rng: random.Random,
) -> list[tuple[list[int], list[int], int]]:
    """Google BERT's instance creation over ``documents`` (lists of tokenized sentences).

    Returns ``(input_ids, token_type_ids, next_sentence_label)`` triples.
    """
    max_tokens = max_seq_length - 3  # [CLS] A [SEP] B [SEP]
    out = []
    for doc_index, document in enumerate(documents):
        target = max_tokens
        if rng.random() < short_seq_prob:
            target = rng.randint(2, max_tokens)
        chunk: list[Sequence[int]] = []
        length = 0
        i = 0
        while i < len(document):
            chunk.append(document[i])
            length += len(document[i])
            if i == len(document) - 1 or length >= target:
                a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
                tokens_a = [t for seg in chunk[:a_end] for t in seg]
                others = len(documents) > 1
                if others and (len(chunk) == 1 or rng.random() < 0.5):
                    label = 1
                    other = rng.randint(0, len(documents) - 2)
                    other += other >= doc_index  # uniform over the other documents
                    random_doc = documents[other]
                    start = rng.randint(0, len(random_doc) - 1)
                    tokens_b: list[int] = []
                    for seg in random_doc[start:]:
                        tokens_b.extend(seg)
                        if len(tokens_b) >= target - len(tokens_a):
                            break
                    i -= len(chunk) - a_end  # put the displaced sentences back
                elif len(chunk) >= 2:
                    label = 0
                    tokens_b = [t for seg in chunk[a_end:] for t in seg]
                else:  # a one-sentence document alone in its batch: no valid pair
                    tokens_b = []
                    label = 0
                truncate_seq_pair(tokens_a, tokens_b, max_tokens, rng)
                if tokens_a and tokens_b:
                    ids = [cls_id, *tokens_a, sep_id, *tokens_b, sep_id]
                    types = [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)
                    out.append((ids, types, label))
                chunk, length = [], 0
            i += 1
    return out


def pack_documents(
    documents: Sequence[Sequence[int]], *, max_seq_length: int, cls_id: int, sep_id: int
) -> list[list[int]]:
    """Concatenate tokenized documents (``[SEP]`` between them) into full ``[CLS] x [SEP]`` blocks.

    The last block of a batch may be shorter; no token is dropped.
    """
    block = max_seq_length - 2
    stream: list[int] = []
    for doc in documents:
        if stream:
            stream.append(sep_id)
        stream.extend(doc)
    return [[cls_id, *stream[i:i + block], sep_id] for i in range(0, len(stream), block)]


def untruncated(tokenizer: Any) -> Any:
    """The tokenizer's Rust backend with no truncation or padding set (None if it has none).

    A transformers tokenizer leaves the truncation/padding of its last ``__call__`` (or
    of its tokenizer.json: all-MiniLM-L6-v2 ships one) set on the backend, which would
    cut every text encoded straight through it at that ``max_length``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
    return backend


def encode_plain(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids straight from the Rust tokenizer (no offsets, masks or BatchEncoding),
    whole texts, never truncated or padded (:func:`untruncated`)."""
    backend = untruncated(tokenizer)
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def pack_arrow(documents: Sequence[Sequence[int]], *, max_seq_length: int, cls_id: int,
               sep_id: int) -> pa.Table:
    """:func:`pack_documents`, vectorised with numpy, as an Arrow table ``input_ids``.

    The same blocks, token for token (tested); no Python loop over tokens.
    """
    docs = [d for d in documents if len(d)]
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    flat = np.fromiter(chain.from_iterable(docs), dtype=np.int32, count=int(lengths.sum()))
    stream = np.insert(flat, np.cumsum(lengths)[:-1], sep_id) if len(docs) > 1 else flat
    body = max_seq_length - 2
    starts = np.arange(0, len(stream), body)
    sizes = np.minimum(body, len(stream) - starts) + 2
    values = np.empty(int(sizes.sum()), dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    values[offsets[:-1]] = cls_id
    values[offsets[1:] - 1] = sep_id
    inner = np.ones(len(values), dtype=bool)
    inner[offsets[:-1]] = False
    inner[offsets[1:] - 1] = False
    values[inner] = stream
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    return pa.table({"input_ids": column})


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab()))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_instances(
    documents: datasets.Dataset,
    tokenizer: Any,
    *,
    nsp: bool,
    max_seq_length: int,
    short_seq_prob: float,
    txt_documents: str,
    seed: int,
    num_proc: int = 1,
) -> datasets.Dataset:
    """Documents -> instances, via a cached ``datasets.map``.

    Columns: ``input_ids``; with NSP also ``token_type_ids`` and ``next_sentence_label``.
    """
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise ValueError("the tokenizer has no [CLS]/[SEP] (cls_token/sep_token) special tokens")
    settings = (INSTANCES_VERSION, documents._fingerprint, tokenizer_fingerprint(tokenizer), nsp,
                max_seq_length, short_seq_prob, txt_documents, seed, _MAP_BATCH)
    fingerprint = hashlib.sha256(repr(settings).encode()).hexdigest()[:32]

    def nsp_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rng = random.Random(f"{seed}-{indices[0]}")  # independent of num_proc
        sentences = [split_sentences(t, txt_documents) for t in batch["text"]]
        flat = encode_plain(tokenizer, [s for doc in sentences for s in doc])
        docs, k = [], 0
        for doc in sentences:
            tokenized = [ids for ids in flat[k:k + len(doc)] if ids]
            k += len(doc)
            if tokenized:
                docs.append(tokenized)
        made = create_nsp_instances(docs, max_seq_length=max_seq_length,
                                    short_seq_prob=short_seq_prob, cls_id=cls_id,
                                    sep_id=sep_id, rng=rng)
        return {"input_ids": [m[0] for m in made], "token_type_ids": [m[1] for m in made],
                "next_sentence_label": [m[2] for m in made]}

    def packed_batch(batch: dict[str, list], indices: list[int]) -> pa.Table:
        # One segment per block: token types are all 0 (collate fills them).
        return pack_arrow(encode_plain(tokenizer, batch["text"]), max_seq_length=max_seq_length,
                          cls_id=cls_id, sep_id=sep_id)

    features: dict[str, Any] = {"input_ids": datasets.Sequence(datasets.Value("int32"))}
    if nsp:
        features["token_type_ids"] = datasets.Sequence(datasets.Value("int8"))
        features["next_sentence_label"] = datasets.Value("int8")
    built = documents.map(
        nsp_batch if nsp else packed_batch,
        batched=True,
        batch_size=_MAP_BATCH,
        with_indices=True,
        remove_columns=documents.column_names,
        features=datasets.Features(features),
        new_fingerprint=fingerprint,
        num_proc=num_proc if num_proc > 1 else None,
        desc="building NSP instances" if nsp else "packing MLM blocks",
    )
    if nsp and len(built):
        report_nsp_balance(built)
    return built


def random_next_share(built: datasets.Dataset) -> float:
    labels = built.data.column("next_sentence_label").to_numpy()
    return float(labels.mean())


def report_nsp_balance(built: datasets.Dataset) -> None:
    """Say how many pairs are random-next: short documents skew Google's algorithm.

    A one-sentence chunk can only get a random B, and sentences a random B
    displaced are often re-read as one-sentence chunks, so corpora of short
    documents (package descriptions, reviews) give far more than 50% random
    pairs, and an NSP accuracy near that share means nothing was learned.
    """
    share = random_next_share(built)
    message = "%d NSP instances, %.1f%% random-next"
    if share > 0.7:
        logger.warning(message + ": the documents are short, so NSP accuracy near %.0f%% is the "
                       "majority class; consider objective.nsp=false", len(built), 100 * share,
                       100 * share)
    else:
        logger.info(message, len(built), 100 * share)


def collate(rows: list[dict[str, Any]], pad_id: int, pad_to_multiple_of: int | None = None
            ) -> dict[str, torch.Tensor]:
    """Pad a list of instances to the longest one (dynamic padding) and stack them."""
    longest = max(len(r["input_ids"]) for r in rows)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    n = len(rows)
    input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((n, longest), dtype=torch.long)
    attention_mask = torch.zeros((n, longest), dtype=torch.long)
    for i, r in enumerate(rows):
        length = len(r["input_ids"])
        input_ids[i, :length] = torch.as_tensor(r["input_ids"], dtype=torch.long)
        if "token_type_ids" in r:
            token_type_ids[i, :length] = torch.as_tensor(r["token_type_ids"], dtype=torch.long)
        attention_mask[i, :length] = 1
    batch = {"input_ids": input_ids, "token_type_ids": token_type_ids,
             "attention_mask": attention_mask}
    if "next_sentence_label" in rows[0]:
        batch["next_sentence_label"] = torch.tensor(
            [r["next_sentence_label"] for r in rows], dtype=torch.long)
    return batch


def lengths(ds: datasets.Dataset, column: str = "input_ids") -> torch.Tensor:
    """Length of every row's list in ``column``, read from Arrow without decoding the rows."""
    import pyarrow.compute as pc

    values = pc.list_value_length(ds.data.column(column)).to_numpy(zero_copy_only=False)
    if ds._indices is not None:  # a selection or mixture of the underlying table
        values = values[ds._indices.column(0).to_numpy()]
    return torch.from_numpy(values.astype("int64"))

