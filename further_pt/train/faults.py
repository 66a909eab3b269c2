"""Faults: deterministic fault injection for the reliability tests (and for the curious).

``FURTHER_PT_FAULT=POINT:STEP[:RANK[:stop]]`` makes the process at ``RANK`` (any rank
if omitted) kill itself with SIGKILL when it reaches ``POINT`` at optimizer step
``STEP``, exactly as a preempted VM or an OOM killer would; with ``:stop`` it
freezes instead (SIGSTOP), as a hung machine does: alive, its sockets open, silent,
so its peers learn of it only from ``train.collective_timeout_s``:

- ``micro``: during gradient accumulation, after the first micro-batch's backward;
- ``step``: after the optimizer step, before any checkpoint of that step;
- ``checkpoint_write``: half-way through writing a checkpoint (files written, no manifest);
- ``after_checkpoint``: right after a checkpoint is complete.

``FURTHER_PT_FAULT=nan:STEP`` makes every loss from that step on non-finite;
``FURTHER_PT_FAULT=overflow:STEP`` makes that one step's loss infinite, as an fp16
overflow does (``further-pt doctor`` checks that a run under a GradScaler survives it).
Unset, these checks cost one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "FURTHER_PT_FAULT"


def _spec() -> list[str] | None:
    raw = os.environ.get(ENV)
    return raw.split(":") if raw else None


def point(name: str, step: int, rank: int = 0) -> None:
    """SIGKILL this process if the fault spec names this point, step and rank."""
    spec = _spec()
    if not spec or spec[0] != name or int(spec[1]) != step:
        return
    if len(spec) > 2 and int(spec[2]) != rank:
        return
    os.kill(os.getpid(), signal.SIGSTOP if spec[3:] == ["stop"] else signal.SIGKILL)


def nan_from(step: int) -> bool:
    """True when the fault spec asks for non-finite losses from an earlier or this step."""
    spec = _spec()
    return bool(spec) and spec[0] == "nan" and step >= int(spec[1])


def overflow_at(step: int) -> bool:
    """True when the fault spec asks for an infinite loss at exactly this step."""
    spec = _spec()
    return bool(spec) and spec[0] == "overflow" and step == int(spec[1])
