"""Step: one optimizer step and the batch it is made of.

- :func:`resolve_batch`: the micro-batch per device and the accumulation for a global
  batch on any number of processes;
- :func:`optimizer_step`: clip, step, schedule, with the non-finite guard of each
  precision (a GradScaler under fp16, the fused kernel's ``found_inf`` under bf16/fp32),
  and no host read of the device;
- :class:`NonfiniteSteps`: skipped steps counted on the device, read at log time;
- :func:`resume_positions`: a checkpoint's data position under another world size.

Each is a pure function of its arguments (or a small class), testable without a loop;
the loop is :class:`further_pt.train.trainer.Trainer`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from further_pt.errors import ConfigError, TrainingFailed

logger = logging.getLogger("further_pt.train.step")

__all__ = ["NonfiniteSteps", "optimizer_step", "resolve_batch", "resume_positions"]


def optimizer_step(accelerator: Any, params: Iterator[torch.nn.Parameter], optimizer: Any,
                   scheduler: Any, loss: torch.Tensor, *, max_grad_norm: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clip, step, advance the schedule; ``(grad_norm, skipped, nonfinite_loss)`` as tensors.

    ``params`` is the prepared model's ``parameters()``, all of them: the clip and the norm
    cover those with a gradient, unscaled exactly once under fp16 (FSDP included).

    A step whose loss or gradient is not finite must not change the weights. How that
    is done depends on who owns the check, and none of the ways reads the device:

    - **fp16 (a GradScaler)**: ``optimizer.step()`` is always called. The scaler found
      the inf/NaN while unscaling (inside ``clip_grad_norm_``), skips the update itself and
      halves the scale in ``update()``. Skipping the call instead would leave the scaler
      un-updated, and the next ``unscale_()`` raises "unscale_() has already been called
      on this optimizer since the last update()". ``skipped`` is "the unscaled gradient
      norm is not finite", exactly what the scaler found while unscaling, read on the
      device (Accelerate's ``step_was_skipped`` cannot see a skip inside a fused
      optimizer, which receives ``found_inf`` and steps anyway; comparing the scale
      before and after would be two host reads).
    - **bf16/fp32 with fused AdamW** (CUDA and CPU, not sharded): the finiteness flag is
      handed to the fused kernel as ``found_inf``, the same mechanism GradScaler uses; the
      kernel leaves weights, moments and step count untouched. No host read.
    - otherwise (another optimizer, or FSDP's DTensors): the check is read on the host.

    The skip is decided by the gradient norm alone: DDP averaged the gradients, so it is
    the same on every process and every replica takes the same steps (a loss is a
    process's own: a micro-batch without labels has a NaN loss and zero gradients). The
    schedule advances either way: a skipped step is still a step. The third value is
    what counts toward ``train.max_nonfinite_steps`` (:class:`NonfiniteSteps`, which
    takes the worst process at each read): the skipped step, or under fp16 only a
    non-finite *loss*, since overflowing gradients are the scaler's routine business.
    """
    max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
    # The model's whole list, not the parameters that have gradients: under FSDP Accelerate
    # unscales, then clips only a list equal to a prepared model's parameters() and unscales
    # again for any other (the GradScaler raises "unscale_() has already been called"). Its
    # clip skips the parameters without gradients (frozen ones, a head warm-up's encoder).
    grad_norm = accelerator.clip_grad_norm_(list(params), max_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor; its local value
        grad_norm = grad_norm.full_tensor()
    bad = ~torch.isfinite(grad_norm)
    inner = getattr(optimizer, "optimizer", optimizer)
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        optimizer.step()  # the scaler skips the update and halves its scale
        skipped, counted = bad.float(), (~torch.isfinite(loss.detach())).float()
    elif _fused(inner):
        inner.found_inf = bad.float()
        try:
            optimizer.step()
        finally:
            del inner.found_inf
        skipped = counted = bad.float()
    else:
        if not bad.item():
            optimizer.step()
        skipped = counted = bad.float()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped, counted


def _fused(optimizer: Any) -> bool:
    """A fused torch optimizer over plain tensors: it takes ``found_inf`` and skips on device.

    Decided once per optimizer (its groups and parameters do not change during a run) and
    kept on it: the loop asks at every step.
    """
    known = getattr(optimizer, "_further_pt_fused", None)
    if known is not None:
        return known
    params = [p for g in optimizer.param_groups for p in g["params"]]
    fused = bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        g.get("fused") for g in optimizer.param_groups) and not any(
        type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor" for p in params)
    optimizer._further_pt_fused = fused
    return fused


class NonfiniteSteps:
    """Skipped updates, counted on the device and read at log and checkpoint time.

    ``add`` keeps device scalars (the current run of counted steps, the step at which a
    run first reached ``limit`` = ``train.max_nonfinite_steps``, the skips since the
    last read); :meth:`read` is the one host read, done where the loop reads the device
    anyway. Reaching the limit raises :class:`TrainingFailed` at that read, naming the
    step where it happened: up to ``train.log_every_steps - 1`` steps late, and
    harmless, since no skipped step changed the weights.
    """

    def __init__(self, device: torch.device, limit: int, state: dict[str, Any]) -> None:
        self.limit = limit
        self.run = torch.full((), float(state.get("nonfinite_run", 0)), device=device)
        self.hit = torch.zeros((), device=device)  # the step a run reached the limit; 0: none
        self.window = torch.zeros((), device=device)

    def add(self, skipped: torch.Tensor, counted: torch.Tensor, step: int) -> None:
        """Record optimizer step ``step`` (1-based)."""
        self.run = (self.run + counted) * counted
        reached = (self.run >= self.limit) & (self.hit == 0)
        self.hit = torch.where(reached, torch.full_like(self.hit, float(step)), self.hit)
        self.window = self.window + skipped

    def read(self, state: dict[str, Any], step: int, ckpt_root: Path) -> None:
        """Every process reads at the same steps; with several, the worst one's counts (a
        non-finite fp16 loss is a process's own), so all raise together or none does."""
        values = torch.stack([self.run, self.hit, self.window])
        if torch.distributed.is_available() and torch.distributed.is_initialized() and (
                torch.distributed.get_world_size() > 1):
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        run, hit, window = (int(x) for x in values.tolist())
        self.window = torch.zeros_like(self.window)
        state["nonfinite_steps"] = state.get("nonfinite_steps", 0) + window
        state["nonfinite_run"] = run
        if window:
            logger.warning("%d update(s) skipped by step %d: non-finite loss or gradient "
                           "(%d in all)", window, step, state["nonfinite_steps"])
        if hit:
            raise TrainingFailed(
                f"{self.limit} non-finite steps in a row at step {hit}; stopped. The last good "
                f"checkpoint is kept in {ckpt_root}")


def resolve_batch(batch_size: int, accumulation: int, global_batch: int | None, world: int
                  ) -> tuple[int, int, str]:
    """``(micro-batch per device, accumulation steps, a log line)`` for ``world`` processes.

    ``train.global_batch_size: null`` keeps the per-device meaning: ``batch_size`` per
    device and micro-batch, ``accumulation`` micro-batches a step, so the global batch
    grows with the GPU count (8 GPUs turn a recipe's 32 into 256 at the lr tuned for 32).
    A number fixes the examples per optimizer step whatever the world size: each process
    takes ``global / world``, in the fewest micro-batches of at most ``batch_size``
    (the memory bound), e.g. 32 on 1 GPU with batch_size 16 -> 2 x 16; on 8 -> 1 x 4.
    Refused with one line when the processes cannot share it evenly.
    """
    if global_batch is None:
        total = batch_size * accumulation * world
        return batch_size, accumulation, (
            f"global batch {total} = {world} process(es) x {batch_size} per device x "
            f"{accumulation} accumulation step(s) (train.global_batch_size=null)")
    if global_batch <= 0 or global_batch % world:
        raise ConfigError(f"train.global_batch_size={global_batch} does not divide evenly over "
                          f"{world} process(es); use a multiple of {world}")
    if accumulation != 1:
        raise ConfigError("train.gradient_accumulation_steps: with train.global_batch_size set, "
                          "accumulation is derived from it; leave gradient_accumulation_steps at "
                          f"1 (got {accumulation})")
    per_device = global_batch // world
    accum = next(a for a in range(math.ceil(per_device / batch_size), per_device + 1)
                 if per_device % a == 0)
    micro = per_device // accum
    return micro, accum, (f"global batch {global_batch} = {world} process(es) x {micro} per "
                          f"device x {accum} accumulation step(s) (train.global_batch_size="
                          f"{global_batch}, train.batch_size={batch_size} at most per device)")


def resume_positions(saved: dict[str, Any], *, world: int, batch_size: int, accumulation: int,
                     grouped: bool) -> tuple[dict[str, list[int]], str | None]:
    """The streams' ``[epoch, micro-batch]`` positions for this run, from a checkpoint's state.

    Under the same world size they are the saved ones. Under another, the data position
    carries over exactly when it is a global example offset: rank ``r`` of ``w`` reads
    every ``w``-th index of the epoch's permutation, so after ``p`` micro-batches of ``b``
    the job has read the permutation's first ``p * b * w`` examples, whatever ``w``.
    That needs the same global batch (else the schedule's steps mean other data), no
    per-process length grouping, and an offset that is a whole number of the new
    micro-batches; otherwise one line refuses, naming both sizes. Returns the positions
    and a log line when converted.
    """
    old_world = saved.get("world_size", world)
    streams = {k: list(v) for k, v in saved["streams"].items()}
    old_batch = saved.get("micro_batch_size", batch_size)
    if old_world == world and old_batch == batch_size:
        return streams, None
    old_global = saved.get("global_batch", old_batch * old_world)
    new_global = batch_size * accumulation * world

    def refuse(why: str) -> ConfigError:
        if old_world == world:
            return ConfigError(f"the checkpoint's micro-batch is {old_batch} per device and this "
                               f"run's is {batch_size}: {why}; resume with "
                               f"train.batch_size={old_batch}")
        return ConfigError(f"the checkpoint was written by {old_world} process(es) and this run "
                           f"has {world}: {why}; resume with {old_world} process(es)")

    if old_global != new_global:
        raise refuse(f"the global batch would change from {old_global} to {new_global} "
                     "(set train.global_batch_size to keep it on any number of processes)")
    if grouped:
        raise refuse("data.group_by_length groups batches within each process, so the data "
                     "position does not carry over")
    converted, notes = {}, []
    for name, (epoch, position) in streams.items():
        consumed = position * old_batch * old_world
        if consumed % (batch_size * world):
            raise refuse(f"stream {name!r} stopped after {consumed} examples of epoch {epoch}, "
                         f"not a whole number of {batch_size} x {world}")
        converted[name] = [epoch, consumed // (batch_size * world)]
        notes.append(f"{name}: example {consumed} of epoch {epoch}")
    return converted, (f"resuming a {old_world}-process checkpoint ({old_batch} per device) on "
                       f"{world} process(es) ({batch_size} per device), global batch "
                       f"{new_global} kept; data position {', '.join(notes)}")
