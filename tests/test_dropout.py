"""The fast CPU dropout: nn.Dropout's distribution, its gradient, resumable masks, sdpa parity."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from further_pt.train import dropout as D


def test_drop_rate_and_scale_match_the_requested_p() -> None:
    torch.manual_seed(0)
    x = torch.full((1000, 1000), 3.0)
    for p in (0.1, 0.5):
        out = D.dropout(x, p)
        dropped = (out == 0).float().mean().item()
        p_eff = round(p * 32768) / 32768
        sigma = math.sqrt(p_eff * (1 - p_eff) / x.numel())
        assert abs(dropped - p_eff) < 5 * sigma, (p, dropped)
        kept = out[out != 0]
        assert torch.allclose(kept, torch.full_like(kept, 3.0 / (1 - p_eff)))
        assert abs(out.mean().item() - 3.0) < 0.01  # the expectation is the input
    assert D.dropout(x, 1.0).abs().sum() == 0
    assert D.dropout(x, 0.1, training=False) is x and D.dropout(x, 0.0) is x


def test_masks_are_not_correlated_across_the_four_draws_of_a_word() -> None:
    torch.manual_seed(1)
    drop = D.drop_mask((400_000, 4), 0.5)[0].float()  # column j = j-th 15 bits of each word
    corr = torch.corrcoef(drop.T)
    assert (corr - torch.eye(4)).abs().max() < 0.01, corr
    assert (drop.mean(0) - 0.5).abs().max() < 0.004  # each slice drops at the rate (5 sigma)


def test_gradient_is_the_mask_times_the_scale() -> None:
    torch.manual_seed(2)
    x = torch.randn(64, 32, requires_grad=True)
    out = D.dropout(x, 0.25)
    out.backward(torch.ones_like(out))
    kept = out != 0
    assert torch.equal(x.grad[~kept], torch.zeros_like(x.grad[~kept]))
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 32768 / (32768 - 8192)))


def test_masks_follow_the_default_generator_so_a_resume_redraws_them() -> None:
    torch.manual_seed(3)
    state = torch.get_rng_state()
    first = D.drop_mask((50, 50), 0.1)[0]
    torch.set_rng_state(state)  # what a checkpoint restores
    assert torch.equal(D.drop_mask((50, 50), 0.1)[0], first)
    assert not torch.equal(D.drop_mask((50, 50), 0.1)[0], first)


def _tiny_bert(dropout: float) -> BertForMaskedLM:
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, attn_implementation="sdpa"))


def test_install_swaps_dropout_and_attention_and_evaluation_is_unchanged() -> None:
    model, reference = _tiny_bert(0.1), _tiny_bert(0.1)
    ids = torch.randint(5, 60, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding: sdpa's bool mask reaches the attention function
    assert D.install(model) == {"dropout_modules": 7, "attention_models": 1}
    assert model.config._attn_implementation == D.ATTENTION
    assert all(type(m) is not nn.Dropout for m in model.modules())
    model.eval()
    reference.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits,
                              reference(input_ids=ids, attention_mask=mask).logits, atol=1e-6)


def test_training_attention_is_softmax_attention_with_the_drawn_mask() -> None:
    model = _tiny_bert(0.2)
    D.install(model)
    model.train()
    attn = model.bert.encoder.layer[0].attention.self
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    allowed = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    allowed[1, ..., 4:] = False
    torch.manual_seed(4)
    out, _ = D.attention(attn, q, k, v, allowed, dropout=0.2, scaling=0.5)
    torch.manual_seed(4)
    drop, scale = D.drop_mask((2, 4, 6, 6), 0.2)
    probs = torch.softmax((q @ k.transpose(2, 3) * 0.5).masked_fill(~allowed, -1e30), dim=-1)
    expected = (probs.masked_fill(drop, 0) * scale) @ v
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-6)
    # without dropout it is sdpa itself
    sdpa = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.5)
    plain, _ = D.attention(attn, q, k, v, allowed, dropout=0.0, scaling=0.5)
    assert torch.allclose(plain, sdpa.transpose(1, 2), atol=1e-6)
    # a query row that may attend to nothing (a padding segment) gives 0, as sdpa does
    allowed[0, ..., 2, :] = False
    out, _ = D.attention(attn, q, k, v, allowed, dropout=0.2, scaling=0.5)
    assert torch.equal(out[0, 2], torch.zeros_like(out[0, 2]))


def test_which_calls_take_the_fast_path(monkeypatch) -> None:
    """Flags models pass along stay fast; what it does not compute goes to sdpa."""
    def sdpa(*args, **kwargs):
        return "sdpa", None
    monkeypatch.setattr(D, "sdpa_attention_forward", sdpa)
    module = SimpleNamespace(is_causal=False)
    q = torch.randn(1, 2, 4, 8)
    fast = dict(dropout=0.1, output_hidden_states=False, return_dict=True, position_ids=None)
    assert D.attention(module, q, q, q, None, **fast)[0] != "sdpa"
    slow = [dict(dropout=0.0), dict(dropout=0.1, sliding_window=2), dict(dropout=0.1,
            is_causal=True), dict(dropout=0.1, softcap=30.0)]
    for kwargs in slow:
        assert D.attention(module, q, q, q, None, **kwargs)[0] == "sdpa", kwargs
    assert D.attention(SimpleNamespace(), q, q, q, None, dropout=0.1)[0] == "sdpa"  # causal?
    assert D.attention(module, q.bfloat16(), q.bfloat16(), q.bfloat16(), None,
                       dropout=0.1)[0] == "sdpa"
    assert D.attention(module, q, q[:, :1], q[:, :1], None, dropout=0.1)[0] == "sdpa"  # GQA
    # a model in training reaches it through transformers, hidden-state flags and all
    model = _tiny_bert(0.1)
    D.install(model)
    model.train()
    monkeypatch.setattr(D, "sdpa_attention_forward", None)  # any sdpa call would fail
    out = model(input_ids=torch.randint(5, 60, (2, 8)), output_hidden_states=True)
    assert torch.isfinite(out.logits).all()


def test_a_model_trains_the_same_with_either_dropout() -> None:
    """Same data, init and MLM masks, 100 steps: the losses differ only by the dropout noise."""
    # a learnable stream: each sequence repeats one token
    data = torch.randint(5, 60, (200, 1), generator=torch.Generator().manual_seed(5)).repeat(1, 16)
    finals = {}
    for fast in (False, True):
        generator = torch.Generator().manual_seed(7)
        model = _tiny_bert(0.1)
        if fast:
            D.install(model)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        torch.manual_seed(6)
        losses = []
        for step in range(100):
            batch = data[(step * 16) % 200:(step * 16) % 200 + 16]
            labels = batch.clone()
            masked = torch.rand(batch.shape, generator=generator) < 0.15
            labels[~masked] = -100
            inputs = batch.masked_fill(masked, 4)
            loss = model(input_ids=inputs, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        finals[fast] = sum(losses[-15:]) / 15
        assert finals[fast] < sum(losses[:5]) / 5 - 0.5  # it learns
    assert abs(finals[True] - finals[False]) < 0.3, finals
