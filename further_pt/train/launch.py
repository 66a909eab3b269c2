"""Training primitives the Trainer is built from, each testable alone.

One Accelerate setup, one resumable sampler, one way to seed a step, one
preemption watch, one metrics log, and the shell contract of the entry points
(errors -> exit codes). The optimizer step itself is :mod:`further_pt.train.step`; the
loop is :class:`further_pt.train.trainer.Trainer`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DDPCommunicationHookType,
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    ProjectConfiguration,
)

from further_pt.config import recipes
from further_pt.errors import FurtherPTError, SetupError, TrainingFailed
from further_pt.train import gpu_driver, hardware

logger = logging.getLogger("further_pt.train.launch")

__all__ = ["PreemptionWatch", "checkpoint_bytes", "ddp_kwargs", "entry_point", "make_accelerator"]


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
        device = getattr(accelerator, "device", None)
        if getattr(device, "type", None) == "cpu" and torch_release() < (2, 7):
            # FSDP2 records events on its streams; torch.cpu.Stream has record_event only
            # from 2.7 (pytorch#145935): 2.6 fails in the first forward with an AttributeError
            raise SetupError(
                f"FSDP on CPU processes needs torch >= 2.7 (this is {torch.__version__}): "
                "upgrade torch, or train data-parallel (drop the FSDP config); on CUDA GPUs "
                "torch 2.6 shards fine")
        return True
    if engine in REFUSED_ENGINES:
        raise SetupError(
            f"accelerate is configured for {engine}: further_pt trains data-parallel (DDP on "
            "1..N GPUs or nodes) or sharded with FSDP version 2; run `accelerate config` with "
            "'multi-GPU' or FSDP (fsdp_version: 2)")
    return False


def torch_release() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


#: ``train.ddp_comm_hook`` -> Accelerate's DDP communication hook (torch's
#: ``default_hooks.bf16_compress_hook`` / ``fp16_compress_hook``): each bucket of fp32
#: gradients is divided by the world size, cast to 16 bits for the all-reduce (half the
#: bytes on the wire) and cast back; every replica gets the same result.
COMM_HOOKS = {"bf16": DDPCommunicationHookType.BF16, "fp16": DDPCommunicationHookType.FP16}


def ddp_kwargs(*, find_unused_parameters: bool = False, comm_hook: str | None = None
               ) -> DistributedDataParallelKwargs | None:
    """Accelerate's DDP settings for these keys; None when both are the defaults.

    Accelerate reads them only where it wraps the model in DDP (several processes, not
    FSDP) and registers the hook on the wrapped model (``register_comm_hook``).
    """
    if not find_unused_parameters and comm_hook is None:
        return None
    if comm_hook is not None and comm_hook not in COMM_HOOKS:
        raise SetupError(f"config key 'train.ddp_comm_hook': must be null, bf16 or fp16; got "
                         f"{comm_hook!r}")
    return DistributedDataParallelKwargs(
        find_unused_parameters=find_unused_parameters,
        comm_hook=COMM_HOOKS[comm_hook] if comm_hook else DDPCommunicationHookType.NO)


def bf16_all_reduce_supported() -> bool:
    """Whether torch registers its bf16 compression hook here: its own test in
    ``DistributedDataParallel._check_comm_hook`` (a CUDA/ROCm build with NCCL >= 2.10)."""
    import torch.distributed as dist

    if torch.version.cuda is None and torch.version.hip is None:
        return False
    try:
        return dist.is_available() and dist.is_nccl_available() and (
            torch.cuda.nccl.version() >= (2, 10))
    except (RuntimeError, AttributeError):
        return False


def comm_hook_note(comm_hook: str | None, accelerator: Any) -> tuple[str, bool] | None:
    """What became of ``train.ddp_comm_hook`` (the line to log, and whether it is a warning).

    The hook lives on DDP's gradient buckets. Under FSDP gradients are reduce-scattered
    by FSDP itself (in the dtype of its mixed-precision policy), and a single process has
    no all-reduce: there the key does nothing, and the log says so rather than letting a
    user believe the all-reduce was compressed. Where DDP would refuse the bf16 hook (a
    CPU build of torch) the run stops here, before the model loads, naming the key.
    """
    if comm_hook is None:
        return None
    engine = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if engine == "FSDP":
        return (f"train.ddp_comm_hook={comm_hook} is ignored under FSDP: FSDP reduce-scatters "
                "gradients itself, in the reduce dtype of its mixed-precision policy (set it "
                "in the accelerate FSDP config)"), True
    if accelerator.num_processes < 2:
        return f"train.ddp_comm_hook={comm_hook} is ignored: one process, no all-reduce", True
    if comm_hook == "bf16" and not bf16_all_reduce_supported():
        raise SetupError("config key 'train.ddp_comm_hook': bf16 needs a CUDA build of torch "
                         f"with NCCL >= 2.10 (torch {torch.__version__} here); use fp16 or null")
    return (f"DDP gradient all-reduce in {comm_hook} (train.ddp_comm_hook): half the bytes of "
            "fp32"), False


def make_accelerator(mixed_precision: str | None, log_dir: Path, *,
                     find_unused_parameters: bool = False, comm_hook: str | None = None,
                     collective_timeout_s: float = 1800.0, tf32: bool = True,
                     trackers: list[str] | tuple[str, ...] = ()) -> Any:
    """An Accelerator logging to ``trackers`` (``train.trackers``; TensorBoard writes under
    ``log_dir``), on the fastest precision.

    ``mixed_precision``: ``auto`` picks bf16 where the hardware runs it fast (CUDA
    GPUs with bf16; CPUs with AMX-BF16 or AVX512-BF16) and fp32 elsewhere, unless
    ``accelerate launch --mixed_precision`` asked for one; ``no``/``fp16``/``bf16``
    are taken as given; ``null`` keeps what ``accelerate config`` chose
    (:func:`further_pt.train.hardware.choose_precision`). On a CPU, each process gets
    its share of the cores it may use unless the user set ``OMP_NUM_THREADS``.
    Both choices are logged with their reason. ``collective_timeout_s`` bounds every
    collective: a peer that hangs or vanishes without closing its sockets (a frozen
    node) fails the run after that long instead of blocking it forever; a process that
    dies outright is noticed at once. ``comm_hook`` (``train.ddp_comm_hook``: null, bf16,
    fp16) compresses DDP's gradient all-reduce (:func:`ddp_kwargs`; ignored, with a log
    line, under FSDP or on one process). Fails loudly when the launcher's
    WORLD_SIZE and the processes Accelerate sees disagree: on CPU,
    ``accelerate launch --cpu --num_processes 2`` silently starts one process. When
    ``nvidia-smi`` lists GPUs that torch cannot use (a driver older than torch's CUDA
    needs), that is said first, in one line with the fix
    (:func:`further_pt.train.gpu_driver.unusable_gpus`): an error for several processes,
    a warning for one (it runs on the CPU).
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes"):
        problem = gpu_driver.unusable_gpus()
        if problem and launched > 1:
            raise SetupError(problem)
        if problem and launched_rank() == 0:
            logger.warning("%s; this run trains on the CPU", problem)
    precision, why = hardware.detect_precision(mixed_precision)
    # Before the process group exists: NCCL's watchdog then aborts the communicator on a
    # timeout and the step raises (-> the "lost contact" line, exit 3) instead of killing
    # the process with SIGABRT. A value the user exported is kept.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", NCCL_ERROR_HANDLING)
    handlers: list[Any] = [InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_s))]
    # custom heads leave the pooler or HF head without gradients; the hook halves the all-reduce
    ddp = ddp_kwargs(find_unused_parameters=find_unused_parameters, comm_hook=comm_hook)
    if ddp is not None:
        handlers.append(ddp)
    kwargs: dict[str, Any] = {"kwargs_handlers": handlers}
    if precision is not None:
        kwargs["mixed_precision"] = precision
    accelerator = Accelerator(
        log_with=list(trackers) or None,  # names checked installed by config.validate_trackers
        project_config=ProjectConfiguration(project_dir=str(log_dir), logging_dir=str(log_dir)),
        **kwargs,
    )
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
    hook_note = comm_hook_note(comm_hook, accelerator)
    if accelerator.is_main_process:
        for note in notes:
            logger.info(note)
        if hook_note is not None:
            (logger.warning if hook_note[1] else logger.info)(hook_note[0])
    return accelerator


