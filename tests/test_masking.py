"""Masking: exact counts, 80/10/10, specials never masked, word boundaries, SpanBERT spans."""

from __future__ import annotations

import pytest
import torch

from further_pt.data.masking import (
    choose_spans,
    choose_whole_words,
    mask_tokens,
    num_to_mask,
    word_boundary_scheme,
    word_continuation_table,
    word_starts,
)
from further_pt.errors import ConfigError

PAD, CLS, SEP, MASK, VOCAB = 0, 2, 3, 4, 500


def _batch(n: int = 64, length: int = 128, seed: int = 0, min_length: int = 20
           ) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, VOCAB, (n, length), generator=gen)
    lengths = torch.randint(min_length, length + 1, (n,), generator=gen)
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


# --- word boundaries: WordPiece "##", byte-level BPE "Ġ", SentencePiece "▁" ---------------

def _wrap(tok, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def test_wordpiece_continuations_are_the_hash_pieces() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "##s", "play",
              "##ing", "##ed", "#", "s"]
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf = _wrap(tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
               sep_token="[SEP]", mask_token="[MASK]")
    assert word_boundary_scheme(hf) == ("continuation", "##")
    assert torch.nonzero(word_continuation_table(hf)).flatten().tolist() == [7, 9, 10]
    ids = [2, *tok.encode("the cats playing", add_special_tokens=False).ids, 3]
    assert ids == [2, 5, 6, 7, 8, 9, 3]


def _byte_level_bpe():
    from tokenizers import Tokenizer, models, pre_tokenizers

    pieces = ["<s>", "</s>", "<pad>", "<mask>", "<unk>", "Ġ", "t", "h", "e", "c", "a", "s",
              "Ġt", "Ġth", "Ġthe", "ca", "cat", "Ġcat"]
    merges = [("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e"), ("c", "a"), ("ca", "t"), ("Ġ", "cat")]
    tok = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tok, _wrap(tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                      mask_token="<mask>", unk_token="<unk>")


def test_byte_level_bpe_continuations_lack_the_g_marker_and_first_token_starts() -> None:
    tok, hf = _byte_level_bpe()
    assert word_boundary_scheme(hf) == ("start", "Ġ")
    table = word_continuation_table(hf)
    # t h e c a s ca cat: no "Ġ" and not special
    assert torch.nonzero(table).flatten().tolist() == [6, 7, 8, 9, 10, 11, 15, 16]
    body = tok.encode("cats the cat", add_special_tokens=False).ids
    assert body == [16, 11, 14, 17]  # cat s Ġthe Ġcat: the first word has no "Ġ"
    ids = torch.tensor([[0, *body, 1, *body, 1, 2]])  # <s> A </s> B </s> <pad>
    attn = (ids != 2).long()
    maskable = attn.bool() & ~torch.isin(ids, torch.tensor([0, 1, 2, 3, 4]))
    starts = word_starts(ids, maskable, table)
    # "cat" after <s> and after </s> starts a word although the table calls it a continuation
    assert starts[0].tolist() == [False, True, False, True, True, False,
                                  True, False, True, True, False, False]


