"""Long-text truncation keeps the right ids; heads pool as specified and reload exactly."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from further_pt.data.segments import collate, segment, tokenize, truncate
from further_pt.objectives.heads import Classifier, HeadSpec, load_classifier


def test_truncation_strategies_keep_exact_ids() -> None:
    ids = list(range(1000))
    assert truncate(ids, "head", 510, 128) == list(range(510))
    assert truncate(ids, "tail", 510, 128) == list(range(490, 1000))
    kept = truncate(ids, "head_tail", 510, 128)
    assert kept == list(range(128)) + list(range(1000 - 382, 1000))
    assert truncate(ids[:20], "head_tail", 510, 128) == ids[:20]  # short texts untouched
    assert segment(ids, 300, 3) == [ids[:300], ids[300:600], ids[600:900]]
    assert segment(ids[:10], 300, 3) == [ids[:10]]


def test_tokenize_adds_cls_sep_per_segment(tokenizer) -> None:
    text = " ".join(["the"] * 100)  # one token in any vocabulary trained on English
    ds = datasets.Dataset.from_dict({"text": [text, "short"]})
    kw = dict(text_column="text", text_pair_column=None, labels=[0, 1], max_seq_length=32,
              head_tokens=8, max_segments=3)
    enc = tokenize(ds, tokenizer, strategy="segments", **kw)
    long_row = enc[0]["input_ids"]
    assert len(long_row) == 3 and all(len(p) == 32 for p in long_row)
    assert all(p[0] == tokenizer.cls_token_id and p[-1] == tokenizer.sep_token_id
               for p in long_row)
    assert len(enc[1]["input_ids"]) == 1
    batch = collate([enc[0], enc[1]], pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 3, 32)
    assert batch["segment_mask"].tolist() == [[True, True, True], [True, False, False]]
    plain = tokenize(ds, tokenizer, strategy="head_tail", **kw)
    whole = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert plain[0]["input_ids"][1:-1] == whole[:8] + whole[-22:]


def _classifier(pooling="mean", segment_pooling="mean", hierarchical=False, layers=(-1,),
                combine="concat") -> Classifier:
    torch.manual_seed(0)
    hf = BertForSequenceClassification(BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=40, num_labels=3))
    spec = HeadSpec(pooling=pooling, layers=list(layers), layer_combine=combine,
                    segment_pooling=segment_pooling, dropout=0.0,
                    tasks={"main": ["a", "b", "c"]})
    return Classifier(hf, spec, hierarchical=hierarchical).eval()


@pytest.mark.parametrize("how", ["mean", "max", "attention"])
def test_segment_pooling_ignores_padding_segments(how: str) -> None:
    clf = _classifier(segment_pooling=how, hierarchical=True)
    vectors = torch.randn(2, 3, 16)
    mask = torch.tensor([[True, False, False], [True, True, False]])
    noisy = vectors.clone()
    noisy[~mask] = 1e4  # padding segments: whatever they hold must not matter
    a, b = clf.pool_segments(vectors, mask), clf.pool_segments(noisy, mask)
    assert torch.allclose(a, b)
    assert torch.allclose(a[0], vectors[0, 0])  # one real segment: its own vector
    if how == "mean":
        assert torch.allclose(a[1], vectors[1, :2].mean(0))
    if how == "max":
        assert torch.allclose(a[1], vectors[1, :2].max(0).values)


def test_one_segment_equals_flat_classifier() -> None:
    flat = _classifier()
    hier = _classifier(hierarchical=True)
    hier.load_state_dict(flat.state_dict())
    ids = torch.randint(5, 60, (2, 12))
    attn = torch.ones_like(ids)
    logits_flat = flat(ids, attn)
    logits_hier = hier(ids.unsqueeze(1), attn.unsqueeze(1),
                       segment_mask=torch.ones(2, 1, dtype=torch.bool))
    assert torch.allclose(logits_flat, logits_hier, atol=1e-6)


def test_pooling_and_layer_selection_widths() -> None:
    ids = torch.randint(5, 60, (2, 10))
    attn = torch.ones_like(ids)
    attn[0, 6:] = 0
    cases = [("concat", [-1], "concat", 48),          # [CLS; mean; max] of the last layer
             ("cls_raw", [-3, -2, -1], "concat", 48),  # three layers' [CLS], concatenated
             ("mean", [0, -1], "mean", 16), ("max", [1], "max", 16), ("pooler", [-1], "concat", 16)]
    for pooling, layers, combine, width in cases:
        clf = _classifier(pooling, layers=layers, combine=combine)
        assert clf.heads["main"].in_features == width
        assert clf(ids, attn).shape == (2, 3)
    clf = _classifier("mean")
    out = clf.model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state
    pooled = clf.pool({"input_ids": ids, "attention_mask": attn})
    assert torch.allclose(pooled[0], out[0, :6].mean(0), atol=1e-6)  # padding excluded


def test_custom_head_saves_and_reloads_exactly(tmp_path, tokenizer) -> None:
    clf = _classifier("concat", segment_pooling="attention", hierarchical=True)
    clf.save(tmp_path, tokenizer)
    again = load_classifier(tmp_path).eval()
    ids = torch.randint(5, 60, (2, 2, 10))
    attn = torch.ones_like(ids)
    mask = torch.tensor([[True, True], [True, False]])
    assert torch.equal(clf(ids, attn, segment_mask=mask), again(ids, attn, segment_mask=mask))
