"""Metrics log: every named scalar a run logs, to ``logs/metrics.jsonl``, TensorBoard and the
trackers a recipe names (through Accelerate), and the final metrics.

A resumed run appends after the last step its checkpoint holds (lines logged after it are
dropped), so metrics.jsonl holds each step once, as an uninterrupted run's would.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from further_pt.config.recipes import flatten
from further_pt.errors import SetupError
from further_pt.objectives import layerwise
from further_pt.train import hardware

logger = logging.getLogger(__name__)


def _step_of_line(line: str) -> float:
    """The step of a metrics.jsonl line; a torn or foreign line counts as after every step."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


#: The W&B and MLflow run ids of this output dir, so that a resumed run continues them.
TRACKER_RUNS = "trackers.json"


def tracker_config(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config as one level of ``section/key`` scalars, as every tracker takes it.

    TensorBoard's hparams and MLflow's params take only numbers, strings and booleans: a
    list (``data.train_files``) becomes its JSON text and a null ``"null"``, rather than
    being dropped, so the tracker holds the whole recipe that ran.
    """
    return {k: v if isinstance(v, int | float | str | bool) else json.dumps(v)
            for k, v in flatten(config, sep="/").items()}


class MetricsLog:
    """Scalars to the run's trackers (``train.trackers``) and to ``logs/metrics.jsonl``.

    Accelerate drives the trackers: each gets the resolved config when the run starts, the
    same named scalars as metrics.jsonl at every logging step and evaluation, and the final
    metrics (:meth:`final`) at the end. W&B and MLflow runs are named after the output dir;
    their ids are kept in ``logs/trackers.json``, so a run resumed from a checkpoint goes on
    logging into the W&B / MLflow run it started instead of opening one per restart.
    """

    def __init__(self, accelerator: Any, log_dir: Path, run_name: str, config: dict, *,
                 resumed_at: int = 0) -> None:
        """``resumed_at``: the step the run starts from. Lines a killed run wrote after its
        last checkpoint are dropped (they are about to be logged again), as is a line cut
        short by the kill, so that metrics.jsonl holds each step once."""
        self.accelerator = accelerator
        self.path = log_dir / "metrics.jsonl"
        self.runs_path = log_dir / TRACKER_RUNS
        if accelerator.is_main_process:
            log_dir.mkdir(parents=True, exist_ok=True)  # W&B's files go here (below)
        try:
            accelerator.init_trackers(run_name, config=tracker_config(config),
                                      init_kwargs=self._init_kwargs(log_dir, resumed_at))
        except Exception as exc:  # a tracker's server, login or store refused: one line
            text = " ".join(str(exc).split())[:300]
            raise SetupError(f"train.trackers: {[str(t) for t in accelerator.log_with]} could not "
                             f"start ({type(exc).__name__}: {text}); fix its settings (env) "
                             "and rerun, or drop it from train.trackers") from exc
        if accelerator.is_main_process:
            self._remember_runs()
        if accelerator.is_main_process and self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if _step_of_line(line) <= resumed_at]
            if len(kept) < len(lines):
                tmp = self.path.with_name(".metrics.jsonl.tmp")
                tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
                os.replace(tmp, self.path)

    def _init_kwargs(self, log_dir: Path, resumed_at: int) -> dict[str, dict[str, Any]]:
        """Per-tracker arguments: the run's name, W&B's folder, and on resume the run to go on.

        A tracker's own settings stay in its environment variables (``WANDB_MODE``,
        ``MLFLOW_TRACKING_URI``, ...), which these do not override; W&B writes under
        ``logs/`` unless ``WANDB_DIR`` says where.
        """
        label = log_dir.parent.name  # the output dir's name
        saved: dict[str, str] = {}
        if resumed_at and self.runs_path.is_file():
            saved = json.loads(self.runs_path.read_text(encoding="utf-8"))
        wandb: dict[str, Any] = {"name": label}
        if not os.environ.get("WANDB_DIR"):
            wandb["dir"] = str(log_dir)
        mlflow: dict[str, Any] = {"run_name": label}
        if "wandb" in saved:
            wandb.update(id=saved["wandb"], resume="allow")
        if "mlflow" in saved:
            mlflow = {"run_id": saved["mlflow"]}
        return {"wandb": wandb, "mlflow": mlflow}

    def _remember_runs(self) -> None:
        """Write the W&B / MLflow run ids this run logs to (main process)."""
        ids = {}
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                ids["wandb"] = tracker.tracker.id
            elif tracker.name == "mlflow":
                ids["mlflow"] = tracker.tracker.info.run_id
        if ids:
            tmp = self.runs_path.with_name(f".{TRACKER_RUNS}.tmp")
            tmp.write_text(json.dumps(ids, indent=1), encoding="utf-8")
            os.replace(tmp, self.runs_path)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")

    def final(self, step: int, metrics: dict[str, Any]) -> None:
        """metrics.json's numbers (eval metrics, steps, tokens, best epoch) as ``final/<key>``,
        so a tracker's run table shows each run's outcome without reading its history."""
        flat = flatten({k: v for k, v in metrics.items() if k not in ("config", "history")},
                       sep="/")
        values = {f"final/{k}": v for k, v in flat.items()
                  if isinstance(v, int | float) and not isinstance(v, bool)}
        if values:
            self.accelerator.log(values, step=step)

    def close(self) -> None:
        """Flush the trackers. Accelerate also destroys the process group here: call last."""
        self.accelerator.end_training()


# --------------------------------------------------------------------------- the log window


def _scalar(value: Any, device: torch.device) -> torch.Tensor:
    """A float64 scalar on ``device``; a Python number is filled there (no blocking copy)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float64)
    return torch.full((), float(value), dtype=torch.float64, device=device)


