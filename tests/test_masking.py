"""Masking statistics: exact counts, 80/10/10, special tokens and padding never masked."""

from __future__ import annotations

import torch

from further_pt.masking import mask_tokens, num_to_mask, word_continuation_table

PAD, CLS, SEP, MASK, VOCAB = 0, 2, 3, 4, 500


def _batch(n: int = 64, length: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, VOCAB, (n, length), generator=gen)
    lengths = torch.randint(20, length + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(n), lengths - 1] = SEP
    ids[mask == 0] = PAD
    return ids, mask


def _mask(ids, attn, seed, **kw):
    params = dict(special_ids=torch.tensor([PAD, 1, CLS, SEP, MASK]), mask_token_id=MASK,
                  vocab_size=VOCAB, masked_lm_prob=0.15, max_predictions=20,
                  generator=torch.Generator().manual_seed(seed))
    params.update(kw)
    return mask_tokens(ids, attn, **params)


def test_exact_counts_capped_at_max_predictions() -> None:
    ids, attn = _batch()
    _, labels = _mask(ids, attn, 0)
    maskable = (attn.bool() & (ids != CLS) & (ids != SEP)).sum(1)
    expected = torch.clamp(torch.round(maskable * 0.15), 1, 20)
    assert torch.equal((labels != -100).sum(1), expected.long())
    assert num_to_mask(torch.tensor([200]), 0.15, 20).item() == 20
    assert num_to_mask(torch.tensor([3]), 0.15, 20).item() == 1  # at least one


def test_fifteen_percent_without_cap() -> None:
    ids, attn = _batch(n=256)
    _, labels = _mask(ids, attn, 1, max_predictions=10_000)
    maskable = (attn.bool() & (ids != CLS) & (ids != SEP)).sum()
    share = (labels != -100).sum().item() / maskable.item()
    assert abs(share - 0.15) < 0.005


def test_special_tokens_and_padding_never_masked_and_labels_only_there() -> None:
    ids, attn = _batch()
    masked, labels = _mask(ids, attn, 2)
    chosen = labels != -100
    assert not chosen[(ids == CLS) | (ids == SEP) | (attn == 0)].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])  # unchosen positions untouched


def test_80_10_10() -> None:
    replaced = randomised = kept = 0
    for seed in range(20):
        ids, attn = _batch(seed=seed)
        masked, labels = _mask(ids, attn, seed)
        chosen = labels != -100
        is_mask = masked[chosen] == MASK
        same = masked[chosen] == ids[chosen]
        replaced += is_mask.sum().item()
        kept += (same & ~is_mask).sum().item()
        randomised += (~same & ~is_mask).sum().item()
    total = replaced + kept + randomised
    assert abs(replaced / total - 0.8) < 0.02
    # a random token equals the original 1/VOCAB of the time: counted as kept
    assert abs(randomised / total - 0.1) < 0.015
    assert abs(kept / total - 0.1) < 0.015


def test_same_generator_seed_same_masks() -> None:
    ids, attn = _batch()
    a = _mask(ids, attn, 7)
    b = _mask(ids, attn, 7)
    c = _mask(ids, attn, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_whole_word_masking_takes_whole_words(tokenizer) -> None:
    table = word_continuation_table(tokenizer)
    text = ["the multiprocessing interpreter serializes subclasses asynchronously " * 6] * 8
    enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=64, padding=True)
    ids, attn = enc["input_ids"], enc["attention_mask"]
    assert table[ids].any(), "the text must contain multi-piece words"
    special = torch.tensor(tokenizer.all_special_ids)
    _, labels = mask_tokens(ids, attn, special_ids=special, mask_token_id=tokenizer.mask_token_id,
                            vocab_size=len(tokenizer), masked_lm_prob=0.15, max_predictions=20,
                            generator=torch.Generator().manual_seed(0), continuation=table)
    chosen = labels != -100
    for row in range(ids.shape[0]):
        n_max = num_to_mask((attn[row].bool() & ~torch.isin(ids[row], special)).sum(), 0.15, 20)
        assert 0 < chosen[row].sum() <= n_max
        for pos in range(1, ids.shape[1]):
            if table[ids[row, pos]] and attn[row, pos]:  # a continuation piece...
                assert chosen[row, pos] == chosen[row, pos - 1]  # ...goes with its word
