"""Masking: dynamic MLM masking of a padded batch, redrawn at every step.

For each sequence, ``n = clamp(round(masked_lm_prob * maskable), 1, max_predictions_per_seq)``
positions are chosen among the maskable tokens (not padding, not special tokens) - an
exact count as in Google BERT, not a Bernoulli draw. ``labels`` hold the original token
at chosen positions and -100 elsewhere, so a loss (and a sparse MLM head) needs only the
chosen positions. Three strategies (``objective.masking``) choose them:

``token``
    ``n`` positions uniformly; each becomes ``[MASK]`` (80%), a random token (10%) or
    stays (10%), decided per token.
``whole_word``
    Whole words in random order, each added while the total stays within ``n`` tokens
    (a word that does not fit is passed over), as Google BERT's ``do_whole_word_mask``;
    80/10/10 per token, as there. The count can fall short of ``n`` when no word fits.
``span``
    SpanBERT (Joshi et al. 2020): span lengths in *words* from a geometric
    distribution Geo(p) truncated to ``1..max_span`` and renormalised (SpanBERT's
    ``len_distrib``: mean 3.80 words for p=0.2, max 10), each span starting at a random
    word start, spans never overlapping nor crossing a special token, repeated until
    exactly ``n`` tokens are chosen (the last span is cut to fit, possibly inside a
    word). 80/10/10 is decided per span, as in SpanBERT: all tokens of a span get the
    same treatment (a random replacement draws a random token per position).

Word boundaries come from :func:`word_continuation_table`, a per-vocabulary flag
"this token continues the previous word"; :func:`word_starts` turns it into word starts
of a batch, where the first maskable token after a special token or padding always
starts a word (so ``[CLS] hello`` or ``<s>world`` from a byte-level BPE without
``add_prefix_space`` never glue onto something before them).

All randomness comes from the ``generator`` argument. :class:`MaskingCollate`, the
pretraining stream's collate function, seeds it from (seed, epoch, micro-batch position,
rank): it runs in the DataLoader workers, ahead of the step, and a resumed run masks
exactly as the uninterrupted one would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from further_pt.data import instances
from further_pt.data.order import Rows, step_seed
from further_pt.errors import ConfigError

MASKING_STRATEGIES = ("token", "whole_word", "span")
# Word-boundary markers by scheme: WordPiece marks continuations, the others word starts.
_CONTINUATION, _START = "continuation", "start"
_VOCAB_MARKERS = (("##", _CONTINUATION), ("Ġ", _START), ("▁", _START))
_MIN_MARKER_SHARE = 0.01  # below this share of the vocabulary a marker is noise


def _component_types(component: Any) -> list[dict]:
    """Every ``{"type": ...}`` dict in a tokenizers component (Sequences flattened)."""
    if component is None:
        return []
    try:
        spec = json.loads(component.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return []
    found, stack = [], [spec]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "type" in item:
                found.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def word_boundary_scheme(tokenizer: Any) -> tuple[str, str]:
    """How the tokenizer marks words: ``("continuation", "##")`` or ``("start", "Ġ"|"▁")``.

    Detected, in this order, from the backend (a ``tokenizers`` pipeline) because it is
    authoritative: a WordPiece model - or a BPE with a ``continuing_subword_prefix`` -
    marks continuations with that prefix; a ``ByteLevel`` pre-tokenizer/normalizer/decoder
    marks word starts with ``Ġ`` (GPT-2, RoBERTa); a ``Metaspace`` one with its
    replacement, ``▁`` (SentencePiece Unigram/BPE: T5, XLM-R, ALBERT). Otherwise - slow
    tokenizers, old SentencePiece conversions - the vocabulary decides: the most common
    of the prefixes ``##`` / ``Ġ`` / ``▁`` among non-added tokens, if at least 1% carry it.
    Raises :class:`ConfigError` when none applies: such a tokenizer has no word
    boundaries, so only ``objective.masking=token`` makes sense with it.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = backend.model
        prefix = getattr(model, "continuing_subword_prefix", None)
        if type(model).__name__ == "WordPiece":
            return _CONTINUATION, prefix or "##"
        if type(model).__name__ == "BPE" and prefix:
            return _CONTINUATION, prefix
        for component in (backend.pre_tokenizer, backend.normalizer, backend.decoder):
            for spec in _component_types(component):
                if spec["type"] == "ByteLevel":
                    return _START, "Ġ"
                if spec["type"] == "Metaspace":
                    return _START, spec.get("replacement") or "▁"
    added = set(_added_tokens(tokenizer))
    pieces = [p for p in tokenizer.get_vocab() if p not in added]
    shares = {m: sum(p.startswith(m) for p in pieces) / max(len(pieces), 1)
              for m, _ in _VOCAB_MARKERS}
    marker, kind = max(_VOCAB_MARKERS, key=lambda mk: shares[mk[0]])
    if shares[marker] < _MIN_MARKER_SHARE:
        raise ConfigError(
            f"objective.masking: tokenizer {type(tokenizer).__name__} marks no word "
            "boundaries (no WordPiece/ByteLevel/Metaspace pipeline, no '##'/'Ġ'/'▁' pieces); "
            "use objective.masking=token")
    return kind, marker


