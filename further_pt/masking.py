"""Masking: dynamic MLM masking of a padded batch, redrawn at every step.

For each sequence, ``n = clamp(round(masked_lm_prob * maskable), 1, max_predictions_per_seq)``
positions are chosen uniformly among the maskable tokens (not padding, not
special tokens) - an exact count as in Google BERT, not a Bernoulli draw - and
of those 80% become ``[MASK]``, 10% a random token, 10% stay as they are.
``labels`` hold the original token at chosen positions and -100 elsewhere, so a
loss (and a sparse MLM head) needs only the chosen positions.

Whole-word masking chooses whole words instead: words are taken in random order
and added while the total stays within ``n`` tokens (a word that does not fit is
passed over), as Google BERT's ``do_whole_word_mask`` does. A token continues
the previous word when the vocabulary marks it so (``##`` in WordPiece; no
leading ``Ġ``/``▁`` in byte-level BPE and SentencePiece).

All randomness comes from the ``generator`` argument, which the trainer seeds
from (seed, step, micro-batch, rank): a resumed run masks exactly as the
uninterrupted one would.
"""

from __future__ import annotations

from typing import Any

import torch


def word_continuation_table(tokenizer: Any) -> torch.Tensor:
    """Bool tensor over the vocabulary: True where a token continues the previous word."""
    vocab = tokenizer.get_vocab()
    table = torch.zeros(max(max(vocab.values()) + 1, len(tokenizer)), dtype=torch.bool)
    pieces = list(vocab)
    if any(p.startswith("##") for p in pieces):  # WordPiece
        for piece, idx in vocab.items():
            table[idx] = piece.startswith("##")
    else:  # byte-level BPE ("Ġ") or SentencePiece ("▁") mark word *starts*
        marker = "Ġ" if sum(p.startswith("Ġ") for p in pieces) > sum(
            p.startswith("▁") for p in pieces) else "▁"
        special = set(tokenizer.all_special_tokens)
        for piece, idx in vocab.items():
            table[idx] = not piece.startswith(marker) and piece not in special
    return table


def special_ids_tensor(tokenizer: Any) -> torch.Tensor:
    return torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)


def num_to_mask(maskable: torch.Tensor, masked_lm_prob: float, max_predictions: int
                ) -> torch.Tensor:
    """Per-row count of positions to predict: round(p * maskable) clamped to [1, max]."""
    n = torch.round(maskable.double() * masked_lm_prob).long()
    n = n.clamp(min=1, max=max_predictions)
    return torch.minimum(n, maskable)


def choose_positions(
    maskable: torch.Tensor, n: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Choose exactly ``n[i]`` positions uniformly among ``maskable[i]`` (vectorised)."""
    scores = torch.rand(maskable.shape, generator=generator, device=maskable.device)
    scores = scores.masked_fill(~maskable, 2.0)  # never chosen before a maskable one
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < n.unsqueeze(1)


def choose_whole_words(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    n: torch.Tensor,
    continuation: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Choose whole words, in random order, while the total stays within ``n[i]`` tokens."""
    is_cont = continuation.to(input_ids.device)[input_ids] & maskable
    chosen = torch.zeros_like(maskable)
    for row in range(input_ids.shape[0]):
        words: list[list[int]] = []
        prev = -2
        for pos in torch.nonzero(maskable[row]).flatten().tolist():
            if words and prev == pos - 1 and bool(is_cont[row, pos]):
                words[-1].append(pos)
            else:
                words.append([pos])
            prev = pos
        budget = int(n[row])
        order = torch.randperm(len(words), generator=generator, device=generator.device)
        taken = 0
        for w in order.tolist():
            if taken >= budget:
                break
            if taken + len(words[w]) > budget:
                continue
            chosen[row, words[w]] = True
            taken += len(words[w])
    return chosen


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(masked_input_ids, labels)``; ``input_ids`` is not modified."""
    maskable = attention_mask.bool() & ~torch.isin(input_ids, special_ids.to(input_ids.device))
    n = num_to_mask(maskable.sum(dim=1), masked_lm_prob, max_predictions)
    if continuation is None:
        chosen = choose_positions(maskable, n, generator)
    else:
        chosen = choose_whole_words(input_ids, maskable, n, continuation, generator)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    action = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    random_tokens = torch.randint(vocab_size, input_ids.shape, generator=generator,
                                  device=input_ids.device)
    masked = input_ids.clone()
    masked = torch.where(chosen & (action < 0.8), torch.full_like(masked, mask_token_id), masked)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, masked)
    return masked, labels
