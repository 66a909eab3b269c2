"""FSDP (version 2, torch's fully_shard) on two CPU processes: the same model as DDP, resumable.

Accelerate enters FSDP only on accelerators, so these runs go through
``tests/fsdp_on_cpu.py``, which gives each Accelerator the FSDP2 plugin that
``accelerate launch --use_fsdp --fsdp_version 2`` gives on GPUs (one shard unit per
BertLayer plus the root). What they check is further_pt's side: the weights and
AdamW state gathered for checkpoints, ``final/`` and evaluation, and the optimizer
state cut back into shards on resume.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, free_port, pretrain_overrides, run_script, weights, write_task

from further_pt.train.checkpoint import verify


def _launcher(port: int, *, fsdp: bool) -> list[str]:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(port)]
    return [*launch, str(REPO / "tests" / "fsdp_on_cpu.py")] if fsdp else launch


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest elementwise difference of two state dicts with the same keys and shapes."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.smoke
@pytest.mark.slow
def test_fsdp_pretraining_equals_ddp_and_resumes_from_its_checkpoint(
        tmp_path: Path, corpus_file: Path, tiny_model_dir: Path) -> None:
    """6 steps, checkpoint at 3: DDP straight through; FSDP killed after step 4, resumed.

    Also the plain two-process DDP run's own checks (identical replicas, one log per step).
    """
    env = {"ACCELERATE_USE_CPU": "true"}
    runs = {}
    for name, fsdp, fault in (("ddp", False, None), ("fsdp", True, "step:4:1")):
        out = tmp_path / name
        args = pretrain_overrides(out, corpus_file, tiny_model_dir, tmp_path / f"cache-{name}",
                                  **{"model.attn_implementation": "sdpa"})
        if fault:
            killed = run_script(args, env={**env, "FURTHER_PT_FAULT": fault},
                                launcher=_launcher(free_port(), fsdp=True))
            assert killed.returncode != 0 and not (out / "final").exists()
            ckpt = out / "checkpoints" / "step-000003"
            assert verify(ckpt) is None
            assert json.loads((ckpt / "trainer_state.json").read_text())["sharded"] is True
            # a whole model, gathered: DDP's own weights at that step
            ddp_ckpt = weights(tmp_path / "ddp" / "checkpoints" / "step-000003")
            assert _close(weights(ckpt), ddp_ckpt) < 1e-4
        proc = run_script(args, env=env, launcher=_launcher(free_port(), fsdp=fsdp))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = proc.stderr
    assert "resuming from" in runs["fsdp"] and "step-000003 (step 3)" in runs["fsdp"]
    assert "weights identical on all 2 processes" in runs["ddp"]  # DDP checks its replicas
    lines = (tmp_path / "ddp" / "logs" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # one log line per logging step, from the main process only
    assert _close(weights(tmp_path / "ddp" / "final"), weights(tmp_path / "fsdp" / "final")
                  ) < 1e-4
    losses = {name: [json.loads(x)["train/mlm_loss"] for x in (
        tmp_path / name / "logs" / "metrics.jsonl").read_text().splitlines()]
        for name in runs}
    # logged every 2 steps; FSDP's window 3-4 restarted at 3 (resumed), so it holds step 4 only
    assert len(losses["fsdp"]) == 3
    assert [losses["ddp"][i] for i in (0, 2)] == pytest.approx(
        [losses["fsdp"][i] for i in (0, 2)], abs=1e-4)


@pytest.mark.slow
def test_fsdp_finetuning_evaluates_and_keeps_the_best_epoch(tmp_path: Path,
                                                            tiny_model_dir: Path) -> None:
    train = write_task(tmp_path / "train.jsonl", 160, 0)
    dev = write_task(tmp_path / "dev.jsonl", 32, 1)
    out = tmp_path / "fit"
    args = ["recipe=fit", f"output_dir={out}", f"model.name_or_path={tiny_model_dir}",
            f"data.train_file={train}", f"data.eval_file={dev}", "data.max_seq_length=32",
            "train.epochs=3", "train.batch_size=8", "train.lr=3e-3", "train.head_lr=3e-3",
            "train.layer_decay=1.0", f"data.cache_dir={tmp_path / 'cache'}"]
    proc = run_script(args, script="finetune.py", env={"ACCELERATE_USE_CPU": "true"},
                      launcher=_launcher(free_port(), fsdp=True))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert metrics["eval_accuracy"] > 0.9
    from transformers import AutoModelForSequenceClassification
    assert AutoModelForSequenceClassification.from_pretrained(out / "final").num_labels == 2
