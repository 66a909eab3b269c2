"""Training primitives the Trainer is built from, each testable alone.

One Accelerate setup, one resumable sampler, one way to seed a step, one
optimizer-step guard, one preemption watch, one metrics log, and the shell
contract of the entry points (errors -> exit codes). The loop itself is
:class:`further_pt.trainer.Trainer`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    ProjectConfiguration,
)
from torch.utils.data import DataLoader, Sampler

from further_pt import hardware
from further_pt.config import flatten
from further_pt.errors import ConfigError, FurtherPTError, SetupError, TrainingFailed

logger = logging.getLogger("further_pt.training")

__all__ = ["MetricsLog", "NonfiniteSteps", "PreemptionWatch", "ResumableSampler",
           "checkpoint_bytes", "entry_point", "make_accelerator", "micro_batches",
           "optimizer_step", "resolve_batch", "resume_positions", "step_seed"]


class PreemptionWatch:
    """Turn SIGTERM / SIGINT (a preemption notice, Ctrl-C) into a clean stop.

    The signal only sets a flag; the loop checks it after each optimizer step,
    writes a checkpoint and raises :class:`Preempted` (exit code 75, EX_TEMPFAIL:
    "try again"). With several processes the flag is summed across them, so all stop
    at the same step even if only one was signalled - every ``every`` steps
    (``train.stop_check_every_steps``), not every step: the sum is a collective read
    on the host, which on GPUs would stall the queue of kernels once per step. One
    process reads its own flag at every step (no collective). A second Ctrl-C
    interrupts at once.
    """

    def __init__(self, every: int = 1) -> None:
        self.received: int | None = None
        self.every = max(1, every)
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def requested(self, accelerator: Any, step: int) -> bool:
        """Whether to stop after ``step``: the same answer on every process."""
        flag = 0.0 if self.received is None else 1.0
        if accelerator.num_processes > 1:
            if step % self.every:
                return False  # the same steps on every process: no collective here
            total = accelerator.reduce(torch.tensor([flag], device=accelerator.device), "sum")
            flag = float(total.item())
        return flag > 0

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

def launched_rank() -> int:
    """This process's global rank as the launcher set it (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def lost_peers(exc: BaseException, *, world: int, step: int, timeout_s: float,
               ckpt_root: Path) -> TrainingFailed | None:
    """The one-line failure for a collective that broke because a peer died or hung.

    Gloo raises a RuntimeError naming its transport ("Timed out waiting 20000ms for
    recv", "Connection closed by peer"); NCCL, with the watchdog set to abort the
    communicator instead of the process (:data:`NCCL_ERROR_HANDLING`), a
    ``DistBackendError``/``DistError`` or a RuntimeError naming NCCL ("NCCL
    communicator was aborted", "Watchdog caught collective operation timeout").
    Either way the other processes are gone or silent, and the user's next move is to
    rerun every node. Anything else is not ours to rename (None).
    """
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(exc).strip()
    lowered = text.lower()
    if world < 2 or not (isinstance(exc, dist_error) or (
            isinstance(exc, RuntimeError) and ("gloo" in lowered or "nccl" in lowered))):
        return None
    # gloo: "[.../pair.cc:534] Connection closed by peer [addr]:port. This is typically ..."
    # NCCL: "[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(...) ran for ..."
    cause = text.splitlines()[0].split("] ", 1)[-1].split(". ")[0].rstrip(".") if text else (
        type(exc).__name__)
    return TrainingFailed(
        f"lost contact with the other processes during step {step + 1} ({cause}"
        f"): a process or node died, or hung past train.collective_timeout_s={timeout_s:g}; "
        f"checkpoints in {ckpt_root} are kept: rerun the same command on every node to resume")


REFUSED_ENGINES = ("DEEPSPEED", "MEGATRON_LM")
#: ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` for our runs: 2 = on a collective timeout or a
#: failed peer, abort the NCCL communicator and raise in the training thread (torch's
#: default, 3, tears the process down from the watchdog thread: no message of ours).
NCCL_ERROR_HANDLING = "2"


