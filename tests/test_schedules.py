"""Schedules equal their formulas at chosen steps."""

from __future__ import annotations

import math

import pytest
import torch

from further_pt.schedules import build, stlr_factor


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