def job_usage(doc: str, kind: str) -> str:
    """An entry script's ``--help``: its docstring, then the shipped recipes of its kind."""
    shipped = [n for n in recipes.available_recipes() if recipes.kind_of(n) == kind]
    lines = [doc.strip(), "", f"usage: further-pt {kind} recipe=NAME [key=value ...]",
             f"   or: accelerate launch further_pt/{kind}.py recipe=NAME [key=value ...]  "
             "(a checkout)",
             f"   or: accelerate launch -m further_pt.{kind} recipe=NAME [key=value ...]  "
             "(an install)", "", "Shipped recipes:"]
    lines += [f"  {n:14s} {recipes.describe(n)}" for n in shipped]
    lines += ["", "Every key with its value and what it does: further-pt config recipe=NAME",
              "Check a run without starting it: further-pt config --check recipe=NAME ..."]
    return "\n".join(lines) + "\n"


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def entry_point(argv: list[str], load: Callable[[list[str]], Any], run: Callable[[Any], Any],
                report: Callable[[Any, Any], str], usage: Callable[[], str] | None = None) -> int:
    """The shell contract of every entry point: config -> run -> report, errors as exit codes.

    A :class:`~further_pt.errors.FurtherPTError` prints one line and exits with
    its code (2: invalid input, found before any work; 3: training failed, the
    last checkpoint is kept; 75: preempted after a checkpoint, run again);
    success prints ``report(cfg, result)`` and exits 0. ``-h``/``--help`` prints ``usage()``
    and exits 0.
    """
    if usage is not None and wants_help(argv):
        print(usage(), end="")
        return 0
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


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """Disk two checkpoints need: fp32 weights + two AdamW moments, each, with a margin."""
    params = sum(p.numel() for p in model.parameters())
    return int(2 * 3 * 4 * params * 1.1)


