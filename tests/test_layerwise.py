"""Layer-wise learning rates and gradual unfreezing, on exact parameter names."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from further_pt.objectives.layerwise import (
    GradualUnfreezing,
    UnsupportedArchitecture,
    layer_groups,
    optimizer_groups,
)

SMALL = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=50,
             max_position_embeddings=40)


def _bert() -> torch.nn.Module:
    return BertForSequenceClassification(BertConfig(num_hidden_layers=4, num_labels=3, **SMALL))


def _lr_by_name(model, **kw) -> dict[str, float]:
    groups = layer_groups(model, **kw)
    out: dict[str, float] = {}
    for g in groups:
        for name, _ in g.params:
            assert name not in out, f"{name} is in two groups"
            out[name] = g.lr
    return out


def test_bert_four_layers_exact_rates() -> None:
    model = _bert()
    lrs = _lr_by_name(model, lr=2e-5, xi=0.95, head_lr=5e-5)
    assert set(lrs) == {n for n, _ in model.named_parameters()}  # every parameter, once
    assert lrs["bert.encoder.layer.3.attention.self.query.weight"] == 2e-5
    assert lrs["bert.encoder.layer.2.output.dense.bias"] == pytest.approx(2e-5 * 0.95)
    assert lrs["bert.encoder.layer.0.intermediate.dense.weight"] == pytest.approx(2e-5 * 0.95**3)
    assert lrs["bert.embeddings.word_embeddings.weight"] == pytest.approx(2e-5 * 0.95**4)
    assert lrs["bert.embeddings.LayerNorm.weight"] == pytest.approx(2e-5 * 0.95**4)
    assert lrs["bert.pooler.dense.weight"] == 2e-5  # the pooler rides with the top layer
    assert lrs["classifier.weight"] == 5e-5 and lrs["classifier.bias"] == 5e-5


def test_roberta_and_distilbert_are_split_too() -> None:
    roberta = RobertaForSequenceClassification(RobertaConfig(num_hidden_layers=2, num_labels=2,
                                                             pad_token_id=1, **SMALL))
    lrs = _lr_by_name(roberta, lr=1.0, xi=0.5, head_lr=3.0)
    assert set(lrs) == {n for n, _ in roberta.named_parameters()}
    assert lrs["roberta.encoder.layer.1.output.dense.weight"] == 1.0
    assert lrs["roberta.encoder.layer.0.output.dense.weight"] == 0.5
    assert lrs["roberta.embeddings.word_embeddings.weight"] == 0.25
    assert lrs["classifier.dense.weight"] == 3.0 and lrs["classifier.out_proj.bias"] == 3.0
    distil = DistilBertForSequenceClassification(DistilBertConfig(
        n_layers=3, dim=16, n_heads=2, hidden_dim=32, vocab_size=50, max_position_embeddings=40))
    lrs = _lr_by_name(distil, lr=1.0, xi=0.5, head_lr=3.0)
    assert lrs["distilbert.transformer.layer.2.ffn.lin1.weight"] == 1.0
    assert lrs["distilbert.embeddings.word_embeddings.weight"] == 0.125
    assert lrs["pre_classifier.weight"] == 3.0


def test_unsplittable_architecture_is_a_clear_error() -> None:
    with pytest.raises(UnsupportedArchitecture, match="cannot find the embeddings of Linear"):
        layer_groups(torch.nn.Linear(3, 3), lr=1.0, xi=1.0, head_lr=1.0)


def test_optimizer_groups_decay_only_matrices() -> None:
    groups = optimizer_groups(layer_groups(_bert(), lr=1.0, xi=0.9, head_lr=2.0), 0.01)
    for g in groups:
        assert all((p.ndim >= 2) == (g["weight_decay"] == 0.01) for p in g["params"])
    assert {g["name"] for g in groups} == {"embeddings", "layer_0", "layer_1", "layer_2",
                                           "layer_3", "head"}


def test_gradual_unfreezing_changes_only_unfrozen_groups() -> None:
    torch.manual_seed(0)
    model = _bert()
    groups = layer_groups(model, lr=1e-2, xi=1.0, head_lr=1e-2)
    opt = torch.optim.AdamW(optimizer_groups(groups, 0.01))
    unfreezing = GradualUnfreezing(groups, every_steps=2)
    ids = torch.randint(0, 50, (4, 12))
    labels = torch.tensor([0, 1, 2, 1])
    by_group = {g.name: [n for n, _ in g.params] for g in groups}
    params = dict(model.named_parameters())
    expected_trainable = [["head"], ["head"], ["head", "layer_3"], ["head", "layer_3"],
                          ["head", "layer_3", "layer_2"]]
    for step, trainable in enumerate(expected_trainable):
        assert unfreezing.trainable_groups(step) == trainable
        before = {n: p.detach().clone() for n, p in params.items()}
        model(input_ids=ids, labels=labels).loss.backward()
        unfreezing.drop_frozen_grads(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for group, names in by_group.items():
            changed = [not torch.equal(before[n], params[n]) for n in names]
            if group in trainable:
                assert any(changed), f"step {step}: {group} should train"
            else:
                assert not any(changed), f"step {step}: {group} must stay frozen (decay too)"
    assert unfreezing.trainable_groups(1000)[-1] == "embeddings"
