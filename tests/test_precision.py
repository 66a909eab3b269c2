"""bf16 autocast trains like fp32: the same losses within a stated tolerance, the same accuracy.

``train.mixed_precision: auto`` picks bf16 where the hardware runs it fast; these tests
force bf16 (it runs everywhere on CPU, fast or not) and compare with fp32 on the same
seed, data and steps. Tolerance: bf16 keeps 8 bits of mantissa (~2-3 decimal digits), so
the MLM loss of a tiny model, averaged over a logging window, may differ by a few
hundredths after 24 steps; 0.1 leaves room without hiding a real divergence (an
untrained model sits at ln(vocab) ~ 6.7).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import pretrain_overrides, run_scripts, write_task


def _mlm_losses(out: Path) -> list[float]:
    logs = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [x["train/mlm_loss"] for x in logs]


@pytest.mark.slow
def test_bf16_pretraining_loss_matches_fp32(tmp_path: Path, corpus_file: Path,
                                            tiny_model_dir: Path) -> None:
    losses, precisions = {}, ("no", "bf16")
    procs = run_scripts(*((pretrain_overrides(
        tmp_path / precision, corpus_file, tiny_model_dir, tmp_path / f"cache-{precision}", **{
            "train.mixed_precision": precision, "train.max_steps": 24, "train.warmup_steps": 4,
            "train.log_every_steps": 8, "checkpoint.every_steps": 24}), None)
        for precision in precisions))
    for precision, proc in zip(precisions, procs, strict=True):
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"mixed precision: {precision} (train.mixed_precision={precision}" in proc.stderr
        losses[precision] = _mlm_losses(tmp_path / precision)
    assert all(abs(b - f) < 0.1 for b, f in zip(losses["bf16"], losses["no"], strict=True)), (
        losses)
    assert all(x[-1] < x[0] for x in losses.values())  # both learn


@pytest.mark.slow
def test_bf16_finetuning_accuracy_matches_fp32(tmp_path: Path, tiny_model_dir: Path) -> None:
    train = write_task(tmp_path / "train.jsonl", 160, 0)
    dev = write_task(tmp_path / "dev.jsonl", 40, 1)
    accuracy, precisions = {}, ("no", "bf16")
    procs = run_scripts(*(([
        "recipe=fit", f"output_dir={tmp_path / precision}", f"model.name_or_path={tiny_model_dir}",
        f"data.train_file={train}", f"data.eval_file={dev}", "data.max_seq_length=32",
        "train.epochs=3", "train.batch_size=16", "train.lr=3e-3", "train.head_lr=3e-3",
        "train.layer_decay=1.0", "model.attn_implementation=eager",
        f"train.mixed_precision={precision}", f"data.cache_dir={tmp_path / 'cache' / precision}"],
        None) for precision in precisions), script="finetune.py")
    for precision, proc in zip(precisions, procs, strict=True):
        assert proc.returncode == 0, proc.stderr[-2000:]
        accuracy[precision] = json.loads((tmp_path / precision / "metrics.json").read_text())[
            "eval_accuracy"]
    assert accuracy["no"] > 0.9 and accuracy["bf16"] > 0.9, accuracy