def _added_tokens(tokenizer: Any) -> list[str]:
    """Special and added tokens: each is a word of its own, never a continuation."""
    added = list(getattr(tokenizer, "all_special_tokens", []))
    get_added = getattr(tokenizer, "get_added_vocab", None)
    return added + (list(get_added()) if callable(get_added) else [])


def word_continuation_table(tokenizer: Any) -> torch.Tensor:
    """Bool tensor over the vocabulary: True where a token continues the previous word.

    The rule follows :func:`word_boundary_scheme`: with a continuation prefix (WordPiece
    ``##``) a token continues a word iff it has the prefix; with a word-start marker
    (byte-level BPE ``Ġ``, SentencePiece ``▁``) iff it lacks it. Special and added tokens
    never continue a word, and :func:`word_starts` makes the first token after one (or
    at position 0) a word start whatever its spelling. Known limit of the start-marker
    schemes: punctuation glued to a word ("end." -> ``Ġend`` ``.``) counts as part of it.
    """
    kind, marker = word_boundary_scheme(tokenizer)
    vocab = tokenizer.get_vocab()
    table = torch.zeros(max(max(vocab.values()) + 1, len(tokenizer)), dtype=torch.bool)
    added = set(_added_tokens(tokenizer))
    for piece, idx in vocab.items():
        if piece not in added:
            table[idx] = piece.startswith(marker) == (kind == _CONTINUATION)
    return table


def special_ids_tensor(tokenizer: Any) -> torch.Tensor:
    """Ids never masked: the tokenizer's special tokens (padding included)."""
    return torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)


def num_to_mask(maskable: torch.Tensor, masked_lm_prob: float, max_predictions: int
                ) -> torch.Tensor:
    """Per-row count of positions to predict: round(p * maskable) clamped to [1, max]."""
    n = torch.round(maskable.double() * masked_lm_prob).long()
    n = n.clamp(min=1, max=max_predictions)
    return torch.minimum(n, maskable)


def word_starts(input_ids: torch.Tensor, maskable: torch.Tensor, continuation: torch.Tensor
                ) -> torch.Tensor:
    """Bool ``(batch, seq)``: maskable positions that begin a word.

    A maskable token starts a word unless it is a continuation *and* its left neighbour
    is maskable, so a sequence's first real token (after ``[CLS]``/``<s>``/``[SEP]``)
    always starts one, even when a byte-level BPE wrote it without ``Ġ``.
    """
    cont = continuation.to(input_ids.device)[input_ids]
    left = torch.zeros_like(maskable)
    left[:, 1:] = maskable[:, :-1]
    return maskable & ~(cont & left)


