"""The sparse MLM head gives the dense loss (to 1e-6), with the HF weight layout untouched."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    RobertaConfig,
    RobertaForMaskedLM,
)

from further_pt.masking import mask_tokens
from further_pt.objective import PretrainingObjective


def _inputs(vocab: int, n: int = 6, length: int = 24):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (n, length), generator=gen)
    attn = torch.ones_like(ids)
    attn[0, 15:] = 0
    ids[:, 0] = 2
    masked, labels = mask_tokens(ids, attn, special_ids=torch.tensor([0, 1, 2, 3, 4]),
                                 mask_token_id=4, vocab_size=vocab, masked_lm_prob=0.15,
                                 max_predictions=20, generator=gen)
    types = torch.zeros_like(ids)
    types[:, 12:] = 1
    return masked, attn, types, labels, torch.tensor([0, 1, 0, 1, 1, 0])


@pytest.mark.parametrize("kind", ["bert-pretraining", "bert-mlm", "roberta-mlm"])
def test_sparse_equals_dense(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "roberta-mlm":
        net = RobertaForMaskedLM(RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64,
                                               max_position_embeddings=40, pad_token_id=1))
    else:
        cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=40)
        net = BertForPreTraining(cfg) if kind == "bert-pretraining" else BertForMaskedLM(cfg)
    net.eval()
    nsp = kind == "bert-pretraining"
    masked, attn, types, labels, nsp_labels = _inputs(100)
    sparse = PretrainingObjective(net, nsp=nsp, sparse=True)
    dense = PretrainingObjective(net, nsp=nsp, sparse=False)
    assert sparse.sparse and not dense.sparse
    a = sparse(masked, attn, types, labels, nsp_labels if nsp else None)
    b = dense(masked, attn, types, labels, nsp_labels if nsp else None)
    assert abs(a.mlm.item() - b.mlm.item()) < 1e-6
    assert abs(a.total.item() - b.total.item()) < 1e-6
    if nsp:
        assert a.nsp_correct.item() == b.nsp_correct.item()
    # The gradients agree too.
    a.total.backward()
    grads_sparse = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    net.zero_grad()
    dense(masked, attn, types, labels, nsp_labels if nsp else None).total.backward()
    grads_dense = [p.grad for p in net.parameters() if p.grad is not None]
    pairs = zip(grads_sparse, grads_dense, strict=True)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in pairs)
    # The objective's parameters are the HF model's, under the same names.
    assert [n.removeprefix("model.") for n, _ in sparse.named_parameters()] == [
        n for n, _ in net.named_parameters()]