def test_unigram_metaspace_continuations_lack_the_underscore_marker() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    pieces = ["<unk>", "<pad>", "<s>", "</s>", "<mask>", "▁the", "▁cat", "s", "▁", "c", "a",
              "t", "h", "e"]
    tok = Tokenizer(models.Unigram([(p, -float(i)) for i, p in enumerate(pieces)], unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    hf = _wrap(tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
               mask_token="<mask>")
    assert word_boundary_scheme(hf) == ("start", "▁")
    assert torch.nonzero(word_continuation_table(hf)).flatten().tolist() == [7, 9, 10, 11, 12, 13]
    assert tok.encode("cats the", add_special_tokens=False).ids == [6, 7, 5]


class _VocabOnly:
    """A tokenizer without a ``tokenizers`` backend: the vocabulary decides."""

    def __init__(self, pieces: list[str]) -> None:
        self.all_special_tokens = ["<pad>", "<unk>"]
        self.vocab = {p: i for i, p in enumerate(pieces)}

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)


def test_vocabulary_fallback_and_no_markers_is_a_config_error() -> None:
    sp = _VocabOnly(["<pad>", "<unk>", "▁a", "b", "▁c", "d"])
    assert word_boundary_scheme(sp) == ("start", "▁")
    assert word_continuation_table(sp).tolist() == [False, False, False, True, False, True]
    wp = _VocabOnly(["<pad>", "<unk>", "a", "##b", "##c", "Ġc"])  # "##" is the commonest
    assert word_boundary_scheme(wp) == ("continuation", "##")
    assert word_continuation_table(wp).tolist() == [False, False, False, True, True, False]
    with pytest.raises(ConfigError, match=r"objective\.masking"):
        word_continuation_table(_VocabOnly(["<pad>", "<unk>", "a", "b", "c"]))


# --- span masking (SpanBERT) --------------------------------------------------------------

SPECIAL = torch.tensor([PAD, 1, CLS, SEP, MASK])
CONT = torch.tensor([i >= 10 and i % 3 == 0 for i in range(VOCAB)])  # 1 token in 3 continues


def _pairs(n: int, length: int, seed: int, min_length: int = 20
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Like ``_batch`` with a [SEP] in the middle of every row: spans must not cross it."""
    ids, attn = _batch(n=n, length=length, seed=seed, min_length=min_length)
    lengths = attn.sum(1)
    ids[torch.arange(n), lengths // 2] = SEP
    return ids, attn


def _spans(ids, attn, seed, prob=0.15, cap=20):
    maskable = attn.bool() & ~torch.isin(ids, SPECIAL)
    starts = word_starts(ids, maskable, CONT)
    n = num_to_mask(maskable.sum(1), prob, cap)
    span_id = choose_spans(maskable, starts, n, torch.Generator().manual_seed(seed))
    return span_id, maskable, starts, n


def _span_table(span_id, starts):
    """Per (row, span): first, last, tokens, words, whether it is the row's last span."""
    rows, pos = torch.nonzero(span_id >= 0, as_tuple=True)
    width = int(span_id.max()) + 1
    key = rows * width + span_id[rows, pos]
    size = span_id.shape[0] * width

    def reduce(values, how, init):
        out = torch.full((size,), init, dtype=torch.long)
        return out.scatter_reduce(0, key, values, how, include_self=False)

    first, last = reduce(pos, "amin", -1), reduce(pos, "amax", -1)
    tokens = torch.zeros(size, dtype=torch.long).scatter_add(0, key, torch.ones_like(pos))
    words = torch.zeros(size, dtype=torch.long).scatter_add(0, key, starts[rows, pos].long())
    present = tokens > 0
    span_rows = torch.arange(size) // width
    is_last = (torch.arange(size) % width) == (span_id.max(1).values[span_rows])
    index = torch.arange(size) % width
    return (first[present], last[present], tokens[present], words[present], is_last[present],
            span_rows[present], index[present])


def test_span_counts_exact_and_never_special_or_padding() -> None:
    ids, attn = _pairs(256, 128, seed=3)
    masked, labels = _mask(ids, attn, 3, strategy="span", continuation=CONT)
    maskable = attn.bool() & ~torch.isin(ids, SPECIAL)
    chosen = labels != -100
    assert torch.equal(chosen.sum(1), num_to_mask(maskable.sum(1), 0.15, 20))
    assert not chosen[~maskable].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_spans_are_contiguous_word_aligned_and_geometric_in_words() -> None:
    short_ids, short_attn = _pairs(384, 512, seed=5)  # 20..512 tokens
    full_ids, full_attn = _pairs(640, 512, seed=6, min_length=512)  # budget 77 tokens
    ids, attn = torch.cat([full_ids, short_ids]), torch.cat([full_attn, short_attn])
    span_id, maskable, starts, n = _spans(ids, attn, 5, cap=10_000)
    assert torch.equal((span_id >= 0).sum(1), n)  # exact count, also uncapped
    assert not (span_id[~maskable] >= 0).any()
    first, last, tokens, words, is_last, rows, index = _span_table(span_id, starts)
    assert torch.equal(last - first + 1, tokens)  # one run each: no overlap, no gaps
    assert starts[rows, first].all()  # every span begins at a word start
    after = (last + 1).clamp(max=ids.shape[1] - 1)
    ends_word = (last + 1 == ids.shape[1]) | ~maskable[rows, after] | starts[rows, after]
    assert ends_word[~is_last].all()  # only a row's last span may be cut inside a word
    assert int(words.max()) == 10 and int(words.min()) == 1
    # Lengths: only the first 5 spans of the full rows. Leaving out just each row's last
    # (cut) span would bias short, since the span that crosses the budget is size-biased;
    # 5 spans of <= 10 words cannot fill a 77-token budget, so these are never cut.
    whole = words[(rows < 640) & (index < 5)].double()
    assert not is_last[(rows < 640) & (index < 5)].any()
    p, q, m = 0.2, 0.8, 10
    expected = (1 - (m + 1) * q**m + m * q ** (m + 1)) / (p * (1 - q**m))  # truncated Geo
    assert abs(expected - 3.797) < 1e-3  # SpanBERT's "mean 3.8"
    assert len(whole) == 3200
    assert abs(whole.mean().item() / expected - 1) < 0.03
    assert abs((whole == 1).double().mean().item() - p / (1 - q**m)) < 0.02
    assert abs((whole == 10).double().mean().item() - p * q**9 / (1 - q**m)) < 0.01


def _per_span(flag: torch.Tensor, inverse: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Share of each span's tokens where ``flag`` holds."""
    return torch.zeros(len(count)).scatter_add(0, inverse, flag.float()) / count


def test_span_80_10_10_decided_per_span() -> None:
    kinds = torch.zeros(3)
    for seed in range(4):
        ids, attn = _pairs(512, 128, seed=seed)
        # [MASK] outside the random range: a randomised span can never show a [MASK]
        masked, labels = _mask(ids, attn, seed, strategy="span", continuation=CONT,
                               mask_token_id=VOCAB)
        span_id = _spans(ids, attn, seed)[0]  # same generator seed: same spans
        assert torch.equal(span_id >= 0, labels != -100)
        rows, pos = torch.nonzero(span_id >= 0, as_tuple=True)
        key = rows * 1000 + span_id[rows, pos]
        spans, inverse = torch.unique(key, return_inverse=True)
        count = torch.zeros(len(spans)).scatter_add(0, inverse, torch.ones(len(key)))
        is_mask = _per_span(masked[rows, pos] == VOCAB, inverse, count)
        changed = _per_span(masked[rows, pos] != ids[rows, pos], inverse, count)
        assert ((is_mask == 0) | (is_mask == 1)).all()  # a span is masked whole or not at all
        kinds += torch.tensor([(is_mask == 1).sum(), ((is_mask == 0) & (changed > 0)).sum(),
                               (changed == 0).sum()])
    share = kinds / kinds.sum()
    assert kinds.sum() > 5000
    assert abs(share[0] - 0.8) < 0.03 and abs(share[1] - 0.1) < 0.03
    assert abs(share[2] - 0.1) < 0.03


def test_span_deterministic_and_strategy_contract() -> None:
    ids, attn = _pairs(32, 128, seed=9)
    a = _mask(ids, attn, 1, strategy="span", continuation=CONT)
    b = _mask(ids, attn, 1, strategy="span", continuation=CONT)
    c = _mask(ids, attn, 2, strategy="span", continuation=CONT)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    # the old keyword contract: a table alone means whole words; "token" ignores the table
    old = _mask(ids, attn, 4, continuation=CONT)
    new = _mask(ids, attn, 4, continuation=CONT, strategy="whole_word")
    assert torch.equal(old[0], new[0]) and torch.equal(old[1], new[1])
    plain = _mask(ids, attn, 4)
    token = _mask(ids, attn, 4, continuation=CONT, strategy="token")
    assert torch.equal(plain[0], token[0]) and torch.equal(plain[1], token[1])
    with pytest.raises(ConfigError, match=r"objective\.masking"):
        _mask(ids, attn, 4, strategy="spans", continuation=CONT)
    with pytest.raises(ConfigError, match=r"objective\.masking=span"):
        _mask(ids, attn, 4, strategy="span")
    with pytest.raises(ConfigError, match=r"objective\.span_geometric_p"):
        _mask(ids, attn, 4, strategy="span", continuation=CONT, span_p=0.0)


def test_first_real_token_starts_a_word_for_whole_word_masking() -> None:
    # row: [CLS] ##x a ##b [SEP] ##y [SEP]: every continuation right after a special is a start
    ids = torch.tensor([[CLS, 12, 10, 15, SEP, 18, SEP]])
    maskable = ~torch.isin(ids, SPECIAL)
    assert word_starts(ids, maskable, CONT)[0].tolist() == [False, True, True, False, False,
                                                            True, False]
    chosen = choose_whole_words(ids, maskable, torch.tensor([2]), CONT,
                                torch.Generator().manual_seed(0))
    assert int(chosen.sum()) == 2 and chosen[0, 2] == chosen[0, 3]
