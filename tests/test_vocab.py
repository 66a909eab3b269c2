"""Vocabulary extension: chosen words, new ids, mean-of-pieces init, save/load round trip."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch

from further_pt.data.tokenizer import train_wordpiece
from further_pt.data.vocab import choose_words, extend_model, extend_tokenizer, tokens_per_document
from further_pt.errors import ConfigError

FILLER = ["the", "patient", "had", "a", "and", "was", "with", "of"]
# Domain words and how often each occurs in DOMAIN (capitalised/accented forms included).
FREQ = {"nephrectomy": 8, "laparoscopic": 6, "stent": 5, "ureteroscopy": 5, "cystoscopy": 2}
EXPECTED = [("nephrectomy", 8), ("laparoscopic", 6), ("stent", 5), ("ureteroscopy", 5)]


def _domain() -> list[str]:
    """Documents with exactly FREQ occurrences; numbers and punctuation, frequent, never chosen."""
    words = [w for w, n in FREQ.items() for _ in range(n)]
    words[0], words[8], words[14] = "Nephrectomy", "LAPAROSCOPIC", "Stent"
    words[1] = "Néphrectomy"  # the tokenizer lowercases and strips accents: the same word
    return [f"the patient had a {w} , 2019 -- 3.5 and was with {w2} of ."
            for w, w2 in zip(words[0::2], words[1::2], strict=True)]


@pytest.fixture(scope="module")
def wordpiece():
    """A 110-token WordPiece: filler words whole, every letter and digit, domain words split."""
    letters = string.ascii_lowercase + string.digits
    general = [" ".join(FILLER)] * 50 + [" ".join(letters), letters, letters[::-1], ", . - ;"]
    return train_wordpiece(general, vocab_size=110, lowercase=True, max_seq_length=64)


def _tiny(cls_name: str, tok, **extra):
    import transformers

    torch.manual_seed(0)
    config_cls = (transformers.RobertaConfig if cls_name.startswith("Roberta")
                  else transformers.BertConfig)
    config = config_cls(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=72,
                        pad_token_id=tok.pad_token_id, **extra)
    model = getattr(transformers, cls_name)(config).eval()
    head = model.lm_head if cls_name.startswith("Roberta") else model.cls.predictions
    with torch.no_grad():  # heads start with a zero bias: make it informative, the same in both
        bias = torch.randn(len(tok))
        model.get_output_embeddings().bias.copy_(bias)
        head.bias.copy_(bias)
    return model


def _mean(tensor: torch.Tensor, ids: list[int]) -> torch.Tensor:
    return tensor[ids].float().mean(0).to(tensor.dtype)


def test_preconditions_of_the_toy_corpus(wordpiece):
    for word in FILLER:
        assert wordpiece.tokenize(word) == [word]
    for word in FREQ:
        assert len(wordpiece.tokenize(word)) >= 2 and "[UNK]" not in wordpiece.tokenize(word)
    assert len(wordpiece.tokenize("2019")) >= 2  # frequent and split, but digits: skipped


def test_choose_words_by_frequency_then_word(wordpiece):
    chosen = choose_words(_domain(), wordpiece, max_new_tokens=10, min_frequency=3,
                          progress=False)
    assert [(w, n) for w, _, n in chosen] == EXPECTED  # stent < ureteroscopy at 5
    for word, pieces, _ in chosen:
        assert pieces == wordpiece.tokenize(word)
    top2 = choose_words(iter(_domain()), wordpiece, max_new_tokens=2, min_frequency=3,
                        progress=False)
    assert [w for w, _, _ in top2] == ["nephrectomy", "laparoscopic"]
    low = choose_words(_domain(), wordpiece, max_new_tokens=10, min_frequency=2, progress=False)
    assert [(w, n) for w, _, n in low] == [*EXPECTED, ("cystoscopy", 2)]
    assert choose_words(_domain(), wordpiece, max_new_tokens=10, min_frequency=9,
                        progress=False) == []
    with pytest.raises(ConfigError, match=r"model\.extend_vocab\.min_frequency=0"):
        choose_words(_domain(), wordpiece, max_new_tokens=10, min_frequency=0)


def test_extend_tokenizer_appends_real_vocabulary_words(wordpiece):
    old_len, old_vocab = len(wordpiece), dict(wordpiece.get_vocab())
    chosen = choose_words(_domain(), wordpiece, max_new_tokens=10, min_frequency=3,
                          progress=False)
    new = extend_tokenizer(wordpiece, chosen)
    assert len(wordpiece) == old_len and wordpiece.get_vocab() == old_vocab  # input untouched
    ids = [new.convert_tokens_to_ids(w) for w, _, _ in chosen]
    assert ids == list(range(old_len, old_len + 4)) and len(new) == old_len + 4
    assert all(new.get_vocab()[t] == i for t, i in old_vocab.items())
    for word, _, _ in chosen:
        assert new(word.upper(), add_special_tokens=False)["input_ids"] == [new.get_vocab()[word]]
    assert new.tokenize("stents") == ["stent", "##s"]  # a vocabulary word, not an added token
    assert not set(ids) & set(new("xstent substent", add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match="still encodes"):
        extend_tokenizer(wordpiece, ["a" * 101])  # longer than WordPiece's per-word limit


def test_extend_model_means_tied_and_round_trip(wordpiece, tmp_path: Path):
    from transformers import (
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    chosen = choose_words(_domain(), wordpiece, max_new_tokens=10, min_frequency=3,
                          progress=False)
    new = extend_tokenizer(wordpiece, chosen)
    model = _tiny("BertForPreTraining", wordpiece)
    old_emb = model.get_input_embeddings().weight.detach().clone()
    old_bias = model.cls.predictions.bias.detach().clone()
    extend_model(model, wordpiece, new, chosen)

    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings()
    assert emb.shape[0] == len(new) == model.config.vocab_size
    assert out.weight is emb and out.bias is model.cls.predictions.bias  # still tied
    assert torch.equal(emb[: len(wordpiece)], old_emb)
    assert torch.equal(out.bias[: len(wordpiece)], old_bias)
    for word, pieces, _ in chosen:
        new_id, piece_ids = new.convert_tokens_to_ids(word), wordpiece.convert_tokens_to_ids(pieces)
        assert torch.equal(emb[new_id], _mean(old_emb, piece_ids))
        assert torch.equal(out.bias[new_id], _mean(old_bias, piece_ids))

    folder = tmp_path / "extended"
    model.save_pretrained(folder)
    new.save_pretrained(folder)
    loaded_tok = AutoTokenizer.from_pretrained(folder)
    text = _domain()[0] + " stents"
    assert loaded_tok(text)["input_ids"] == new(text)["input_ids"]
    assert loaded_tok.get_vocab() == new.get_vocab()
    mlm = AutoModelForMaskedLM.from_pretrained(folder).eval()
    assert torch.equal(mlm.get_input_embeddings().weight, emb)
    assert torch.equal(mlm.get_output_embeddings().bias, out.bias)
    assert mlm.get_output_embeddings().weight is mlm.get_input_embeddings().weight
    clf = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    with torch.no_grad():
        logits = clf(**loaded_tok([text], return_tensors="pt")).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


@pytest.mark.parametrize("cls_name", ["BertForMaskedLM", "RobertaForMaskedLM"])
@pytest.mark.parametrize("tied", [True, False])
def test_extend_model_untied_and_roberta(wordpiece, cls_name: str, tied: bool, tmp_path: Path):
    from transformers import AutoModelForMaskedLM

    chosen = choose_words(_domain(), wordpiece, max_new_tokens=3, min_frequency=3,
                          progress=False)
    new = extend_tokenizer(wordpiece, chosen)
    model = _tiny(cls_name, wordpiece, tie_word_embeddings=tied)
    old_emb = model.get_input_embeddings().weight.detach().clone()
    old_dec = model.get_output_embeddings().weight.detach().clone()
    old_bias = model.get_output_embeddings().bias.detach().clone()
    assert torch.equal(old_emb, old_dec) == tied
    extend_model(model, wordpiece, new, chosen, pad_to_multiple_of=8)

    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings()
    rows = -(-len(new) // 8) * 8
    assert len(new) == len(wordpiece) + 3 and rows > len(new)  # padding rows exist
    assert emb.shape[0] == out.weight.shape[0] == out.bias.shape[0] == rows
    assert (out.weight is emb) == tied
    head = model.lm_head if cls_name.startswith("Roberta") else model.cls.predictions
    for word, pieces, _ in chosen:
        new_id, piece_ids = new.convert_tokens_to_ids(word), wordpiece.convert_tokens_to_ids(pieces)
        assert torch.equal(emb[new_id], _mean(old_emb, piece_ids))
        assert torch.equal(out.weight[new_id], _mean(old_dec, piece_ids))
        assert torch.equal(out.bias[new_id], _mean(old_bias, piece_ids))
        assert torch.equal(head.bias[new_id], _mean(old_bias, piece_ids))
    ids = new(_domain()[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    assert logits.shape[-1] == rows and torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_tokens_per_document_falls_by_the_saved_pieces(wordpiece):
    chosen = choose_words(_domain(), wordpiece, max_new_tokens=10, min_frequency=3,
                          progress=False)
    new = extend_tokenizer(wordpiece, chosen)
    docs = _domain()
    before, after = tokens_per_document(docs, wordpiece), tokens_per_document(iter(docs), new,
                                                                              batch_size=3)
    saved = sum(n * (len(pieces) - 1) for _, pieces, n in chosen)
    assert after < before
    assert (before - after) * len(docs) == pytest.approx(saved, abs=1e-9)
    assert tokens_per_document([], new) == 0.0


def test_bpe_words_become_whole_word_added_tokens():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    letters = string.ascii_lowercase
    backend.train_from_iterator([" ".join(FILLER)] * 50 + [letters, letters[::-1]],
                                trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"],
                                                    show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    chosen = choose_words(_domain(), tok, max_new_tokens=10, min_frequency=3, progress=False)
    # Lowercase only, no accent stripping: "néphrectomy" is another word (and has no pieces)
    assert [(w, n) for w, _, n in chosen] == [("nephrectomy", 7), *EXPECTED[1:]]
    new = extend_tokenizer(tok, chosen)
    assert [new.convert_tokens_to_ids(w) for w, _, _ in chosen] == list(range(len(tok),
                                                                              len(tok) + 4))
    assert new("the Stent", add_special_tokens=False)["input_ids"][-1] == len(tok) + 2
    assert len(tok) + 2 not in new("substent", add_special_tokens=False)["input_ids"]


def test_byte_level_bpe_judges_words_as_seen_in_context():
    """'Ġpatient' is one token in running text: not chosen although 'patient' alone splits."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([" ".join(FILLER)] * 50, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert tok.tokenize(" patient") == ["Ġpatient"] and len(tok.tokenize("patient")) >= 2
    docs = ["the patient had a stent and stent , stent"] * 3 + ["stent was"]
    chosen = choose_words(docs, tok, max_new_tokens=5, min_frequency=2, progress=False)
    assert [(w, n) for w, _, n in chosen] == [("stent", 10)]
    assert chosen[0][1] == tok.tokenize("stent")  # the pieces the added token replaces
    new = extend_tokenizer(tok, chosen)
    ids = new(docs[0], add_special_tokens=False)["input_ids"]
    assert ids.count(len(tok)) == 3 and new.decode(ids) == docs[0]
