"""Projection: how long a corpus recipe's whole run takes on a machine, from a measured
throughput (``further-pt doctor`` prints it after measuring tokens/s).

The arithmetic is the one a user would do by hand, written down once: a run is
``steps x global batch x sequence length`` tokens; at BERT-base's tokens/s it takes that
many tokens over that rate. Throughput measured on a smaller model (doctor's CPU run) is
scaled to BERT-base by training FLOPs per token.
"""

from __future__ import annotations

from typing import Any

from further_pt.config import recipes
from further_pt.objectives.encoder import encoder_flops_per_token

#: The corpus recipe projected: within_task, in_domain and cross_domain share
#: base/pretrain's run, Sun et al.'s 100K steps of 32 x 128 tokens.
RECIPE = "in_domain"
#: The MLM head's share of positions in a run's FLOPs (15% masked, as the logged MFU counts).
MASKED_SHARE = 0.15


def flops_per_token(size: dict[str, Any], seq: int) -> float:
    """Training FLOPs per token of a BERT of ``size`` (hidden_size, num_hidden_layers,
    intermediate_size, vocab_size) at sequence length ``seq``, its MLM head included."""
    return encoder_flops_per_token(type("Size", (), dict(size)), seq, head_fraction=MASKED_SHARE)


def recipe_run(name: str = RECIPE) -> tuple[int, int, int]:
    """(optimizer steps, global batch, sequence length) of a shipped corpus recipe."""
    cfg = recipes.compose(name, [])
    t = cfg.train
    batch = t.global_batch_size or t.batch_size * t.gradient_accumulation_steps
    return int(t.max_steps), int(batch), int(cfg.data.max_seq_length)


def duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:,.1f} h" + (f" ({hours / 24:,.1f} days)" if hours >= 48 else "")


def wall_time(tokens_per_s: float, measured: dict[str, Any], base: dict[str, Any], *,
              seq: int, gpus: int = 0, recipe: str = RECIPE) -> str:
    """One line: ``recipe``'s run in tokens, BERT-base's tokens/s here, the hours it takes.

    ``tokens_per_s`` was measured on a model of size ``measured`` at sequence length
    ``seq`` on one device; ``base`` is BERT-base's size (equal to ``measured`` on a GPU,
    where doctor measures BERT-base itself). The scaling by FLOPs assumes the same MFU,
    and a small model runs at a lower one: on a CPU the figure is an upper bound. With
    several GPUs the line adds the ideal-scaling bound, which the recipe's global batch of
    32 split 4 per GPU does not reach (docs: Several GPUs and nodes).
    """
    steps, batch, run_seq = recipe_run(recipe)
    per_s = tokens_per_s * flops_per_token(measured, seq) / flops_per_token(base, run_seq)
    tokens = steps * batch * run_seq
    seconds = tokens / per_s
    scaled = "" if measured == base else (
        f", by FLOPs per token from the {measured['num_hidden_layers']} x "
        f"{measured['hidden_size']} model's {tokens_per_s:,.0f}")
    more = f"; {gpus} GPUs, ideal scaling: {duration(seconds / gpus)}" if gpus > 1 else ""
    return (f"{steps:,} steps x {batch} x {run_seq} tokens = {tokens / 1e6:,.1f}M tokens of "
            f"BERT-base at {per_s:,.0f} tokens/s{scaled}: {duration(seconds)} on one "
            f"{'GPU' if measured == base else 'CPU'}{more}")
