"""Trainer: the one training loop every objective runs in.

An objective (:mod:`further_pt.objectives`: masked-LM pretraining, classification
fine-tuning, ...) brings what is its own, through the interface of
:mod:`further_pt.objectives.base`; the Trainer owns what every run shares:

- the output dir: checked read-only before any work, claimed (config.yaml) once the
  inputs have been read, a finished run recognised and left alone (:mod:`.output_dir`);
- Accelerate: processes, devices, mixed precision, DDP and ``no_sync`` (:mod:`.launch`);
- data order: one resumable stream per dataset, a stream drawn per step by size
  (multi-task) (:mod:`.batches`);
- the step: accumulation, the optimizer-step guard (non-finite losses are skipped and
  counted), the schedule, fault-injection points (:mod:`.step`, :mod:`.faults`);
- named-metric logging (TensorBoard + ``logs/metrics.jsonl``), progress bar
  (:mod:`.metrics_log`);
- evaluation at epoch ends (or every ``eval.every_steps``) with the best model kept in
  ``best/`` and early stopping after ``train.early_stopping_patience``, the final export to
  ``final/`` and ``metrics.json``, and under FSDP the gathers that make every saved folder
  and evaluation see the whole model (:mod:`.export`);
- checkpoints, resume, preemption (SIGTERM -> checkpoint, exit 75) (:mod:`.checkpoint`).

The loop (:meth:`Trainer.fit`) reads top to bottom, as nanoGPT's does.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from further_pt.data import order
from further_pt.errors import Preempted
from further_pt.objectives.base import Objective
from further_pt.train import checkpoint, dropout, faults, hub, launch, metrics_log, output_dir
from further_pt.train import step as step_
from further_pt.train.batches import Batches, host_side
from further_pt.train.export import METRICS, Exporter

logger = logging.getLogger(__name__)


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
        hub.check_reachable(cfg)  # an upload that cannot happen fails now, not at the end
        output_dir.check_output_dir_path(self.output_dir)
        self.lock = output_dir.OutputDirLock(self.output_dir)
        if launch.launched_rank() == 0:
            self.lock.acquire()
        try:  # a refused run releases the lock (matters in-process: tests, notebooks)
            self.resuming = output_dir.prepare_output_dir(
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
            find_unused_parameters=find_unused_parameters, comm_hook=t.ddp_comm_hook,
            collective_timeout_s=t.collective_timeout_s, tf32=t.tf32, trackers=list(t.trackers))
        self.sharded = launch.check_engine(self.accelerator)  # refuses; FSDP: gather to save
        global_batch = t.global_batch_size
        if global_batch is not None and self.resuming and not output_dir.saved_has_key(
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
        if self.is_main and hub.wanted(self.cfg):
            hub.create(self.cfg)

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
                output_dir.write_config(self.output_dir, self.resolved,
                                        overwrite=self.cfg.overwrite_output_dir)
            checkpoint.remove_partial(self.ckpt_root)
        self.accelerator.wait_for_everyone()
        self._claimed = True

    # ------------------------------------------------------------------ the loop

    def fit(self, objective: Objective) -> dict[str, Any]:
        """Train ``objective`` to its last step; return what metrics.json holds."""
        cfg, t, acc = self.cfg, self.cfg.train, self.accelerator
        self.claim()
        device = acc.device
        accum = self.accum
        batches = Batches(objective.streams, seed=cfg.seed, rank=self.rank, world=self.world,
                          batch_size=self.batch_size, accumulation=accum,
                          workers=cfg.data.dataloader_workers, pin_memory=device.type == "cuda")
        steps_per_epoch = batches.steps_per_epoch
        total_steps = objective.total_steps(steps_per_epoch)
        every = cfg.checkpoint.every_steps or steps_per_epoch
        # evaluations: at epoch ends, or every eval.every_steps; early stopping after `patience`
        eval_every = getattr(objective, "eval_every_steps", None) or steps_per_epoch
        patience = getattr(objective, "early_stopping_patience", None)

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
            output_dir.check_writable(self.output_dir,
                                      launch.checkpoint_bytes(objective.module))
        export = Exporter(acc, self.output_dir, sharded=self.sharded, cfg=cfg,
                          resolved=self.resolved)
        export.keep_full_copy(objective.module, device)
        if t.compile:  # in place, before DDP wraps it: saved names and hooks stay the same
            objective.module.compile()
        module, optimizer = acc.prepare(objective.module, optimizer)
        window = metrics_log.Window(acc, objective, tf32=bool(t.tf32))

        state = self._resume(module, optimizer, scheduler, export, objective, batches.grouped)
        batches.start(state["streams"])
        log = metrics_log.MetricsLog(acc, self.output_dir / "logs", objective.name,
                                     self.resolved, resumed_at=state["step"])
        step = state["step"]
        whole, whole_at = None, -1  # the model to save/evaluate, gathered at step whole_at
        bar = tqdm(total=total_steps, initial=step, desc=objective.name, unit="step",
                   disable=not self.is_main, dynamic_ncols=True)
        module.train()
        watch = launch.PreemptionWatch(every=t.stop_check_every_steps)
        skips = step_.NonfiniteSteps(device, t.max_nonfinite_steps, state)
        early = export.patience_spent(state, patience, step)  # a run resumed after it stopped
        try:
            while step < total_steps and not early:
                torch.manual_seed(order.step_seed(cfg.seed, step, self.rank))  # dropout
                name = batches.stream_at(step)  # the same draw on every process
                step_loss = torch.zeros((), device=device)
                for micro in range(accum):
                    epoch, position, batch = batches.next(name)
                    state["streams"][name] = [epoch, position]
                    # drops an all-ones attention mask; pins for an asynchronous copy
                    batch, tokens = host_side(batch, pin=device.type == "cuda")
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
                    window.add({"loss": (loss.detach(), 1), "tokens": (tokens, 0), **metrics},
                               device)
                objective.before_optimizer_step(step)
                grad_norm, skipped, counted = step_.optimizer_step(
                    acc, module.parameters(), optimizer, scheduler, step_loss,
                    max_grad_norm=t.max_grad_norm)
                step += 1
                skips.add(skipped, counted, step)
                window.steps += 1
                bar.update(1)
                faults.point("step", step, self.rank)
                stop = watch.requested(acc, step)
                evaluate = (objective.metric is not None
                            and (step % eval_every == 0 or step == total_steps))
                save = step % every == 0 or step == total_steps or stop
                logs = step % t.log_every_steps == 0 or step == total_steps
                if logs or save:  # the loop reads the device here anyway
                    skips.read(state, step, self.ckpt_root)
                if logs:
                    values = window.values(optimizer, grad_norm, state)
                    log.log(step, values)
                    bar.set_postfix(loss=f"{values['train/loss']:.4f}",
                                    tok_s=f"{values['train/tokens_per_s']:.0f}")
                if evaluate or save:  # every process (FSDP gathers), once per step
                    whole, whole_at = export.whole(module), step
                if evaluate and (self.is_main or not self.sharded):
                    export.evaluate(objective, whole, log, state, step, -(-step // steps_per_epoch)
                                    if steps_per_epoch else state["streams"][name][0] + 1)
                if evaluate:  # every process: the main one decides
                    early = export.patience_spent(state, patience, step)
                if save:
                    optimizer_state = export.optimizer_state(module, optimizer)
                    if self.is_main:
                        if acc.scaler is not None:  # fp16: resume at the scale reached
                            state["grad_scaler"] = acc.scaler.state_dict()
                        checkpoint.save_checkpoint(
                            self.ckpt_root, step,
                            write_model=partial(export.folder, objective, whole),
                            optimizer_state=optimizer_state, scheduler=scheduler,
                            state={**state, "step": step}, keep_last=cfg.checkpoint.keep_last)
                        if hub.wanted(cfg) and cfg.hub.strategy == "every_checkpoint":
                            hub.upload(cfg, checkpoint.folder_of(self.ckpt_root, step),
                                       f"further_pt: checkpoint at step {step}")
                    acc.wait_for_everyone()
                    faults.point("after_checkpoint", step, self.rank)
                    if stop:
                        raise Preempted(f"stopped by a signal at step {step}; checkpoint written "
                                        f"to {self.ckpt_root}; run the same command to resume")
        except Exception as exc:
            failed = launch.lost_peers(exc, world=self.world, step=step, ckpt_root=self.ckpt_root,
                                       timeout_s=t.collective_timeout_s)
            if failed is None:
                raise
            raise failed from exc
        finally:
            watch.close()
            bar.close()
        export.check_replicas(module)
        if whole_at != step:  # the same on every process: nothing gathered at this step
            whole = export.whole(module)
        result = export.finish(objective, state, step, whole)
        log.final(step, result)  # main process: metrics.json's numbers; others: {}
        # The DDP reducer must go before the process group: destroyed after it, gloo's
        # destructor can wait forever on a peer that has already exited.
        module = optimizer = None
        acc.free_memory()
        gc.collect()
        log.close()  # ends Accelerate's trackers and the process group: last
        return result

    def _resume(self, module: Any, optimizer: Any, scheduler: Any, export: Exporter,
                objective: Objective, grouped: bool) -> dict[str, Any]:
        """The run's state: fresh, or the checkpoint's with its optimizer, scheduler and
        (fp16) loss scale restored and its data position converted to this world size."""
        acc, batch_size = self.accelerator, self.batch_size
        state: dict[str, Any] = {"step": 0, "streams": {s.name: [0, 0] for s in objective.streams},
                                 "tokens": 0, "nonfinite_steps": 0, "best": None,
                                 "best_epoch": None, "history": [], "sharded": self.sharded,
                                 "world_size": self.world, "micro_batch_size": batch_size,
                                 "global_batch": batch_size * self.accum * self.world}
        if self.resume_from is None:
            if self.resuming:
                logger.info("no complete checkpoint in %s: starting from step 0", self.ckpt_root)
            return state
        saved, optimizer_state = checkpoint.load_training_state(self.resume_from, scheduler)
        positions, converted = step_.resume_positions(
            saved, world=self.world, batch_size=batch_size, accumulation=self.accum,
            grouped=grouped)
        export.load_optimizer(module, optimizer, optimizer_state)
        if acc.scaler is not None and saved.get("grad_scaler"):
            acc.scaler.load_state_dict(saved["grad_scaler"])  # fp16: the scale it had
        state.update({**saved, "streams": positions, "world_size": self.world,
                      "micro_batch_size": batch_size, "global_batch": state["global_batch"]})
        logger.info("resuming from %s (step %d)", self.resume_from, state["step"])
        if converted and self.is_main:
            logger.info(converted)
        return state