def check_engine(accelerator: Any) -> bool:
    """Refuse the engines the trainer cannot checkpoint, before any work; True under FSDP.

    Data parallelism (DDP, on 1..N GPUs, CPUs and nodes) and FSDP through
    ``fsdp_version: 2`` (torch's ``fully_shard``) are supported: under FSDP the
    Trainer gathers the full weights and optimizer state for checkpoints, ``best/``,
    ``final/`` and evaluation. FSDP version 1 and DeepSpeed / Megatron-LM are refused
    with one line: their state would need other gathering code, which nothing here
    tests, and a checkpoint holding 1/N of a model is worse than an error.
    """
    engine = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if engine == "FSDP":
        version = getattr(getattr(accelerator.state, "fsdp_plugin", None), "fsdp_version", 1)
        if version != 2:
            raise SetupError(
                f"accelerate is configured for FSDP version {version}: further_pt shards with "
                "FSDP version 2 (torch's fully_shard); set fsdp_version: 2 in `accelerate "
                "config` or pass --fsdp_version 2 to accelerate launch")
        return True
    if engine in REFUSED_ENGINES:
        raise SetupError(
            f"accelerate is configured for {engine}: further_pt trains data-parallel (DDP on "
            "1..N GPUs or nodes) or sharded with FSDP version 2; run `accelerate config` with "
            "'multi-GPU' or FSDP (fsdp_version: 2)")
    return False


def make_accelerator(mixed_precision: str | None, log_dir: Path, *,
                     find_unused_parameters: bool = False,
                     collective_timeout_s: float = 1800.0, tf32: bool = True) -> Any:
    """An Accelerator logging to TensorBoard under ``log_dir``, on the fastest precision.

    ``mixed_precision``: ``auto`` picks bf16 where the hardware runs it fast (CUDA
    GPUs with bf16; CPUs with AMX-BF16 or AVX512-BF16) and fp32 elsewhere, unless
    ``accelerate launch --mixed_precision`` asked for one; ``no``/``fp16``/``bf16``
    are taken as given; ``null`` keeps what ``accelerate config`` chose
    (:func:`further_pt.hardware.choose_precision`). On a CPU, each process gets
    its share of the cores it may use unless the user set ``OMP_NUM_THREADS``.
    Both choices are logged with their reason. ``collective_timeout_s`` bounds every
    collective: a peer that hangs or vanishes without closing its sockets (a frozen
    node) fails the run after that long instead of blocking it forever; a process that
    dies outright is noticed at once. Fails loudly when the launcher's
    WORLD_SIZE and the processes Accelerate sees disagree: on CPU,
    ``accelerate launch --cpu --num_processes 2`` silently starts one process.
    """
    precision, why = hardware.detect_precision(mixed_precision)
    # Before the process group exists: NCCL's watchdog then aborts the communicator on a
    # timeout and the step raises (-> the "lost contact" line, exit 3) instead of killing
    # the process with SIGABRT. A value the user exported is kept.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", NCCL_ERROR_HANDLING)
    handlers: list[Any] = [InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_s))]
    if find_unused_parameters:  # custom heads leave the pooler or HF head without gradients
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    kwargs: dict[str, Any] = {"kwargs_handlers": handlers}
    if precision is not None:
        kwargs["mixed_precision"] = precision
    accelerator = Accelerator(
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(log_dir), logging_dir=str(log_dir)),
        **kwargs,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise SetupError(
            f"WORLD_SIZE={launched} but Accelerate runs {accelerator.num_processes} process(es); "
            "on CPU launch with ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
            "--num_processes N"
        )
    notes = [f"mixed precision: {accelerator.mixed_precision} ({why})"]
    if accelerator.device.type == "cuda":
        tf32_note = hardware.configure_tf32(
            tf32, tuple(torch.cuda.get_device_capability(accelerator.device)))
        if tf32_note:
            notes.append(tf32_note)
    if accelerator.device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        threads, why_threads = hardware.configure_cpu_threads(local)
        notes.append(f"CPU threads per process: {threads} ({why_threads})")
    if accelerator.is_main_process:
        for note in notes:
            logger.info(note)
    return accelerator