def choose_positions(
    maskable: torch.Tensor, n: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Choose exactly ``n[i]`` positions uniformly among ``maskable[i]`` (vectorised)."""
    scores = torch.rand(maskable.shape, generator=generator, device=maskable.device)
    scores = scores.masked_fill(~maskable, 2.0)  # never chosen before a maskable one
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < n.unsqueeze(1)


def _words(starts: list[bool], maskable: list[bool]) -> list[tuple[int, int]]:
    """``(first, end)`` token ranges of a row's words; a word ends at a start or a special."""
    words: list[tuple[int, int]] = []
    for pos, (is_start, ok) in enumerate(zip(starts, maskable, strict=True)):
        if words and words[-1][1] == pos and ok and not is_start:
            words[-1] = (words[-1][0], pos + 1)
        elif ok:
            words.append((pos, pos + 1))
    return words


def choose_whole_words(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    n: torch.Tensor,
    continuation: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Choose whole words, in random order, while the total stays within ``n[i]`` tokens."""
    starts = word_starts(input_ids, maskable, continuation).tolist()
    ok_rows, budgets = maskable.tolist(), n.tolist()
    chosen = torch.zeros_like(maskable)
    for row in range(input_ids.shape[0]):
        words = _words(starts[row], ok_rows[row])
        budget, taken = budgets[row], 0
        order = torch.randperm(len(words), generator=generator, device=generator.device)
        for w in order.tolist():
            if taken >= budget:
                break
            first, end = words[w]
            if taken + end - first > budget:
                continue
            chosen[row, first:end] = True
            taken += end - first
    return chosen


def span_length_probs(p: float, max_span: int) -> list[float]:
    """P(span = k words), k = 1..max_span: Geo(p) truncated at ``max_span``, renormalised."""
    weights = [p * (1 - p) ** (k - 1) for k in range(1, max_span + 1)]
    return [w / sum(weights) for w in weights]


def choose_spans(
    maskable: torch.Tensor,
    word_start: torch.Tensor,
    budget: torch.Tensor,
    generator: torch.Generator,
    *,
    p: float = 0.2,
    max_span: int = 10,
) -> torch.Tensor:
    """SpanBERT spans: Long ``(batch, seq)``, the span's index in its row or -1 if unchosen.

    Per row, until ``budget[i]`` tokens are chosen: draw a length ``L`` in words from
    :func:`span_length_probs`, then a start uniformly among the word starts from which
    ``L`` free words follow without crossing a special token or a chosen word. When no
    start fits ``L`` words, ``L`` shrinks to the longest free run (rare at 15%: it keeps
    the length distribution and still guarantees progress). A span that would pass the
    budget is cut to fit, so the count is exact. Two uniforms per span are drawn up
    front from ``generator`` (a row has at most ``budget`` spans) in one batched call;
    spans are sequential by nature, so rows and spans loop in Python over numpy arrays
    of words (about 2.5 ms for 32 x 128, 6.5 ms for 32 x 512 on one CPU thread).
    """
    if not 0.0 < p <= 1.0:
        raise ConfigError(f"objective.span_geometric_p: {p} is not in (0, 1]")
    if max_span < 1:
        raise ConfigError(f"objective.span_max_words: {max_span} is below 1")
    cdf = np.cumsum(span_length_probs(p, max_span))
    budgets = budget.tolist()
    draws = torch.rand((maskable.shape[0], 2 * max(budgets, default=0)), generator=generator,
                       device=maskable.device).cpu().numpy().astype(np.float64)
    lengths = np.minimum(np.searchsorted(cdf, draws[:, 0::2], side="right") + 1, max_span)
    # a word's last token: maskable, and the next position is no continuation of it
    after = torch.ones_like(maskable)
    after[:, :-1] = word_start[:, 1:] | ~maskable[:, 1:]
    starts_np = word_start.cpu().numpy()
    ends_np = (maskable & after).cpu().numpy()
    span_id = np.full(maskable.shape, -1, dtype=np.int64)
    for row, want in enumerate(budgets):
        firsts = np.flatnonzero(starts_np[row])
        lasts = np.flatnonzero(ends_np[row]) + 1  # exclusive ends, aligned with firsts
        joined = np.append(lasts[:-1] == firsts[1:], False)  # no special token in between
        free = np.ones(len(firsts), dtype=bool)
        index = np.arange(len(firsts))
        taken = k = 0
        while taken < want:
            # run[w]: free words from w on within one segment = (end of w's free run) - w + 1
            run_end = free & ~(joined & np.append(free[1:], False))
            end = np.minimum.accumulate(np.where(run_end, index, len(firsts))[::-1])[::-1]
            run = np.where(free, end - index + 1, 0)
            length = min(int(lengths[row, k]), int(run.max()))
            fits = np.flatnonzero(run >= length)
            first = int(fits[min(int(draws[row, 2 * k + 1] * len(fits)), len(fits) - 1)])
            free[first:first + length] = False
            lo, hi = int(firsts[first]), int(lasts[first + length - 1])
            hi = min(hi, lo + want - taken)
            span_id[row, lo:hi] = k
            taken += hi - lo
            k += 1
    return torch.from_numpy(span_id).to(maskable.device)


def _resolve_strategy(strategy: str | None, continuation: torch.Tensor | None) -> str:
    """``None`` keeps the old keyword contract: whole words iff a table is given."""
    if strategy is None:
        return "token" if continuation is None else "whole_word"
    if strategy not in MASKING_STRATEGIES:
        raise ConfigError(f"objective.masking: {strategy!r} is not one of "
                          f"{', '.join(MASKING_STRATEGIES)}")
    if strategy != "token" and continuation is None:
        raise ConfigError(f"objective.masking={strategy} needs word boundaries: pass "
                          "continuation=word_continuation_table(tokenizer)")
    return strategy


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    special_ids: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    masked_lm_prob: float,
    max_predictions: int,
    generator: torch.Generator,
    continuation: torch.Tensor | None = None,
    strategy: str | None = None,
    span_p: float = 0.2,
    span_max_length: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(masked_input_ids, labels)``; ``input_ids`` is not modified.

    ``strategy`` is one of :data:`MASKING_STRATEGIES`; ``whole_word`` and ``span`` need
    ``continuation`` (:func:`word_continuation_table`), ``token`` ignores it. Left as
    ``None`` it means ``whole_word`` when ``continuation`` is given, else ``token`` (the
    contract before strategies existed). ``span_p``/``span_max_length`` shape the span
    lengths in words (see :func:`choose_spans`).
    """
    strategy = _resolve_strategy(strategy, continuation)
    maskable = attention_mask.bool() & ~torch.isin(input_ids, special_ids.to(input_ids.device))
    n = num_to_mask(maskable.sum(dim=1), masked_lm_prob, max_predictions)
    device = input_ids.device
    if strategy == "span":
        assert continuation is not None  # checked by _resolve_strategy
        span_id = choose_spans(maskable, word_starts(input_ids, maskable, continuation), n,
                               generator, p=span_p, max_span=span_max_length)
        chosen = span_id >= 0
        width = max(int(n.max()), 1) if n.numel() else 1  # a row has at most n spans
        per_span = torch.rand((n.numel(), width), generator=generator, device=device)
        action = per_span.gather(1, span_id.clamp(min=0))  # one 80/10/10 draw per span
    else:
        if strategy == "token":
            chosen = choose_positions(maskable, n, generator)
        else:
            assert continuation is not None
            chosen = choose_whole_words(input_ids, maskable, n, continuation, generator)
        action = torch.rand(input_ids.shape, generator=generator, device=device)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    random_tokens = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device)
    masked = input_ids.clone()
    masked = torch.where(chosen & (action < 0.8), torch.full_like(masked, mask_token_id), masked)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, masked)
    return masked, labels


