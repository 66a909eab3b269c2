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

from further_pt.data.masking import mask_tokens
from further_pt.objectives.mlm_loss import PretrainingObjective, masked_positions


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
    sparse = PretrainingObjective(net, nsp=nsp, max_predictions=20, sparse=True)
    dense = PretrainingObjective(net, nsp=nsp, max_predictions=20, sparse=False)
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


def test_masked_positions_are_fixed_size_and_the_loss_is_the_hf_dense_loss() -> None:
    """[batch, max_predictions] positions gathered (labels -100 on the filler) give the loss of
    the HF model's own head over every position, to 1e-6."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=40)
    net = BertForMaskedLM(cfg).eval()
    masked, attn, types, labels, _ = _inputs(100)
    positions, targets = masked_positions(labels, 20)
    assert positions.shape == targets.shape == (6, 20)
    for row in range(6):  # each row's labelled positions first, in order; then fillers
        chosen = (labels[row] != -100).nonzero().flatten()
        assert positions[row, :len(chosen)].tolist() == chosen.tolist()
        assert (targets[row, len(chosen):] == -100).all()
    ours = PretrainingObjective(net, nsp=False, max_predictions=20)(masked, attn, types, labels)
    hf = net(input_ids=masked, attention_mask=attn, token_type_ids=types, labels=labels).loss
    assert abs(ours.mlm.item() - hf.item()) < 1e-6


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_mlm_loss_path_compiles_as_one_graph_for_every_masking(sparse: bool) -> None:
    """No host sync on the device path: torch.compile(fullgraph=True) raises at any graph break
    (.item(), .tolist(), .cpu()), and the graph holds no data-dependent shape (an unbacked
    symbol: a boolean index, nonzero - the GPU must finish to know the size). Masking itself
    runs on the host, in the stream's collate (data.masking.MaskingCollate), for each strategy."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    data_dependent: list[str] = []

    def inspect_graph(gm, example_inputs):
        for node in gm.graph.nodes:
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor) and free_unbacked_symbols(value.shape):
                data_dependent.append(node.format_node())
        return gm.forward

    torch.manual_seed(0)
    vocab = 100
    net = BertForPreTraining(BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=40)).eval()
    objective = PretrainingObjective(net, nsp=True, max_predictions=20, sparse=sparse)
    compiled = torch.compile(objective, fullgraph=True, backend=inspect_graph, dynamic=False)
    continuation = torch.zeros(vocab, dtype=torch.bool)
    continuation[60:] = True  # ids >= 60 continue a word: words of 1-3 tokens below
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (6, 24), generator=gen)
    ids[:, 0] = 2
    attn = torch.ones_like(ids)
    attn[0, 15:] = 0
    types = torch.zeros_like(ids)
    nsp_labels = torch.tensor([0, 1, 0, 1, 1, 0])
    for strategy in ("token", "whole_word", "span"):
        masked, labels = mask_tokens(
            ids, attn, special_ids=torch.tensor([0, 1, 2, 3, 4]), mask_token_id=4,
            vocab_size=vocab, masked_lm_prob=0.15, max_predictions=20, generator=gen,
            continuation=continuation, strategy=strategy)
        eager = objective(masked, attn, types, labels, nsp_labels)
        graph = compiled(masked, attn, types, labels, nsp_labels)
        assert abs(eager.total.item() - graph.total.item()) < 1e-6, strategy
        assert not data_dependent, data_dependent
