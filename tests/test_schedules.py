"""Schedules equal their formulas at chosen steps."""

from __future__ import annotations

import math

import pytest
import torch

from further_pt.objectives.schedules import build, stlr_factor


def _lrs(name: str, total: int, **kw) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [param], "lr": 2e-5}], lr=2e-5)
    sched = build(name, opt, total_steps=total, **kw)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_stlr_seed_numbers() -> None:
    """lr_max 2e-5, cut_frac 0.1, ratio 32: lr_max/32 at t=0, lr_max at t=cut, lr_max/32 at T."""
    total = 1000
    lrs = _lrs("stlr", total, cut_frac=0.1, ratio=32)
    cut = math.floor(total * 0.1)
    assert lrs[0] == pytest.approx(2e-5 / 32, rel=1e-12)
    assert lrs[cut] == pytest.approx(2e-5, rel=1e-12)
    assert stlr_factor(total, total, 0.1, 32) == pytest.approx(1 / 32)
    for t in (0, 37, 99, 100, 101, 500, 999):  # eq. 3 of Howard & Ruder, literally
        p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / 0.1 - 1))
        assert lrs[t] == pytest.approx(2e-5 * (1 + p * 31) / 32, rel=1e-12)
    assert max(lrs) == lrs[cut]


def test_linear_warmup_then_decay_to_zero() -> None:
    lrs = _lrs("linear", 100, warmup_steps=10)
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(2e-5 * 5 / 10)
    assert lrs[10] == pytest.approx(2e-5)
    assert lrs[55] == pytest.approx(2e-5 * (100 - 55) / 90)


def test_cosine_and_constant() -> None:
    cosine = _lrs("cosine", 100, warmup_steps=10)
    assert cosine[10] == pytest.approx(2e-5)
    assert cosine[55] == pytest.approx(2e-5 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    constant = _lrs("constant", 100, warmup_steps=10)
    assert constant[5] == pytest.approx(1e-5) and constant[80] == pytest.approx(2e-5)


def test_schedule_keeps_layer_ratios() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.5}], lr=1.0)
    sched = build("stlr", opt, total_steps=50)
    for _ in range(17):
        opt.step()
        sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * opt.param_groups[0]["lr"])


def test_linear_factor_equals_transformers_linear_schedule() -> None:
    import torch
    from transformers import get_linear_schedule_with_warmup

    from further_pt.objectives.schedules import linear_factor

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_linear_schedule_with_warmup(opt, 3, 10)
    for step in range(12):
        assert hf.lr_lambdas[0](step) == pytest.approx(linear_factor(step, 3, 10))


def test_head_warmup_then_the_main_schedule_shifted() -> None:
    import torch

    from further_pt.objectives.schedules import linear_factor, with_head_warmup

    heads = torch.nn.Parameter(torch.zeros(1))
    body = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [body], "name": "encoder", "lr": 5e-5},
                             {"params": [heads], "name": "heads", "lr": 5e-5}], lr=5e-5)
    sched = with_head_warmup(opt, head_steps=4, head_factor=1e-3 / 5e-5, head_groups={"heads"},
                             main=lambda s: linear_factor(s, 2, 10))
    seen = []
    for _ in range(14):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert seen[:4] == [[0.0, pytest.approx(1e-3)]] * 4  # warm-up: heads at 1e-3, encoder 0
    assert seen[4] == [0.0, 0.0]  # the main schedule starts at its own step 0 (warmup from 0)
    assert seen[5] == [pytest.approx(2.5e-5)] * 2 and seen[6] == [pytest.approx(5e-5)] * 2
    assert seen[13] == [pytest.approx(5e-5 * 1 / 8)] * 2  # main step 9 of 10


@pytest.mark.parametrize("step", [0, 1, 2, 3, 4, 10, 29])
def test_a_shortened_runs_schedule_equals_its_formula(step: int) -> None:
    """demo at train.max_steps=30: warm-up fitted to 3 steps, then linear decay to 0 at 30."""
    from further_pt.config.validate import fit_warmup
    from further_pt.objectives.schedules import linear_factor

    warmup = fit_warmup(100, 30, 0.1)
    lrs = _lrs("linear", 30, warmup_steps=warmup)
    expected = step / 3 if step < 3 else (30 - step) / (30 - 3)
    assert warmup == 3
    assert lrs[step] == pytest.approx(2e-5 * expected, rel=1e-12)
    assert linear_factor(step, warmup, 30) == pytest.approx(expected, rel=1e-12)
