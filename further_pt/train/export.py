"""Export: what leaves the loop. The whole model (gathered under FSDP), the optimizer state,
the folders a run writes (checkpoints' models, ``best/``, ``final/``) and metrics.json.

Under data parallelism every process holds the whole model and the same optimizer state;
under FSDP each holds a shard, so every save and evaluation first gathers the full weights
into a plain copy on the main process (in CPU memory: on the GPU only while it evaluates).
Both go through the same calls here, and the code that writes folders and evaluates stays
the data-parallel path.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from further_pt.errors import TrainingFailed
from further_pt.files import atomic_write_text
from further_pt.objectives.base import EvalShard, Objective
from further_pt.objectives.encoder import st_modules, write_st_modules
from further_pt.train import checkpoint, hub, model_card

logger = logging.getLogger(__name__)

METRICS = "metrics.json"


class Exporter:
    """The saves and gathers of one run in ``output_dir``, on every process."""

    def __init__(self, accelerator: Any, output_dir: Path, *, sharded: bool, cfg: Any,
                 resolved: dict[str, Any]) -> None:
        self.accelerator, self.output_dir, self.sharded = accelerator, output_dir, sharded
        self.cfg, self.base_model, self.resolved = cfg, cfg.model.name_or_path, resolved
        self._full: Any = None
        self._eval_device: torch.device | None = None
        self._st_files: dict[str, bytes] | None = None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def keep_full_copy(self, module: torch.nn.Module, device: torch.device) -> None:
        """FSDP: the main process keeps a plain full copy, into which the weights are
        gathered to save or evaluate (call before Accelerate wraps the module).

        The copy lives in CPU memory, where the gather lands (``get_state_dict`` offloads
        to the CPU) and from where folders are written. Kept on the GPU (``device``) it
        would hold a whole fp32 model there for the run, on rank 0 alone: the memory FSDP
        exists to spread, and the first OOM of an otherwise balanced job. It visits
        ``device`` only for the length of an evaluation (:meth:`evaluate`).
        """
        if self.sharded and self.is_main:
            self._full = copy.deepcopy(module).to("cpu")
            self._eval_device = device

    def whole(self, module: Any) -> Any:
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

    def optimizer_state(self, module: Any, optimizer: Any) -> dict[str, Any]:
        """What ``optimizer.pt`` holds: the state dict, or under FSDP the gathered full one."""
        if not self.sharded:
            return optimizer.state_dict()
        return get_optimizer_state_dict(module, optimizer.optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))  # every process; full on the main one

    def load_optimizer(self, module: Any, optimizer: Any, saved: dict[str, Any]) -> None:
        """Restore ``optimizer.pt``: as saved, or under FSDP cut into this process's shard
        from the main process's copy (``saved`` is ``{}`` on the others)."""
        if not self.sharded:
            optimizer.load_state_dict(saved)
            return
        # Only the main process read optimizer.pt (checkpoint.load_training_state): the others
        # pass {} and receive their shards from it, one tensor at a time.
        set_optimizer_state_dict(module, optimizer.optimizer, saved, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))

    def folder(self, objective: Objective, whole: Any, folder: Path) -> None:
        """``objective.export``, plus the base model's sentence-transformers modules.

        A sentence-transformers base (all-MiniLM-L6-v2, e5, bge) owes its embeddings to
        modules.json, its pooling and its normalisation as much as to its weights; a folder
        without them loads in ``SentenceTransformer`` with plain mean pooling and no
        normalisation. So every folder written (checkpoints, ``best/``, ``final/``) carries
        them over from ``model.name_or_path`` (read once, see :func:`encoder.st_modules`).
        """
        objective.export(whole, folder)
        if self._st_files is None:
            self._st_files = st_modules(self.base_model)
        write_st_modules(self._st_files, folder)

    def card(self, objective: Objective, folder: Path, state: dict[str, Any], step: int,
             results: dict[str, Any]) -> None:
        """The folder's README.md: a model card with these results."""
        model_card.write(folder, objective.card(), {
            "config": self.resolved, "step": step, "tokens": state["tokens"],
            "global_batch": state["global_batch"],
            "precision": str(self.accelerator.mixed_precision)}, results)

    def evaluate(self, objective: Objective, whole: Any, log: Any, state: dict[str, Any],
                 step: int, epoch: int) -> None:
        """At an epoch end (or every ``eval.every_steps``): evaluate (each process a shard,
        under FSDP the main one alone); the main process logs, keeps the best model in
        ``best/`` and counts the evaluations since the best (``evals_since_best``, saved with
        the checkpoint's state so that a resumed run stops early where it would have)."""
        acc = self.accelerator
        shard = None if self.sharded else EvalShard(
            acc.process_index, acc.num_processes,
            partial(acc.gather_for_metrics, use_gather_object=True))
        if self.sharded:  # the main process's full copy: on the GPU for this evaluation only
            whole.to(self._eval_device)
        try:
            results = objective.evaluate(whole, shard)
        finally:
            if self.sharded:
                whole.to("cpu")
        if not results or not self.is_main:
            return
        scalars = {k: v for k, v in results.items() if isinstance(v, int | float)}
        log.log(step, scalars)
        state["history"].append({"epoch": epoch, "step": step, **scalars})
        world = acc.num_processes
        logger.info("step %d (epoch %d): %s (evaluated on %d process%s)", step, epoch, ", ".join(
            f"{k}={v:.4f}" for k, v in scalars.items() if k.count("_") <= 2),
            1 if self.sharded else world, "" if self.sharded or world == 1 else "es")
        score = results[f"eval_{objective.metric}"]
        state["evals_since_best"] = state.get("evals_since_best", 0) + 1
        if objective.better(score, state["best"]):
            state["best"], state["best_epoch"], state["best_step"] = score, epoch, step
            state["evals_since_best"] = 0

            def save_best(folder: Path) -> None:
                self.folder(objective, whole, folder)
                (folder / "eval_results.json").write_text(json.dumps(results, indent=1))
                self.card(objective, folder, state, step, results)

            checkpoint.save_model_folder(self.output_dir / "best", save_best)

    def patience_spent(self, state: dict[str, Any], patience: int | None, step: int) -> bool:
        """Early stopping: whether the last ``patience`` evaluations all failed to beat the
        best, on every process (the main one keeps the count: it alone evaluates under FSDP)."""
        if patience is None:
            return False
        spent = self.is_main and state.get("evals_since_best", 0) >= patience
        if self.accelerator.num_processes > 1:
            spent = broadcast_object_list([spent])[0]
        if spent and self.is_main and "stopped_early_at" not in state:
            state["stopped_early_at"] = step
            logger.info("early stopping at step %d: %d evaluations in a row did not beat the "
                        "best, %.4f at step %d (train.early_stopping_patience)", step, patience,
                        state["best"], state["best_step"])
        return bool(spent)

    def check_replicas(self, module: Any) -> None:
        """DDP keeps replicas in sync; prove it before the final model is written."""
        if self.sharded:  # FSDP: each process holds another shard, by design
            return
        checksum = torch.stack([p.detach().double().sum() for p in module.parameters()]).sum()
        sums = self.accelerator.gather(checksum.reshape(1)).tolist()
        world = self.accelerator.num_processes
        if len(set(sums)) != 1:
            raise TrainingFailed(f"the {world} processes ended with different weights: {sums}")
        if world > 1:
            logger.info("weights identical on all %d processes (checksum %.6f)", world, sums[0])

    def finish(self, objective: Objective, state: dict[str, Any], step: int,
               whole: Any) -> dict[str, Any]:
        """``final/``: the best evaluated model if there is one, else the last; metrics.json."""
        metrics: dict[str, Any] = {}
        if self.is_main:
            best, final = self.output_dir / "best", self.output_dir / "final"
            if best.is_dir():
                metrics = json.loads((best / "eval_results.json").read_text())
                final_from = (f"best epoch {state['best_epoch']} (step {state.get('best_step')}) "
                              f"by eval_{objective.metric}")
                checkpoint.save_model_folder(
                    final, lambda f: shutil.copytree(best, f, dirs_exist_ok=True))
            else:
                final_from = f"last step ({step})"
                if state["history"]:  # evaluated, no best model kept: the last evaluation
                    metrics.update({k: v for k, v in state["history"][-1].items()
                                    if k.startswith("eval_")})

                def save_final(folder: Path) -> None:
                    self.folder(objective, whole, folder)
                    self.card(objective, folder, state, step, metrics)

                checkpoint.save_model_folder(final, save_final)
            if "stopped_early_at" in state:  # train.early_stopping_patience ended the run
                metrics["stopped_early_at"] = state["stopped_early_at"]
            metrics.update({"final_model": final_from, "best_epoch": state["best_epoch"],
                            "best_step": state.get("best_step"),
                            "steps": step, "tokens": state["tokens"],
                            "nonfinite_steps": state["nonfinite_steps"],
                            "history": state["history"], **objective.summary(),
                            "config": self.resolved})
            atomic_write_text(self.output_dir / METRICS, json.dumps(metrics, indent=1))
            if hub.wanted(self.cfg):
                hub.upload(self.cfg, final, f"further_pt: final model, {final_from}")
        self.accelerator.wait_for_everyone()
        return metrics