def entry_point(argv: list[str], load: Callable[[list[str]], Any], run: Callable[[Any], Any],
                report: Callable[[Any, Any], str]) -> int:
    """The shell contract of every entry point: config -> run -> report, errors as exit codes.

    A :class:`~further_pt.errors.FurtherPTError` prints one line and exits with
    its code (2: invalid input, found before any work; 3: training failed, the
    last checkpoint is kept; 75: preempted after a checkpoint, run again);
    success prints ``report(cfg, result)`` and exits 0.
    """
    try:
        cfg = load(argv)
        result = run(cfg)
    except FurtherPTError as exc:
        kind = {2: "error: ", 3: "training failed: "}.get(exc.exit_code, "")
        print(f"further_pt: {kind}{exc}", file=sys.stderr)
        return exc.exit_code
    if launched_rank() == 0:  # one report per job, not one per process
        print(report(cfg, result))
    return 0


def step_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed that is a pure function of (seed, step, rank, ...)."""
    text = "-".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def optimizer_step(accelerator: Any, params: Iterator[torch.nn.Parameter], optimizer: Any,
                   scheduler: Any, loss: torch.Tensor, *, max_grad_norm: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clip, step, advance the schedule; ``(grad_norm, skipped, nonfinite_loss)`` as tensors.

    A step whose loss or gradient is not finite must not change the weights. How that
    is done depends on who owns the check, and none of the ways reads the device:

    - **fp16 (a GradScaler)**: ``optimizer.step()`` is always called. The scaler found
      the inf/NaN while unscaling (inside ``clip_grad_norm_``), skips the update itself and
      halves the scale in ``update()``. Skipping the call instead would leave the scaler
      un-updated, and the next ``unscale_()`` raises "unscale_() has already been called
      on this optimizer since the last update()". ``skipped`` is "the scale went down":
      Accelerate's ``step_was_skipped`` cannot see a skip inside a fused optimizer,
      which receives ``found_inf`` and steps anyway. (fp16 reads the scale on the host
      anyway: the scaler's ``update`` does.)
    - **bf16/fp32 with fused AdamW** (CUDA and CPU, not sharded): the finiteness flag is
      handed to the fused kernel as ``found_inf``, the same mechanism GradScaler uses; the
      kernel leaves weights, moments and step count untouched. No host read.
    - otherwise (another optimizer, or FSDP's DTensors): the check is read on the host.

    DDP all-reduced the gradients, so every process skips the same steps. The schedule
    advances either way: a skipped step is still a step. ``nonfinite_loss`` is what counts
    toward ``train.max_nonfinite_steps`` (:class:`NonfiniteSteps`): under fp16 only a
    non-finite *loss*, since overflowing gradients are the scaler's routine business.
    """
    max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = accelerator.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor; its local value
        grad_norm = grad_norm.full_tensor()
    bad_loss = ~torch.isfinite(loss.detach())
    bad = bad_loss | ~torch.isfinite(grad_norm)
    inner = getattr(optimizer, "optimizer", optimizer)
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        before = scaler.get_scale()
        optimizer.step()
        skipped = torch.tensor(float(scaler.get_scale() < before), device=loss.device)
        counted = bad_loss.float()
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
    """A fused torch optimizer over plain tensors: it takes ``found_inf`` and skips on device."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return all(g.get("fused") for g in optimizer.param_groups) and not any(
        type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor" for p in params)


class NonfiniteSteps:
    """Skipped updates, counted on the device and read at log and checkpoint time.

    ``add`` keeps device scalars (the current run of counted steps, the step at which a
    run first reached ``limit`` = ``train.max_nonfinite_steps``, the skips since the
    last read); :meth:`read` is the one host read, done where the loop reads the device
    anyway. Reaching the limit raises :class:`TrainingFailed` at that read, naming the
    step where it happened: a few steps late at most, and harmless, since no skipped
    step changed the weights.
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
        run, hit, window = (int(x) for x in torch.stack(
            [self.run, self.hit, self.window]).tolist())
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
    if old_world == world:
        return streams, None
    old_batch = saved.get("micro_batch_size", batch_size)
    old_global = saved.get("global_batch", old_batch * old_world)
    new_global = batch_size * accumulation * world

    def refuse(why: str) -> ConfigError:
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
    return converted, (f"resuming a {old_world}-process checkpoint on {world} process(es), "
                       f"global batch {new_global} kept; data position {', '.join(notes)}")


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """Disk two checkpoints need: fp32 weights + two AdamW moments, each, with a margin."""
    params = sum(p.numel() for p in model.parameters())
    return int(2 * 3 * 4 * params * 1.1)


