"""Trainer: the one training loop every objective runs in.

An objective (masked-LM pretraining, classification fine-tuning, ...) brings
what is its own; the Trainer owns what every run shares:

- the output dir: checked read-only before any work, claimed (config.yaml)
  once the inputs have been read, a finished run recognised and left alone;
- Accelerate: processes, devices, mixed precision, DDP and ``no_sync``;
- data order: one :class:`~further_pt.train.launch.ResumableSampler` per stream,
  resumable at any micro-batch, a stream drawn per step by size (multi-task);
- the step: accumulation, the optimizer-step guard (non-finite losses are
  skipped and counted), the schedule, fault-injection points;
- named-metric logging (TensorBoard + ``logs/metrics.jsonl``), progress bar;
- evaluation at epoch ends with the best model kept in ``best/``;
- checkpoints, resume, preemption (SIGTERM -> checkpoint, exit 75), the final
  export to ``final/`` and ``metrics.json``;
- under FSDP, the gathers that make every saved folder and evaluation see the whole model.

The objective's interface (duck-typed, see :class:`Objective`)::

    module: nn.Module                    # what trains; Accelerate wraps it
    streams: list[Stream]                # datasets to draw batches from
    find_unused_parameters: bool         # DDP flag (custom heads leave params unused)
    optimizer_groups() -> list[dict]     # AdamW parameter groups, each with its own lr
    schedule(optimizer, total_steps=, steps_per_epoch=) -> LR scheduler
    total_steps(steps_per_epoch) -> int
    prepare_batch(batch, stream=, step=, micro=) -> batch  # optional: on the host, before the
                                         # copy to the device (e.g. masking: its Python loops
                                         # and .tolist() then never wait on the GPU)
    loss(module, batch, stream=, step=, micro=) -> (loss, {name: (numerator, denominator)})
    before_optimizer_step(step) -> None  # e.g. gradual unfreezing drops frozen gradients
    evaluate(model, shard) -> dict       # at epoch ends, unless metric is None: every process
                                         # its EvalShard of the dev set, results gathered; under
                                         # FSDP the main process alone (shard None), on the
                                         # gathered whole model
    better(new, best) -> bool            # compares evaluate()[objective.metric]
    export(model, folder) -> None        # a Hugging Face folder that from_pretrained loads
    summary() -> dict                    # extra keys for metrics.json
    flops_per_token() -> float | None    # training FLOPs per token, for the logged MFU

The loop (:meth:`Trainer.fit`) reads top to bottom, as nanoGPT's does.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate.utils import broadcast_object_list
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from further_pt.errors import Preempted, SetupError, TrainingFailed
from further_pt.objectives import layerwise
from further_pt.objectives.encoder import st_modules, write_st_modules
from further_pt.train import checkpoint, dropout, faults, hardware, launch
from further_pt.train import step as step_

logger = logging.getLogger("further_pt.train.trainer")

METRICS = "metrics.json"


@dataclass
class Stream:
    """A dataset the Trainer draws batches from (one per task in multi-task fine-tuning)."""

    name: str
    dataset: Any
    collate: Any
    lengths: torch.Tensor | None = None  # per-example lengths: batches of similar length
    drop_last: bool = False  # pretraining: only full batches; fine-tuning: every example


@dataclass(frozen=True)
class EvalShard:
    """This process's share of an evaluation set, and how the shares come back together.

    Evaluating on the main process alone leaves N-1 GPUs waiting; each process instead
    predicts a contiguous slice and ``gather`` (Accelerate's ``gather_for_metrics`` on
    Python objects) concatenates the slices in rank order, so the metrics are those of
    the whole set, in order, computed once.
    """

    rank: int
    world: int
    gather: Any  # list -> list: every process's list, concatenated in rank order

    def span(self, n: int) -> range:
        return range(n * self.rank // self.world, n * (self.rank + 1) // self.world)


class Objective(Protocol):
    name: str
    module: torch.nn.Module
    streams: list[Stream]
    metric: str | None
    find_unused_parameters: bool

    def optimizer_groups(self) -> list[dict[str, Any]]: ...
    def schedule(self, optimizer: Any, *, total_steps: int, steps_per_epoch: int) -> Any: ...
    def total_steps(self, steps_per_epoch: int) -> int: ...
    def loss(self, module: Any, batch: dict[str, torch.Tensor], *, stream: str, step: int,
             micro: int) -> tuple[torch.Tensor, dict[str, tuple[Any, Any]]]: ...
    def before_optimizer_step(self, step: int) -> None: ...
    def evaluate(self, model: Any, shard: EvalShard | None) -> dict[str, Any]: ...
    def better(self, new: float, best: float | None) -> bool: ...
    def export(self, model: Any, folder: Path) -> None: ...
    def summary(self) -> dict[str, Any]: ...
    def flops_per_token(self) -> float | None: ...


class Trainer:
    """One run in one output dir: ``with Trainer(cfg) as t:`` -> ``start()`` -> ``fit(obj)``."""

    def __init__(self, cfg: DictConfig, *, resumable_keys: tuple[str, ...]) -> None:
        """Lock the output dir (main process), then read-only checks of it, before any work.

        The lock comes first so that a second run on the same output dir (a
        double-submitted job) is refused before it reads checkpoints the first
        one may be rotating away. It is held until :meth:`close`.
        """
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir).expanduser().resolve()
        self.resolved = OmegaConf.to_container(cfg, resolve=True)
        checkpoint.check_output_dir_path(self.output_dir)
        self.lock = checkpoint.OutputDirLock(self.output_dir)
        if launch.launched_rank() == 0:
            self.lock.acquire()
        try:  # a refused run releases the lock (matters in-process: tests, notebooks)
            self.resuming = checkpoint.prepare_output_dir(
                self.output_dir, self.resolved, overwrite=cfg.overwrite_output_dir,
                may_differ=resumable_keys)
            self.ckpt_root = self.output_dir / "checkpoints"
            # Only the main process hashes the files; the others' choice is provisional, replaced
            # by the main one's once the process group exists (start()).
            self.resume_from = (checkpoint.latest_checkpoint(
                self.ckpt_root, checksums=launch.launched_rank() == 0) if self.resuming
                else None)
        except BaseException:
            self.lock.release()
            raise
        self.accelerator: Any = None
        self._claimed = False

    def close(self) -> None:
        """Release the output-dir lock (the OS also drops it when the process dies)."""
        self.lock.release()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ before training

    def finished(self) -> dict[str, Any] | None:
        """The metrics of a finished run in this output dir (nothing to do), else None."""
        path = self.output_dir / METRICS
        if not self.resuming or not path.is_file():
            return None
        metrics = json.loads(path.read_text())
        max_steps = self.cfg.train.max_steps if "max_steps" in self.cfg.train else None
        finished_with = metrics.get("config", {}).get("train", {}).get("max_steps")
        if checkpoint.verify(self.output_dir / "final") is not None or (
                max_steps is not None and finished_with != max_steps):
            return None  # final/ broken, or train.max_steps changed: resume
        logging.getLogger("further_pt").warning(
            "%s already holds a finished run of %d steps: nothing to do", self.output_dir,
            metrics.get("steps", 0))
        return metrics

    def start(self, *, find_unused_parameters: bool = False) -> None:
        """Accelerate and logging. Call once the read-only checks have passed."""
        logging.basicConfig(  # first, so the precision and thread choices are logged
            level=logging.INFO if launch.launched_rank() == 0 else logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        t = self.cfg.train
        self.accelerator = launch.make_accelerator(
            t.mixed_precision, self.output_dir / "logs",
            find_unused_parameters=find_unused_parameters,
            collective_timeout_s=t.collective_timeout_s, tf32=t.tf32, trackers=list(t.trackers))
        self.sharded = launch.check_engine(self.accelerator)  # refuses; FSDP: gather to save
        global_batch = t.global_batch_size
        if global_batch is not None and self.resuming and not checkpoint.saved_has_key(
                self.output_dir, "train.global_batch_size"):
            # a run started before the key existed keeps its per-device batch
            global_batch = None
            logger.warning("%s was started before train.global_batch_size existed: it resumes "
                           "with its per-device batch (train.global_batch_size=null)",
                           self.output_dir)
        self.batch_size, self.accum, batch_note = step_.resolve_batch(
            t.batch_size, t.gradient_accumulation_steps, global_batch, self.world)
        if self.is_main:
            logger.info(batch_note)
        if self.world > 1:  # rank 0 verified its choice; every process resumes that one
            self.resume_from = checkpoint.agree_on_checkpoint(
                self.resume_from, rank=self.rank, broadcast=broadcast_object_list,
                root=self.ckpt_root)
        if self.resume_from is not None:
            checkpoint.check_same_engine(self.resume_from, self.sharded)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def claim(self) -> None:
        """Write config.yaml (discarding an old run under overwrite) once the inputs are read.

        Objectives call it after reading their data and before writing into the
        output dir (a tokenizer trained from scratch), so a bad input never leaves
        a half-made run behind. Idempotent.
        """
        if self._claimed:
            return
        if self.is_main:
            if not self.resuming:
                checkpoint.write_config(self.output_dir, self.resolved,
                                        overwrite=self.cfg.overwrite_output_dir)
            checkpoint.remove_partial(self.ckpt_root)
        self.accelerator.wait_for_everyone()
        self._claimed = True

    # ------------------------------------------------------------------ the loop

    def fit(self, objective: Objective) -> dict[str, Any]:
        """Train ``objective`` to its last step; return what metrics.json holds."""
        cfg, t, acc = self.cfg, self.cfg.train, self.accelerator
        self.claim()
        device, on_gpu = acc.device, acc.device.type == "cuda"
        batch_size, accum = self.batch_size, self.accum
        workers = cfg.data.dataloader_workers

        # Data: one resumable stream per dataset; a step draws its stream in proportion to size.
        samplers, loaders = {}, {}
        for s in objective.streams:
            samplers[s.name] = launch.ResumableSampler(
                len(s.dataset), seed=cfg.seed, rank=self.rank, world_size=self.world,
                lengths=s.lengths, batch_size=batch_size)
            loaders[s.name] = DataLoader(
                s.dataset, batch_size=batch_size, sampler=samplers[s.name], drop_last=s.drop_last,
                collate_fn=s.collate, num_workers=workers, pin_memory=on_gpu,
                persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                # Its own generator: a new iterator otherwise draws from the global RNG,
                # which would shift dropout after a resume.
                generator=torch.Generator().manual_seed(cfg.seed))
        micro_per_epoch = {s.name: (samplers[s.name].per_rank // batch_size if s.drop_last
                                    else math.ceil(samplers[s.name].per_rank / batch_size))
                           for s in objective.streams}
        empty = [name for name, n in micro_per_epoch.items() if n == 0]
        if empty:
            s = next(x for x in objective.streams if x.name == empty[0])
            raise SetupError(
                f"the training data ({empty[0]}) gives {len(s.dataset)} examples, fewer than one "
                f"batch of {batch_size} x {self.world} process(es); add data or lower "
                "train.batch_size")
        steps_per_epoch = sum(math.ceil(n / accum) for n in micro_per_epoch.values())
        total_steps = objective.total_steps(steps_per_epoch)
        every = cfg.checkpoint.every_steps or steps_per_epoch
        sizes = torch.tensor([float(len(s.dataset)) for s in objective.streams])

        # Fused AdamW (one kernel over all tensors): on a CPU it takes MiniLM's update from
        # ~115 ms to ~15 ms a step; torch's default there is the per-tensor loop.
        optimizer = torch.optim.AdamW(
            objective.optimizer_groups(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_epsilon, fused=device.type in ("cuda", "cpu") or None)
        scheduler = objective.schedule(optimizer, total_steps=total_steps,
                                       steps_per_epoch=steps_per_epoch)
        if device.type == "cpu" and t.fast_cpu_dropout:
            swapped = dropout.install(objective.module)
            logger.info("CPU dropout: %(dropout_modules)d dropout layers and the attention of "
                        "%(attention_models)d model(s) draw their masks with further_pt's fast "
                        "sampler (train.fast_cpu_dropout)", swapped)
        if self.is_main:
            checkpoint.check_writable(self.output_dir,
                                      launch.checkpoint_bytes(objective.module))
        # FSDP: the main process keeps a plain full copy, into which the weights are
        # gathered to save or evaluate (exports and evaluation stay the DDP code path).
        self._full = (copy.deepcopy(objective.module).to(device)
                      if self.sharded and self.is_main else None)
        if t.compile:  # in place, before DDP wraps it: saved names and hooks stay the same
            objective.module.compile()
        module, optimizer = acc.prepare(objective.module, optimizer)
        self._flops = self._flops_per_second_peak(objective)

        state: dict[str, Any] = {"step": 0, "streams": {s.name: [0, 0] for s in objective.streams},
                                 "tokens": 0, "nonfinite_steps": 0, "best": None,
                                 "best_epoch": None, "history": [], "sharded": self.sharded,
                                 "world_size": self.world, "micro_batch_size": batch_size,
                                 "global_batch": batch_size * accum * self.world}
        if self.resume_from is not None:
            saved, optimizer_state = checkpoint.load_training_state(self.resume_from, scheduler)
            positions, converted = step_.resume_positions(
                saved, world=self.world, batch_size=batch_size, accumulation=accum,
                grouped=any(s.lengths is not None for s in objective.streams))
            self._load_optimizer(module, optimizer, optimizer_state)
            if acc.scaler is not None and saved.get("grad_scaler"):
                acc.scaler.load_state_dict(saved["grad_scaler"])  # fp16: the scale it had
            state.update({**saved, "streams": positions, "world_size": self.world,
                          "micro_batch_size": batch_size, "global_batch": state["global_batch"]})
            logger.info("resuming from %s (step %d)", self.resume_from, state["step"])
            if converted and self.is_main:
                logger.info(converted)
        elif self.resuming:
            logger.info("no complete checkpoint in %s: starting from step 0", self.ckpt_root)
        iters = {s.name: launch.micro_batches(loaders[s.name], samplers[s.name], batch_size,
                                                *state["streams"][s.name])
                 for s in objective.streams}
        names = [s.name for s in objective.streams]

        log = launch.MetricsLog(acc, self.output_dir / "logs", objective.name, self.resolved,
                                  resumed_at=state["step"])
        step = state["step"]
        whole, whole_at = None, -1  # the model to save/evaluate, gathered at step whole_at
        window: dict[str, torch.Tensor] = {}  # name -> [numerator, denominator], on the device
        window_steps, window_start = 0, time.perf_counter()
        bar = tqdm(total=total_steps, initial=step, desc=objective.name, unit="step",
                   disable=not self.is_main, dynamic_ncols=True)
        module.train()
        watch = launch.PreemptionWatch(every=t.stop_check_every_steps)
        skips = step_.NonfiniteSteps(device, t.max_nonfinite_steps, state)
        prepare_batch = getattr(objective, "prepare_batch", None)
        try:
            while step < total_steps:
                torch.manual_seed(launch.step_seed(cfg.seed, step, self.rank))  # dropout
                gen = torch.Generator().manual_seed(launch.step_seed(cfg.seed, step))
                name = names[int(torch.multinomial(sizes, 1, generator=gen))] if len(
                    names) > 1 else names[0]  # the same draw on every process
                step_loss = torch.zeros((), device=device)
                for micro in range(accum):
                    epoch, position, batch = next(iters[name])
                    state["streams"][name] = [epoch, position]
                    if prepare_batch is not None:
                        batch = prepare_batch(batch, stream=name, step=step, micro=micro)
                        if on_gpu:  # new tensors: pinned, so the copy below is asynchronous
                            batch = {k: v.pin_memory() for k, v in batch.items()}
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    sync = (acc.no_sync(module) if micro < accum - 1
                            else contextlib.nullcontext())
                    with sync, acc.autocast():
                        loss, metrics = objective.loss(module, batch, stream=name, step=step,
                                                       micro=micro)
                        if faults.nan_from(step + 1):
                            loss = loss * float("nan")
                        elif faults.overflow_at(step + 1):
                            loss = loss * float("inf")
                        acc.backward(loss / accum)
                    if micro == 0:
                        faults.point("micro", step + 1, self.rank)
                    step_loss += loss.detach() / accum
                    # Summed on the device; read once per logging interval (no sync per step).
                    metrics = {"loss": (loss.detach(), 1),
                               "tokens": (batch["attention_mask"].sum(), 0), **metrics}
                    for key, (num, den) in metrics.items():
                        pair = torch.stack([_scalar(num, device), _scalar(den, device)])
                        window[key] = window[key] + pair if key in window else pair
                objective.before_optimizer_step(step)
                grad_norm, skipped, counted = step_.optimizer_step(
                    acc, module.parameters(), optimizer, scheduler, step_loss,
                    max_grad_norm=t.max_grad_norm)
                step += 1
                skips.add(skipped, counted, step)
                window_steps += 1
                bar.update(1)
                faults.point("step", step, self.rank)
                stop = watch.requested(acc, step)
                evaluate = (objective.metric is not None
                            and (step % steps_per_epoch == 0 or step == total_steps))
                save = step % every == 0 or step == total_steps or stop
                logs = step % t.log_every_steps == 0 or step == total_steps
                if logs or save:  # the loop reads the device here anyway
                    skips.read(state, step, self.ckpt_root)
                if logs:
                    values = self._window_values(window, window_steps, window_start, optimizer,
                                                 grad_norm, state)
                    log.log(step, values)
                    bar.set_postfix(loss=f"{values['train/loss']:.4f}",
                                    tok_s=f"{values['train/tokens_per_s']:.0f}")
                    window.clear()
                    window_steps, window_start = 0, time.perf_counter()
                if evaluate or save:  # every process (FSDP gathers), once per step
                    whole, whole_at = self._whole_model(module), step
                if evaluate and (self.is_main or not self.sharded):
                    self._evaluate(objective, whole, log, state, step,
                                   math.ceil(step / steps_per_epoch))
                if save:
                    optimizer_state = self._optimizer_state(module, optimizer)
                    if self.is_main:
                        if acc.scaler is not None:  # fp16: resume at the scale reached
                            state["grad_scaler"] = acc.scaler.state_dict()
                        checkpoint.save_checkpoint(
                            self.ckpt_root, step, write_model=partial(self._export, objective,
                                                                      whole),
                            optimizer_state=optimizer_state, scheduler=scheduler,
                            state={**state, "step": step}, keep_last=cfg.checkpoint.keep_last)
                    acc.wait_for_everyone()
                    faults.point("after_checkpoint", step, self.rank)
                    if stop:
                        raise Preempted(f"stopped by a signal at step {step}; checkpoint written "
                                        f"to {self.ckpt_root}; run the same command to resume")
        except Exception as exc:
            failed = launch.lost_peers(exc, world=self.world, step=step,
                                         ckpt_root=self.ckpt_root,
                                         timeout_s=t.collective_timeout_s)
            if failed is None:
                raise
            raise failed from exc
        finally:
            watch.close()
            bar.close()
        self._check_replicas(module)
        if whole_at != step:  # the same on every process: nothing gathered at this step
            whole = self._whole_model(module)
        result = self._finish(objective, state, step, whole)
        log.final(step, result)  # main process: metrics.json's numbers; others: {}
        # The DDP reducer must go before the process group: destroyed after it, gloo's
        # destructor can wait forever on a peer that has already exited.
        module = optimizer = None
        acc.free_memory()
        gc.collect()
        log.close()  # ends Accelerate's trackers and the process group: last
        return result

    # ------------------------------------------------------------------ pieces of the loop

    def _window_values(self, window: dict[str, torch.Tensor], steps: int, start: float,
                       optimizer: Any, grad_norm: torch.Tensor, state: dict[str, Any]
                       ) -> dict[str, float]:
        """Reduce the logging window across processes (one all-reduce) into named scalars."""
        elapsed = time.perf_counter() - start
        keys = sorted(window)
        totals = self.accelerator.reduce(torch.stack([window[k] for k in keys]), "sum").tolist()
        sums = dict(zip(keys, totals, strict=True))
        tokens = sums.pop("tokens")[0]
        state["tokens"] += int(tokens)
        values = {f"train/{k}": num / max(den, 1e-12) for k, (num, den) in sums.items()}
        lrs = layerwise.group_lrs(optimizer)
        values.update({"train/lr": next(iter(lrs.values())),
                       "train/tokens_per_s": tokens / elapsed,
                       "train/steps_per_s": steps / elapsed,
                       "train/grad_norm": float(grad_norm)})
        values.update({f"lr/{k}": v for k, v in lrs.items()})  # each named group's rate
        if self._flops is not None:  # model FLOPs utilisation against the dtype's peak
            per_token, peak = self._flops(), self._peak
            values["train/mfu"] = tokens / elapsed * per_token / (peak * self.world)
        return values

    def _flops_per_second_peak(self, objective: Objective) -> Any:
        """The objective's FLOPs-per-token function, after finding the dtype's peak FLOP/s.

        The peak is that of the precision the run computes in (a bf16 run against the
        bf16 peak, which on AMX CPUs is ~6x the fp32 one; an fp32 run under TF32 against
        the TF32 peak): a GPU's datasheet dense peak where the device is known, else a
        sustained measurement (:func:`further_pt.train.hardware.peak_flops`). Logged with its
        source.
        """
        per_token = objective.flops_per_token()
        if per_token is None:
            return None
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            str(self.accelerator.mixed_precision), torch.float32)
        device = self.accelerator.device
        tf32 = bool(self.cfg.train.tf32) and device.type == "cuda" and (
            torch.cuda.get_device_capability(device)[0] >= 8)  # as make_accelerator set it
        peak, source = hardware.peak_flops(dtype, device, tf32=tf32)
        logger.info("MFU is logged against %s per process (%s); the model does %s "
                    "per token", hardware.si(peak), source, hardware.si(per_token, "FLOP"))
        self._peak = peak
        return objective.flops_per_token  # asked at each log: it can change with the phase

    def _whole_model(self, module: Any) -> Any:
        """The model to save or evaluate, on the main process (None elsewhere under FSDP).

        Under data parallelism every process holds the whole model: this is it, unwrapped.
        Under FSDP each holds a shard: every process must call this (the gather is a
        collective), and the full weights land in the main process's plain copy.
        """
        if not self.sharded:
            return self.accelerator.unwrap_model(module)
        weights = self.accelerator.get_state_dict(module)  # full on the main process only
        if not self.is_main:
            return None
        self._full.load_state_dict(weights)
        return self._full

    def _optimizer_state(self, module: Any, optimizer: Any) -> dict[str, Any]:
        """What ``optimizer.pt`` holds: the state dict, or under FSDP the gathered full one."""
        if not self.sharded:
            return optimizer.state_dict()
        return get_optimizer_state_dict(module, optimizer.optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))  # every process; full on the main one

    def _load_optimizer(self, module: Any, optimizer: Any, saved: dict[str, Any]) -> None:
        """Restore ``optimizer.pt``: as saved, or under FSDP cut into this process's shard."""
        if not self.sharded:
            optimizer.load_state_dict(saved)
            return
        set_optimizer_state_dict(module, optimizer.optimizer, saved,
                                 options=StateDictOptions(full_state_dict=True))

    def _evaluate(self, objective: Objective, whole: Any, log: Any, state: dict[str, Any],
                  step: int, epoch: int) -> None:
        """At an epoch end: evaluate (each process a shard, under FSDP the main one alone);
        the main process logs and keeps the best model in ``best/``."""
        shard = None if self.sharded else EvalShard(
            self.rank, self.world,
            partial(self.accelerator.gather_for_metrics, use_gather_object=True))
        results = objective.evaluate(whole, shard)
        if not results or not self.is_main:
            return
        scalars = {k: v for k, v in results.items() if isinstance(v, int | float)}
        log.log(step, scalars)
        state["history"].append({"epoch": epoch, "step": step, **scalars})
        logger.info("epoch %d: %s (evaluated on %d process%s)", epoch, ", ".join(
            f"{k}={v:.4f}" for k, v in scalars.items() if k.count("_") <= 2),
            1 if self.sharded else self.world, "" if self.sharded or self.world == 1 else "es")
        score = results[f"eval_{objective.metric}"]
        if objective.better(score, state["best"]):
            state["best"], state["best_epoch"] = score, epoch

            def save_best(folder: Path) -> None:
                self._export(objective, whole, folder)
                (folder / "eval_results.json").write_text(json.dumps(results, indent=1))

            checkpoint.save_model_folder(self.output_dir / "best", save_best)

    def _export(self, objective: Objective, whole: Any, folder: Path) -> None:
        """``objective.export``, plus the base model's sentence-transformers modules.

        A sentence-transformers base (all-MiniLM-L6-v2, e5, bge) owes its embeddings to
        modules.json, its pooling and its normalisation as much as to its weights; a folder
        without them loads in ``SentenceTransformer`` with plain mean pooling and no
        normalisation. So every folder written (checkpoints, ``best/``, ``final/``) carries
        them over from ``model.name_or_path`` (read once, see :func:`model.st_modules`).
        """
        objective.export(whole, folder)
        if not hasattr(self, "_st_files"):
            self._st_files = st_modules(self.cfg.model.name_or_path)
        write_st_modules(self._st_files, folder)

    def _check_replicas(self, module: Any) -> None:
        """DDP keeps replicas in sync; prove it before the final model is written."""
        if self.sharded:  # FSDP: each process holds another shard, by design
            return
        checksum = torch.stack([p.detach().double().sum() for p in module.parameters()]).sum()
        sums = self.accelerator.gather(checksum.reshape(1)).tolist()
        if len(set(sums)) != 1:
            raise TrainingFailed(f"the {self.world} processes ended with different weights: "
                                 f"{sums}")
        if self.world > 1:
            logger.info("weights identical on all %d processes (checksum %.6f)", self.world,
                        sums[0])

    def _finish(self, objective: Objective, state: dict[str, Any], step: int,
                whole: Any) -> dict[str, Any]:
        """``final/``: the best evaluated model if there is one, else the last; metrics.json."""
        metrics: dict[str, Any] = {}
        if self.is_main:
            best, final = self.output_dir / "best", self.output_dir / "final"
            if best.is_dir():
                metrics = json.loads((best / "eval_results.json").read_text())
                final_from = f"best epoch {state['best_epoch']} by eval_{objective.metric}"
                checkpoint.save_model_folder(
                    final, lambda f: shutil.copytree(best, f, dirs_exist_ok=True))
            else:
                final_from = f"last step ({step})"
                checkpoint.save_model_folder(final, partial(self._export, objective, whole))
            metrics.update({"final_model": final_from, "best_epoch": state["best_epoch"],
                            "steps": step, "tokens": state["tokens"],
                            "nonfinite_steps": state["nonfinite_steps"],
                            "history": state["history"], **objective.summary(),
                            "config": self.resolved})
            checkpoint.atomic_write_text(self.output_dir / METRICS,
                                         json.dumps(metrics, indent=1))
        self.accelerator.wait_for_everyone()
        return metrics


def _scalar(value: Any, device: torch.device) -> torch.Tensor:
    """A float64 scalar on ``device``; a Python number is filled there (no blocking copy)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float64)
    return torch.full((), float(value), dtype=torch.float64, device=device)
