"""MLM-only further pretraining runs for six encoder families, sparse head == dense head.

Each architecture is a tiny random model built from its config through
``model.new_pretraining_model`` (as ``model.from_scratch``/a fresh run would), with a
tokenizer of the kind its checkpoints use, trained here with ``tokenizers``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    DebertaV2Config,
    DebertaV2Tokenizer,
    DistilBertConfig,
    ElectraConfig,
    ElectraForPreTraining,
    ModernBertConfig,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaTokenizer,
)

from further_pt.data.masking import mask_tokens, special_ids_tensor
from further_pt.errors import ConfigError
from further_pt.objectives import encoder as M
from further_pt.objectives.mlm_loss import PretrainingObjective

SEQ = 40
ARCHS = ["bert", "roberta", "distilbert", "electra", "deberta_v2", "modernbert"]
MLM_CLASS = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM",
             "distilbert": "DistilBertForMaskedLM", "electra": "ElectraForMaskedLM",
             "deberta_v2": "DebertaV2ForMaskedLM", "modernbert": "ModernBertForMaskedLM"}
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 64, "max_position_embeddings": 64}


def _bpe(docs: list[str], specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _roberta_tokenizer(docs: list[str]) -> Any:
    tok = _bpe(docs, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    merges = [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    return RobertaTokenizer(vocab=tok.get_vocab(), merges=merges, model_max_length=SEQ)


def _modernbert_tokenizer(docs: list[str]) -> Any:
    """As ModernBERT's hub tokenizer: byte-level BPE with BERT's special-token names."""
    tok = _bpe(docs, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def _deberta_tokenizer(docs: list[str]) -> Any:
    """DebertaV2Tokenizer (v5: a Unigram ``tokenizers`` backend) from a trained Unigram vocab."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(docs, trainers.UnigramTrainer(
        vocab_size=600, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        unk_token="[UNK]", show_progress=False))
    vocab = [(piece, score) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]
    return DebertaV2Tokenizer(vocab=vocab)


def _config(arch: str, tok: Any) -> Any:
    ids = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id}
    if arch == "bert":
        from transformers import BertConfig
        return BertConfig(**SMALL, **ids)
    if arch == "roberta":
        return RobertaConfig(**SMALL, **ids)
    if arch == "distilbert":
        return DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                max_position_embeddings=64, **ids)
    if arch == "electra":  # embedding_size < hidden: exercises the generator's projections
        return ElectraConfig(embedding_size=16, **SMALL, **ids)
    if arch == "deberta_v2":  # v3-style: relative attention only, no absolute positions
        return DebertaV2Config(**SMALL, **ids, relative_attention=True, position_buckets=16,
                               pos_att_type=["p2c", "c2p"], position_biased_input=False,
                               norm_rel_ebd="layer_norm", share_att_key=True)
    # ModernBERT: a 16-token local window < SEQ, so the sliding layer really is local.
    return ModernBertConfig(**SMALL, **ids, local_attention=16, global_attn_every_n_layers=2,
                            bos_token_id=tok.cls_token_id, cls_token_id=tok.cls_token_id,
                            eos_token_id=tok.sep_token_id, sep_token_id=tok.sep_token_id)


@pytest.fixture(scope="module")
def tokenizers_by_arch(docs: list[str], tokenizer: Any) -> dict[str, Any]:
    texts = docs[:400]
    bpe = _roberta_tokenizer(texts)
    return {"bert": tokenizer, "distilbert": tokenizer, "electra": tokenizer, "roberta": bpe,
            "deberta_v2": _deberta_tokenizer(texts), "modernbert": _modernbert_tokenizer(texts)}


