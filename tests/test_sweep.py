"""Sweeps (``further-pt finetune|pretrain -m key=a,b``): one run per grid point, a summary,
resumable like the experiment runner. Tiny model, toy grids."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import pretrain_overrides, write_task

from further_pt.cli.main import main
from further_pt.study import sweep


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _finetune_args(tmp_path: Path, model_dir: Path, out: Path, *sweeps: str) -> list[str]:
    train = write_task(tmp_path / "train.jsonl", 24, 0)
    dev = write_task(tmp_path / "dev.jsonl", 12, 1)
    return ["finetune", "-m", "--launcher", "inprocess", "recipe=fit", f"output_dir={out}",
            f"model.name_or_path={model_dir}", f"data.train_file={train}",
            f"data.eval_file={dev}", "data.max_seq_length=32", "data.head_tokens=8",
            "train.batch_size=8", "train.head_lr=3e-3", "model.attn_implementation=eager",
            "train.trackers=[]",
            *sweeps]


def test_points_are_the_product_named_after_their_values() -> None:
    fixed, axes = sweep.grid(["train.lr=1e-5,2e-5", "train.epochs=2", "seed=range(1,3)",
                              "data.train_file=a/t.jsonl,b/t.jsonl"])
    assert fixed == ["train.epochs=2"]
    assert axes == {"train.lr": ["1e-05", "2e-05"], "seed": ["1", "2"],
                    "data.train_file": ["a/t.jsonl", "b/t.jsonl"]}
    names = [p.name for p in sweep.points(axes)]
    assert len(names) == 8 and names[0] == "lr=1e-05,seed=1,train_file=a_t.jsonl"
    assert names[-1] == "lr=2e-05,seed=2,train_file=b_t.jsonl"
    _, axes = sweep.grid(["train.lr=1,2", "objective.head_warmup.lr=3,4"])
    assert sweep.points(axes)[0].name == "train.lr=1,objective.head_warmup.lr=3"  # both "lr"


@pytest.mark.parametrize(("args", "expected"), [
    (["train.lr=1e-5"], "-m: no swept key"),
    (["train.lr=1e-5,2e-5", "output_dir=a,b"], "config key 'output_dir': a sweep's runs"),
    (["--launcher", "nosuchlauncher", "train.lr=1,2"], "--launcher: 'nosuchlauncher' is not"),
    (["--dry", "train.lr=1,2"], "unknown option '--dry'"),
])
def test_a_bad_sweep_is_one_line(args: list[str], expected: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sweep"
    assert main(["finetune", "-m", "recipe=fit", f"output_dir={out}", *args]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("further_pt: error: ") and expected in line, line
    assert not out.exists()


def test_a_bad_value_anywhere_in_the_grid_fails_before_any_run(
        tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sweep"
    assert main(_finetune_args(tmp_path, tiny_model_dir, out, "train.lr=1e-3,-1")) == 2
    assert capsys.readouterr().err.splitlines() == [
        "further_pt: error: config key 'train.lr': must be > 0, got -1.0"]
    assert not out.exists()


@pytest.mark.slow
def test_a_finetuning_sweep_runs_each_point_once_and_summarises(
        tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sweep"
    args = _finetune_args(tmp_path, tiny_model_dir, out, "train.lr=1e-3,3e-3",
                          "train.epochs=choice(2)")
    assert main(args) == 0
    printed = capsys.readouterr().out
    names = ["lr=0.001,epochs=2", "lr=0.003,epochs=2"]
    rows = _csv(out / "sweep.csv")
    assert [r["run"] for r in rows] == names
    for row, lr in zip(rows, ("0.001", "0.003"), strict=True):
        metrics = json.loads((out / row["run"] / "metrics.json").read_text())
        assert metrics["config"]["train"]["lr"] == float(lr)
        assert metrics["config"]["output_dir"] == str(out / row["run"])
        assert (row["train.lr"], row["train.epochs"], row["status"]) == (lr, "2", "finished")
        assert float(row["eval_accuracy"]) == metrics["eval_accuracy"]
        assert float(row["eval_macro_f1"]) == metrics["eval_macro_f1"]
        assert int(row["best_epoch"]) == metrics["best_epoch"]
        assert int(row["steps"]) == metrics["steps"] == 2 * 3  # 2 epochs of 24 / 8
    table = (out / "sweep.md").read_text()
    assert "| run | train.lr | train.epochs | status | eval_accuracy |" in table
    assert "Best by eval_accuracy: **lr=" in table
    assert table in printed

    stages = json.loads((out / "stages.json").read_text())
    assert set(stages) == set(names) and all(s["finished"] for s in stages.values())
    # The same command again: nothing reruns. With one more value: only that one runs.
    assert main(args) == 0
    assert json.loads((out / "stages.json").read_text()) == stages
    grown = [*args[:-2], "train.lr=1e-3,3e-3,1e-2", "train.epochs=choice(2)"]
    assert main(grown) == 0
    after = json.loads((out / "stages.json").read_text())
    assert set(after) - set(stages) == {"lr=0.01,epochs=2"}
    assert {k: after[k] for k in stages} == stages
    assert len(_csv(out / "sweep.csv")) == 3
    # Anything but the swept values is refused: finished runs would disagree with it.
    capsys.readouterr()
    assert main([*args, "train.weight_decay=0.1"]) == 2
    err = capsys.readouterr().err
    assert "holds a sweep with another fixed config (train.weight_decay: 0.01 there, 0.1 now)" \
        in err


@pytest.mark.slow
def test_a_killed_pretraining_run_resumes_and_finished_ones_are_kept(
        tmp_path: Path, tiny_model_dir: Path, corpus_file: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sweep"
    args = pretrain_overrides(out, corpus_file, tiny_model_dir, tmp_path / "cache", **{
        "train.max_steps": 4, "checkpoint.every_steps": 2, "train.log_every_steps": 1,
        "train.trackers": "[]"})
    args = ["pretrain", "-m", *args, "objective.masking=token,whole_word"]
    monkeypatch.setenv("FURTHER_PT_FAULT", "step:3")  # the first run dies after step 3
    assert main([*args[:2], "--launcher=python", *args[2:]]) == 3
    assert "stage masking=token failed (exit -9)" in capsys.readouterr().err
    rows = _csv(out / "sweep.csv")
    assert [(r["run"], r["status"]) for r in rows] == [("masking=token", "failed"),
                                                       ("masking=whole_word", "not run")]
    assert (out / "masking=token" / "checkpoints" / "step-000002").is_dir()
    monkeypatch.delenv("FURTHER_PT_FAULT")
    assert main([*args[:2], "--launcher=inprocess", *args[2:]]) == 0  # launcher may change
    rows = _csv(out / "sweep.csv")
    assert [(r["status"], r["steps"]) for r in rows] == [("finished", "4")] * 2
    log = [json.loads(x) for x in (out / "masking=token" / "logs" / "metrics.jsonl")
           .read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2, 3, 4]  # killed after 3, resumed from 2: once each
    assert float(rows[0]["train_loss"]) == pytest.approx(log[-1]["train/loss"])
    masking = [json.loads((out / r["run"] / "metrics.json").read_text())["config"]["objective"]
               ["masking"] for r in rows]
    assert masking == ["token", "whole_word"]
