"""The experiment chain end to end (tiny model, 2 variants, 2 seeds), its report and plots."""

from __future__ import annotations

import csv
import json
import logging

import pytest
from helpers import write_task

from further_pt.cli import main


def _overrides(stage: str, *items: str) -> str:
    """A list of overrides as one Hydra value: each item quoted (they contain '=')."""
    return f"{stage}.overrides=[{','.join(repr(i) for i in items)}]"


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, tiny_model_dir, corpus_file):
    base = tmp_path_factory.mktemp("experiment")
    train, dev = write_task(base / "train.jsonl", 64, 0), write_task(base / "dev.jsonl", 20, 1)
    out = base / "exp"
    argv = ["experiment", "recipe=paper_grid", f"output_dir={out}", "seeds=[1,2]",
            "variants=[fit,itpt]", f"base_model={tiny_model_dir}", f"task.train_file={train}",
            f"task.eval_file={dev}", f"corpora.cross_domain=[{corpus_file}]",
            "forgetting.docs=40", "forgetting.max_seq_length=64", "launcher=[python]",
            _overrides("pretrain", "train.max_steps=4", "train.warmup_steps=1",
                       "train.batch_size=4", "data.max_seq_length=64", "checkpoint.every_steps=4",
                       "model.attn_implementation=eager"),
            _overrides("finetune", "data.max_seq_length=32", "data.head_tokens=8",
                       "train.epochs=2", "train.batch_size=16", "train.lr=3e-3",
                       "train.head_lr=3e-3", "model.attn_implementation=eager")]
    assert main(argv) == 0
    return out, argv


def test_report_has_one_row_per_variant(experiment) -> None:
    out, _ = experiment
    with open(out / "report.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["variant"] for r in table] == ["BERT-FiT", "BERT-ITPT-FiT"]
    assert all(r["seeds"] == "2" for r in table)
    fit, itpt = table
    assert float(fit["relative_error_reduction"]) == 0.0
    errs = [json.loads((out / f"finetune-itpt-seed{s}" / "metrics.json").read_text())[
        "eval_error_rate"] for s in (1, 2)]
    assert float(itpt["error_rate_mean"]) == pytest.approx(sum(errs) / 2)
    assert itpt["pretrain_steps"] == "4" and float(itpt["pretrain_seconds"]) > 0
    assert float(fit["forgetting_mlm_loss"]) > 0 and float(itpt["forgetting_mlm_loss"]) > 0
    report = (out / "report.md").read_text()
    assert "| BERT-ITPT-FiT |" in report and "error_rates.png" in report
    assert (out / "error_rates.png").stat().st_size > 1000
    assert (out / "pretraining_mlm_loss.png").is_file()
    held = (out / "data" / "general-heldout.txt").read_text().splitlines()
    assert len(held) == 40


def test_rerun_does_no_work(experiment, caplog) -> None:
    out, argv = experiment
    before = (out / "stages.json").read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    with caplog.at_level(logging.INFO, logger="further_pt.experiment"):
        assert main(argv) == 0
    assert (out / "stages.json").read_text() == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")} == mtimes
    skipped = [r.message for r in caplog.records if "skipped" in r.message]
    assert len(skipped) == 5  # pretrain-itpt + 2 variants x 2 seeds


def test_experiment_validation_names_the_key(tmp_path, capsys) -> None:
    assert main(["experiment", "recipe=paper_grid", "task.train_file=nope.jsonl",
                 "task.eval_file=nope.jsonl"]) == 2
    assert "config key 'task.train_file': file nope.jsonl does not exist" in (
        capsys.readouterr().err)


def test_plot_schedule_shows_the_slanted_triangle(tmp_path, capsys) -> None:
    from omegaconf import OmegaConf

    from further_pt import config
    from further_pt.report import schedule_curves

    cfg = config.compose("ulmfit", [])
    curves = schedule_curves(cfg, layers=4, steps=1000)
    head = curves["head"]
    assert head[0] == pytest.approx(5e-5 / 32) and max(head) == pytest.approx(5e-5)
    assert head.index(max(head)) == 100  # cut = 0.1 * T
    assert curves["layer_3"][0] == 0.0 and curves["layer_3"][60] > 0  # unfrozen at step 50
    assert curves["layer_2"][60] == 0.0  # still frozen: one group per 50 steps
    assert curves["layer_2"][110] == pytest.approx(curves["layer_3"][110] * 0.3846)
    assert curves["embeddings"][-1] > 0  # all groups unfrozen by the end
    out = tmp_path / "ulmfit.png"
    assert main(["plot-schedule", "recipe=ulmfit", "steps=400", "layers=4",
                 f"output={out}"]) == 0
    assert out.stat().st_size > 1000
    assert OmegaConf.select(cfg, "train.schedule") == "stlr"


def test_plot_run(experiment, tmp_path) -> None:
    out, _ = experiment
    for run in ("pretrain-itpt", "finetune-fit-seed1"):
        png = tmp_path / f"{run}.png"
        assert main(["plot-run", str(out / run), f"output={png}"]) == 0
        assert png.stat().st_size > 1000
    assert main(["plot-run", str(tmp_path)]) == 2


def test_a_killed_stage_resumes_and_finished_ones_are_kept(tmp_path, tiny_model_dir,
                                                           corpus_file, monkeypatch,
                                                           capsys) -> None:
    train, dev = write_task(tmp_path / "t.jsonl", 48, 0), write_task(tmp_path / "d.jsonl", 16, 1)
    out = tmp_path / "exp"
    argv = ["experiment", "recipe=paper_grid", f"output_dir={out}", "seeds=[1]",
            "variants=[fit,itpt]", f"base_model={tiny_model_dir}", f"task.train_file={train}",
            f"task.eval_file={dev}", "forgetting.docs=0", "launcher=[python]",
            _overrides("pretrain", "train.max_steps=4", "train.warmup_steps=1",
                       "train.batch_size=4", "data.max_seq_length=64", "checkpoint.every_steps=2",
                       "train.log_every_steps=1", "model.attn_implementation=eager"),
            _overrides("finetune", "data.max_seq_length=32", "data.head_tokens=8",
                       "train.epochs=1", "train.batch_size=16", "model.attn_implementation=eager")]
    monkeypatch.setenv("FURTHER_PT_FAULT", "step:3")  # pretrain-itpt dies after step 3
    assert main(argv) == 3
    assert "stage pretrain-itpt failed (exit -9)" in capsys.readouterr().err
    assert (out / "pretrain-itpt" / "checkpoints" / "step-000002").is_dir()
    monkeypatch.delenv("FURTHER_PT_FAULT")
    assert main(argv) == 0
    stages = json.loads((out / "stages.json").read_text())
    assert all(s["finished"] for s in stages.values())
    log = [json.loads(x) for x in (out / "pretrain-itpt" / "logs" / "metrics.jsonl")
           .read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2, 3, 4]  # killed after 3, resumed from 2: once each
    assert (out / "report.csv").is_file()