class ResumableSampler(Sampler[int]):
    """Per-epoch shuffle of ``n`` indices, split across ranks, that starts anywhere in O(1).

    The order of epoch ``e`` is ``randperm(n)`` seeded with (seed, e); rank ``r``
    of ``w`` takes every ``w``-th index from ``r`` (a tail that does not divide
    evenly is left out, so all ranks take equal steps). Resuming sets the epoch
    and the offset into this rank's share: nothing is replayed.

    With ``lengths`` and ``batch_size`` (length grouping, as Hugging Face's
    ``LengthGroupedSampler``), each run of ``50 x batch_size`` indices of this
    rank's share is sorted by length, cut into batches, and the batches are
    shuffled: batches hold sequences of similar length, so dynamic padding adds
    little, while the order stays a pure function of (seed, epoch).
    """

    GROUP = 50  # batches per length-sorted group

    def __init__(self, n: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, lengths: torch.Tensor | None = None,
                 batch_size: int | None = None) -> None:
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.shuffle = shuffle
        self.lengths, self.batch_size = lengths, batch_size
        if lengths is not None and (batch_size is None or len(lengths) != n):
            raise ValueError("length grouping needs one length per index and a batch_size")
        self.epoch, self.start = 0, 0

    @property
    def per_rank(self) -> int:
        return self.n // self.world_size

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(self.per_rank - self.start, 0)

    def order(self) -> torch.Tensor:
        """This rank's full order for the current epoch."""
        gen = torch.Generator().manual_seed(step_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=gen) if self.shuffle else torch.arange(self.n)
        mine = order[self.rank: self.per_rank * self.world_size: self.world_size]
        if self.lengths is None:
            return mine
        assert self.batch_size is not None
        size = self.batch_size * self.GROUP
        groups = [mine[i:i + size] for i in range(0, len(mine), size)]
        ordered = torch.cat([g[self.lengths[g].argsort(descending=True, stable=True)]
                             for g in groups])
        batches = list(ordered.split(self.batch_size))
        full, tail = (batches[:-1], batches[-1:]) if len(batches[-1]) < self.batch_size else (
            batches, [])
        shuffled = torch.randperm(len(full), generator=gen).tolist() if self.shuffle else range(
            len(full))
        return torch.cat([full[i] for i in shuffled] + tail)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start:].tolist())


def micro_batches(loader: DataLoader, sampler: ResumableSampler, batch_size: int,
                  epoch: int, position: int) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(epoch, position_after, batch)`` forever, from micro-batch ``position``."""
    while True:
        sampler.set_position(epoch, position * batch_size)
        for batch in loader:
            position += 1
            yield epoch, position, batch
        epoch, position = epoch + 1, 0


def _step_of_line(line: str) -> float:
    """The step of a metrics.jsonl line; a torn or foreign line counts as after every step."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """Scalars to TensorBoard (through Accelerate's tracker) and to ``logs/metrics.jsonl``."""

    def __init__(self, accelerator: Any, log_dir: Path, run_name: str, config: dict, *,
                 resumed_at: int = 0) -> None:
        """``resumed_at``: the step the run starts from. Lines a killed run wrote after its
        last checkpoint are dropped (they are about to be logged again), as is a line cut
        short by the kill, so that metrics.jsonl holds each step once."""
        self.accelerator = accelerator
        self.path = log_dir / "metrics.jsonl"
        flat = {k: v for k, v in flatten(config, sep="/").items()
                if isinstance(v, int | float | str | bool)}
        accelerator.init_trackers(run_name, config=flat)
        if accelerator.is_main_process and self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if _step_of_line(line) <= resumed_at]
            if len(kept) < len(lines):
                tmp = self.path.with_name(".metrics.jsonl.tmp")
                tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
                os.replace(tmp, self.path)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")

    def close(self) -> None:
        """Flush the trackers. Accelerate also destroys the process group here: call last."""
        self.accelerator.end_training()