def _batch(tok: Any, docs: list[str], prob: float = 0.15, max_predictions: int = 20):
    texts = [d for d in docs if len(d) > 40][:6]
    texts[0] = texts[0][:60]  # one short row: padding in the batch
    enc = tok(texts, truncation=True, max_length=SEQ, padding=True, return_tensors="pt")
    ids, attn = enc["input_ids"], enc["attention_mask"]
    assert (attn == 0).any()
    masked, labels = mask_tokens(
        ids, attn, special_ids=special_ids_tensor(tok), mask_token_id=tok.mask_token_id,
        vocab_size=len(tok), masked_lm_prob=prob, max_predictions=max_predictions,
        generator=torch.Generator().manual_seed(0))
    types = torch.zeros_like(ids)
    types[:, ids.shape[1] // 2:] = 1
    return ids, masked, attn, types, labels


def _grads(net: torch.nn.Module) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    net.zero_grad()
    return grads


@pytest.mark.parametrize("arch", ARCHS, ids=ARCHS)
def test_sparse_mlm_matches_dense_and_trains(arch: str, tokenizers_by_arch: dict[str, Any],
                                             docs: list[str]) -> None:
    tok = tokenizers_by_arch[arch]
    config = _config(arch, tok)
    M.check_compatible(config, tok, SEQ)
    assert M.pretraining_class(config, nsp=False).__name__ == "AutoModelForMaskedLM"
    torch.manual_seed(0)
    net = M.new_pretraining_model(config, nsp=False, attn_implementation="sdpa")
    assert type(net).__name__ == MLM_CLASS[arch]
    net.eval()  # no dropout: the two paths see the same network
    _, masked, attn, types, labels = _batch(tok, docs)
    sparse = PretrainingObjective(net, nsp=False, max_predictions=SEQ)
    dense = PretrainingObjective(net, nsp=False, max_predictions=SEQ, sparse=False)
    assert sparse.sparse and not dense.sparse

    a = sparse(masked, attn, types, labels)
    a.total.backward()
    grads_sparse = _grads(net)
    b = dense(masked, attn, types, labels)
    b.total.backward()
    grads_dense = _grads(net)
    assert abs(a.mlm.item() - b.mlm.item()) < 1e-5
    assert 0.8 * torch.log(torch.tensor(len(tok))).item() < a.mlm.item() < 10  # untrained
    assert len(grads_sparse) == len(grads_dense) > 10
    for x, y in zip(grads_sparse, grads_dense, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    # The dense path (labels -100 ignored) is the HF model's own loss.
    inputs = {"input_ids": masked, "attention_mask": attn}
    if sparse.token_types:
        inputs["token_type_ids"] = types
    assert abs(net(**inputs, labels=labels).loss.item() - b.mlm.item()) < 1e-5
    # The objective's parameters are the HF model's, under the same names.
    assert [n.removeprefix("model.") for n, _ in sparse.named_parameters()] == [
        n for n, _ in net.named_parameters()]

    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    sparse(masked, attn, types, labels).total.backward()
    opt.step()
    with torch.no_grad():
        after = sparse(masked, attn, types, labels).mlm.item()
    assert after < a.mlm.item() - 0.05


def test_deberta_non_legacy_head_is_sparse(tokenizers_by_arch: dict[str, Any],
                                           docs: list[str]) -> None:
    """``legacy: false`` DeBERTa-v2 projects onto the input embeddings given at call time."""
    tok = tokenizers_by_arch["deberta_v2"]
    config = _config("deberta_v2", tok)
    config.legacy = False
    torch.manual_seed(0)
    net = M.new_pretraining_model(config, nsp=False, attn_implementation=None).eval()
    _, masked, attn, types, labels = _batch(tok, docs)
    a = PretrainingObjective(net, nsp=False, max_predictions=SEQ)(masked, attn, types, labels)
    dense = PretrainingObjective(net, nsp=False, max_predictions=SEQ, sparse=False)
    b = dense(masked, attn, types, labels)
    assert abs(a.mlm.item() - b.mlm.item()) < 1e-5


def test_masked_lm_prob_03_count(tokenizers_by_arch: dict[str, Any], docs: list[str]) -> None:
    """ModernBERT's 30%: each row gets exactly round(0.3 * maskable) predictions, capped."""
    tok = tokenizers_by_arch["modernbert"]
    ids, _, attn, _, labels = _batch(tok, docs, prob=0.3, max_predictions=10)
    maskable = (attn.bool() & ~torch.isin(ids, special_ids_tensor(tok))).sum(1).tolist()
    expected = [min(max(round(0.3 * n), 1), 10) for n in maskable]
    assert (labels != -100).sum(1).tolist() == expected
    assert 10 in expected and any(e < 10 for e in expected)  # both cases occur
    assert ((labels != -100) <= attn.bool()).all()


def test_position_limits(tokenizers_by_arch: dict[str, Any]) -> None:
    """RoBERTa loses pad+1 positions; DeBERTa-v3 relative-only has no table to overrun."""
    limits = {a: M.position_limit(_config(a, tokenizers_by_arch[a])) for a in ARCHS}
    assert limits == {"bert": 64, "roberta": 62, "distilbert": 64, "electra": 64,
                      "deberta_v2": None, "modernbert": 64}
    tok = tokenizers_by_arch["roberta"]
    M.check_compatible(_config("roberta", tok), tok, 62)
    with pytest.raises(ConfigError, match="max_seq_length=63 exceeds the model's 62"):
        M.check_compatible(_config("roberta", tok), tok, 63)
    with pytest.raises(ConfigError, match="'roberta' models have no NSP head"):
        M.pretraining_class(_config("roberta", tok), nsp=True)


def test_attn_and_head_warnings(tmp_path, tokenizer: Any, tokenizers_by_arch: dict[str, Any],
                                caplog: pytest.LogCaptureFixture) -> None:
    """sdpa falls back to eager for DeBERTa-v2; a discriminator's missing MLM head is reported."""
    deberta = _config("deberta_v2", tokenizers_by_arch["deberta_v2"])
    assert M.resolve_attn_implementation(deberta, False, "sdpa") == "eager"
    with pytest.raises(ConfigError, match=r"model\.attn_implementation"):
        M.new_pretraining_model(deberta, nsp=False, attn_implementation="flex_attention")
    electra = _config("electra", tokenizer)
    assert M.resolve_attn_implementation(electra, False, "sdpa") == "sdpa"
    assert M.resolve_attn_implementation(electra, False, "auto") is None
    ElectraForPreTraining(electra).save_pretrained(tmp_path)  # a discriminator checkpoint
    net, new_heads = M.load_pretraining_model(tmp_path, electra, nsp=False,
                                              attn_implementation="sdpa",
                                              trust_remote_code=False)
    assert type(net).__name__ == "ElectraForMaskedLM"
    # The generator head is new (the head warm-up trains it first); the encoder is loaded.
    assert new_heads and all(n.startswith("generator_") for n in new_heads)
    assert "generator_predictions.dense.weight" in new_heads