#: The first part of a masking seed (:func:`~further_pt.data.order.step_seed`), apart from
#: the held-out set's (:data:`further_pt.data.prepare.EVAL_SEED_PART`, -1) and the epochs'.
MASK_SEED_PART = -2


@dataclass(frozen=True)
class MaskingCollate:
    """Pad a micro-batch of instances and mask it: the pretraining stream's collate function.

    It runs where the batch is read - in a DataLoader worker when ``data.dataloader_workers``
    > 0 - so the CPU masks the next batches (whole-word and span masking walk words in
    Python) while the accelerator runs the current step, and nothing in the step waits on
    it. The mask is a pure function of (seed, epoch, position, rank), which the
    :class:`~further_pt.data.order.Rows` carry: a resumed run masks as the uninterrupted
    one did. Picklable (a frozen dataclass of tensors and numbers), as workers need.
    """

    pad_id: int
    pad_to_multiple_of: int | None
    seed: int
    rank: int
    special_ids: torch.Tensor
    mask_token_id: int
    vocab_size: int
    masked_lm_prob: float
    max_predictions: int
    continuation: torch.Tensor | None
    strategy: str
    span_p: float
    span_max_length: int

    def __call__(self, rows: Rows) -> dict[str, torch.Tensor]:
        batch = instances.collate(rows, self.pad_id, self.pad_to_multiple_of)
        gen = torch.Generator().manual_seed(
            step_seed(self.seed, MASK_SEED_PART, rows.epoch, rows.position, self.rank))
        masked_ids, labels = mask_tokens(
            batch["input_ids"], batch["attention_mask"], special_ids=self.special_ids,
            mask_token_id=self.mask_token_id, vocab_size=self.vocab_size,
            masked_lm_prob=self.masked_lm_prob, max_predictions=self.max_predictions,
            continuation=self.continuation, strategy=self.strategy, span_p=self.span_p,
            span_max_length=self.span_max_length, generator=gen)
        return {**batch, "input_ids": masked_ids, "labels": labels}