class Window:
    """The named metrics of the steps since the last log line, summed on the device.

    Each step adds ``{name: (numerator, denominator)}`` pairs without reading them (no host
    sync per step); :meth:`values` reduces the sums across processes with one all-reduce at
    each log line and turns them into named scalars, with throughput and MFU.
    """

    def __init__(self, accelerator: Any, objective: Any, *, tf32: bool) -> None:
        self.accelerator = accelerator
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.start = 0, time.perf_counter()
        self.flops_per_token, self.peak = self._mfu_reference(objective, tf32)

    def _mfu_reference(self, objective: Any, tf32: bool) -> tuple[Any, float | None]:
        """The objective's FLOPs-per-token function, after finding the dtype's peak FLOP/s.

        The peak is that of the precision the run computes in (a bf16 run against the
        bf16 peak, which on AMX CPUs is ~6x the fp32 one; an fp32 run under TF32 against
        the TF32 peak): a GPU's datasheet dense peak where the device is known, else a
        sustained measurement (:func:`further_pt.train.hardware.peak_flops`). Logged with
        its source. The function is asked at each log: it can change with the phase.
        """
        per_token = objective.flops_per_token()
        if per_token is None:
            return None, None
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            str(self.accelerator.mixed_precision), torch.float32)
        device = self.accelerator.device
        tf32 = tf32 and device.type == "cuda" and (
            torch.cuda.get_device_capability(device)[0] >= 8)  # as make_accelerator set it
        peak, source = hardware.peak_flops(dtype, device, tf32=tf32)
        logger.info("MFU is logged against %s per process (%s); the model does %s "
                    "per token", hardware.si(peak), source, hardware.si(per_token, "FLOP"))
        return objective.flops_per_token, peak

    def add(self, metrics: dict[str, tuple[Any, Any]], device: torch.device) -> None:
        """Add one micro-batch's ``{name: (numerator, denominator)}`` to the sums."""
        for key, (num, den) in metrics.items():
            pair = torch.stack([_scalar(num, device), _scalar(den, device)])
            self.sums[key] = self.sums[key] + pair if key in self.sums else pair

    def values(self, optimizer: Any, grad_norm: torch.Tensor, state: dict[str, Any]
               ) -> dict[str, float]:
        """Reduce the window across processes (one all-reduce) into named scalars; restart it."""
        elapsed = time.perf_counter() - self.start
        keys = sorted(self.sums)
        totals = self.accelerator.reduce(torch.stack([self.sums[k] for k in keys]),
                                         "sum").tolist()
        sums = dict(zip(keys, totals, strict=True))
        tokens = sums.pop("tokens")[0]
        state["tokens"] += int(tokens)
        values = {f"train/{k}": num / max(den, 1e-12) for k, (num, den) in sums.items()}
        lrs = layerwise.group_lrs(optimizer)
        values.update({"train/lr": next(iter(lrs.values())),
                       "train/tokens_per_s": tokens / elapsed,
                       "train/steps_per_s": self.steps / elapsed,
                       "train/grad_norm": float(grad_norm)})
        values.update({f"lr/{k}": v for k, v in lrs.items()})  # each named group's rate
        if self.flops_per_token is not None:  # model FLOPs utilisation against the dtype's peak
            world = self.accelerator.num_processes
            values["train/mfu"] = tokens / elapsed * self.flops_per_token() / (self.peak * world)
        self.sums.clear()
        self.steps, self.start = 0, time.perf_counter()
        return values
