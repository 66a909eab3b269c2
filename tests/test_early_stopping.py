"""Fine-tuning evaluates every ``eval.every_steps`` and stops after
``train.early_stopping_patience`` evaluations without a new best, keeping the best evaluation's
model; a killed run resumed from a checkpoint taken after the best stops at the same step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import weights, write_task

from further_pt.finetune import main as finetune_main

EVERY, PATIENCE = 3, 3


def _args(out: Path, model_dir: Path, train: Path, dev: Path) -> list[str]:
    args = {"output_dir": out, "model.name_or_path": model_dir, "data.train_file": train,
            "data.eval_file": dev, "data.max_seq_length": 32, "data.head_tokens": 8,
            "train.epochs": 6, "train.batch_size": 16, "train.lr": 1e-2, "train.head_lr": 1e-2,
            "train.layer_decay": 1.0, "train.log_every_steps": 5,
            "model.attn_implementation": "eager", "eval.every_steps": EVERY,
            "train.early_stopping_patience": PATIENCE, "checkpoint.every_steps": EVERY,
            "checkpoint.keep_last": 30}
    return ["recipe=fit", *(f"{k}={v}" for k, v in args.items())]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, tiny_model_dir):
    """The run, in this process (a subprocess would spend seconds importing)."""
    import contextlib
    import io

    base = tmp_path_factory.mktemp("early")
    train, dev = write_task(base / "train.jsonl", 160, 0), write_task(base / "dev.jsonl", 40, 1)
    out = base / "run"
    args = _args(out, tiny_model_dir, train, dev)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert finetune_main(args) == 0
    return out, args, printed.getvalue()


def _first_best(history: list[dict]) -> int:
    """The index of the evaluation kept as best: the first that no later one beat."""
    best = 0
    for i, h in enumerate(history):
        if h["eval_accuracy"] > history[best]["eval_accuracy"]:
            best = i
    return best


def test_stops_after_patience_evaluations_without_a_better_one(stopped) -> None:
    out, _, printed = stopped
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    steps_per_epoch, total = 10, 6 * 10  # 160 examples / batch 16, 6 epochs
    # evaluated every 3 steps, not at epoch ends (10, 20, ...)
    assert [h["step"] for h in history] == [EVERY * (i + 1) for i in range(len(history))]
    assert [h["epoch"] for h in history] == [-(-h["step"] // steps_per_epoch) for h in history]
    best = _first_best(history)
    # the seeded tiny run: flat at 0.5 for 3 evaluations (the count reaches 2, not 3), 1.0 at
    # step 12 (the count restarts), then 15, 18, 21 do not beat it: stop at 21 of 60 steps
    assert [h["eval_accuracy"] for h in history] == [0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert len(history) == best + 1 + PATIENCE
    assert metrics["steps"] == metrics["stopped_early_at"] == 21 < total
    assert metrics["best_step"] == history[best]["step"] == 12
    assert metrics["final_model"] == "best epoch 2 (step 12) by eval_accuracy"
    assert "stopped early at step 21 (train.early_stopping_patience=3)" in printed
    # best/ (and final/, its copy) hold the model evaluated at step 12, not the last one
    kept = weights(out / "best")
    at_best = weights(out / "checkpoints" / "step-000012")
    at_stop = weights(out / "checkpoints" / "step-000021")
    assert all(kept[k].equal(at_best[k]) for k in at_best)
    assert all(kept[k].equal(v) for k, v in weights(out / "final").items())
    assert not all(kept[k].equal(at_stop[k]) for k in at_stop)
    assert json.loads((out / "best" / "eval_results.json").read_text())["eval_accuracy"] == 1.0
    assert not (out / "checkpoints" / "step-000024").exists()


@pytest.mark.parametrize(("resumed_at", "since_best"), [(15, 1), (21, 3)])
def test_a_resumed_run_stops_at_the_same_step(stopped, tmp_path, caplog, capsys,
                                              resumed_at: int, since_best: int) -> None:
    """Killed after the step-15 checkpoint (one evaluation since the best): the count and the
    best score come back from the checkpoint, so the run stops at 21 again, not later. Killed
    after the step-21 checkpoint (patience spent), before final/: it trains no further step."""
    out, args, _ = stopped
    crashed = tmp_path / "crashed"
    shutil.copytree(out, crashed)
    for later in sorted((crashed / "checkpoints").glob("step-*"))[resumed_at // EVERY:]:
        shutil.rmtree(later)
    shutil.rmtree(crashed / "final")
    (crashed / "metrics.json").unlink()
    ckpt = crashed / "checkpoints" / f"step-{resumed_at:06d}"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["evals_since_best"], state["best"], state["best_step"]) == (since_best, 1.0, 12)
    with caplog.at_level("INFO", logger="further_pt"):
        assert finetune_main([a if not a.startswith("output_dir=") else f"output_dir={crashed}"
                              for a in args]) == 0
    assert f"resuming from {ckpt}" in caplog.text
    assert ("early stopping at step 21: 3 evaluations in a row did not beat" in caplog.text) == (
        resumed_at < 21)  # at 21 the checkpoint already says so
    assert "stopped early at step 21 (train.early_stopping_patience=3)" in capsys.readouterr().out
    first = json.loads((out / "metrics.json").read_text())
    again = json.loads((crashed / "metrics.json").read_text())
    for key in ("steps", "stopped_early_at", "best_step", "best_epoch", "history"):
        assert again[key] == first[key], key
    assert all(v.equal(weights(out / "final")[k]) for k, v in weights(crashed / "final").items())
