"""Experiment trackers (``train.trackers``): what MLflow and W&B receive, read back offline.

MLflow logs into a local file store (``MLFLOW_TRACKING_URI=file:...``) and W&B in offline
mode (``WANDB_MODE=offline``): each run is read back with the tracker's own client or file
format and compared with what the run itself wrote (logs/metrics.jsonl, metrics.json).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from helpers import pretrain_overrides, run_script, write_task

from further_pt.config import recipes, validate
from further_pt.finetune import main as finetune_main
from further_pt.pretrain import load as pretrain_load
from further_pt.pretrain import main as pretrain_main


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize(("value", "expected"), [
    ("[tensorboard]", ["tensorboard"]), ("[]", []), ("none", []), ("null", []),
    ("tensorboard", ["tensorboard"]), ("[tensorboard,mlflow]", ["tensorboard", "mlflow"])])
def test_trackers_take_a_list_one_name_or_none(value: str, expected: list[str], tmp_path: Path,
                                               tiny_model_dir: Path, corpus_file: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validate, "installed_trackers", lambda: {"tensorboard", "mlflow"})
    args = pretrain_overrides(tmp_path / "out", corpus_file, tiny_model_dir, tmp_path / "c",
                              **{"train.trackers": value})
    assert list(pretrain_load(args).train.trackers) == expected


def test_the_base_recipes_log_to_tensorboard() -> None:
    for kind in ("pretrain", "finetune"):
        recipe = recipes.compose(f"base/{kind}", [])
        assert list(recipe.train.trackers) == ["tensorboard"], kind


def test_a_tracker_that_is_not_installed_is_refused_before_any_work(
        tmp_path: Path, tiny_model_dir: Path, corpus_file: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(validate, "installed_trackers", lambda: {"tensorboard"})
    out = tmp_path / "out"
    args = pretrain_overrides(out, corpus_file, tiny_model_dir, tmp_path / "cache",
                              **{"train.trackers": "[tensorboard,comet_ml]"})
    assert pretrain_main(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        "further_pt: error: config key 'train.trackers[1]': comet_ml is not installed here; "
        "pip install comet-ml (or drop it from train.trackers)"]
    assert not out.exists()


@pytest.mark.slow
def test_mlflow_gets_the_config_metrics_and_final_metrics_and_a_resumed_run_continues_it(
        tmp_path: Path, tiny_model_dir: Path, corpus_file: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed: pip install "
                                 "mlflow-skinny (the dev extra has it)")
    uri = f"file:{tmp_path / 'mlruns'}"
    # MLflow >= 3.7 keeps the file store for those who ask for it (a database needs SQLAlchemy)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "run-a"
    args = pretrain_overrides(out, corpus_file, tiny_model_dir, tmp_path / "cache",
                              **{"train.trackers": "[mlflow,tensorboard]"})
    # Killed after step 4's update, before its log line: the checkpoint of step 3 is kept.
    killed = run_script(args, env={"MLFLOW_TRACKING_URI": uri, "FURTHER_PT_FAULT": "step:4"})
    assert "could not start" not in killed.stderr, killed.stderr[-2000:]
    assert killed.returncode == -9, killed.stderr[-2000:]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert pretrain_main(args) == 0

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("pretrain")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "the resumed run must log into the run it started"
    run = runs[0]
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    assert json.loads((out / "logs" / "trackers.json").read_text()) == {
        "mlflow": run.info.run_id}
    params = run.data.params
    assert float(params["train/lr"]) == pytest.approx(1e-3)  # the demo recipe's
    assert params["train/max_steps"] == "6" and params["objective/nsp"] == "True"
    assert json.loads(params["data/train_files"]) == [str(corpus_file)]  # lists as JSON
    assert params["model/from_scratch"] == "null"

    logged = _jsonl(out / "logs" / "metrics.jsonl")
    assert [x["step"] for x in logged] == [2, 4, 6]
    for key in ("train/loss", "train/mlm_loss", "train/nsp_loss", "train/lr",
                "train/tokens_per_s", "train/mfu", "lr/model"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [2, 4, 6], key
        assert [m.value for m in history] == pytest.approx([x[key] for x in logged]), key
        assert all(math.isfinite(m.value) for m in history)
    final = {k: v for k, v in run.data.metrics.items() if k.startswith("final/")}
    metrics = json.loads((out / "metrics.json").read_text())
    assert final == {"final/steps": 6, "final/tokens": metrics["tokens"],
                     "final/nonfinite_steps": 0}


def _wandb_records(path: Path) -> list[Any]:
    """The protobuf records of an offline run's ``run-<id>.wandb`` file.

    The file is a LevelDB-style log (W&B's own reader went into its Go core): a 7-byte
    header (``:W&B``, magic, version), then 32 KiB blocks of chunks, each with a 7-byte
    header (CRC, length, type: 1 full, 2 first, 3 middle, 4 last); a record is the
    concatenation of its chunks, a ``wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, chunk, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def test_wandb_offline_run_holds_the_config_metrics_evaluations_and_final_metrics(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb", reason="wandb is not installed: pip install wandb (the dev "
                        "extra has it)")
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"),
                       "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "wb").mkdir()
    train = write_task(tmp_path / "train.jsonl", 32, 0)
    dev = write_task(tmp_path / "dev.jsonl", 12, 1)
    out = tmp_path / "fit-a"
    assert finetune_main([
        "recipe=fit", f"output_dir={out}", f"model.name_or_path={tiny_model_dir}",
        f"data.train_file={train}", f"data.eval_file={dev}", "data.max_seq_length=32",
        "data.head_tokens=8", "train.epochs=2", "train.batch_size=8", "train.log_every_steps=2",
        "model.attn_implementation=eager", "train.trackers=[wandb]"]) == 0
    assert not (out / "logs" / "finetune").exists()  # no TensorBoard: not asked for

    run_id = json.loads((out / "logs" / "trackers.json").read_text())["wandb"]
    (run_dir,) = (tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}")
    records = _wandb_records(run_dir / f"run-{run_id}.wandb")
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name) == ("finetune", "fit-a")
    config_values = {u.key: json.loads(u.value_json) for u in run.config.update}
    for r in records:  # Accelerate stores the config after the run starts: config records
        if r.WhichOneof("record_type") == "config":
            config_values.update({u.key: json.loads(u.value_json) for u in r.config.update})
    assert config_values["train/lr"] == pytest.approx(2e-5)
    assert config_values["train/trackers"] == '["wandb"]' and config_values["eval/metric"] == (
        "accuracy")
    rows: dict[int, dict[str, Any]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                   for i in r.history.item}
            rows.setdefault(row["_step"], {}).update(row)

    logged = _jsonl(out / "logs" / "metrics.jsonl")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 8  # 2 epochs of 32 / 8
    for line in logged:  # every logged scalar, at its step: training windows and evaluations
        for key, value in line.items():
            if key not in ("step", "time"):
                assert rows[line["step"]][key] == pytest.approx(value), (line["step"], key)
    assert {x["step"] for x in logged if "eval_accuracy" in x} == {4, 8}
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/mfu"} <= set(rows[2])
    assert any(key.startswith("lr/") for key in rows[2])  # each layer group's rate
    last = rows[8]
    for key in ("eval_accuracy", "eval_error_rate", "eval_macro_f1"):
        assert last[f"final/{key}"] == pytest.approx(metrics[key])
    assert last["final/steps"] == 8 and last["final/best_epoch"] == metrics["best_epoch"]


def test_a_tracker_that_cannot_start_fails_in_one_line(
        tmp_path: Path, tiny_model_dir: Path, corpus_file: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("mlflow", reason="mlflow is not installed: pip install mlflow-skinny")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://tracker")
    args = pretrain_overrides(tmp_path / "out", corpus_file, tiny_model_dir, tmp_path / "cache",
                              **{"train.trackers": "[mlflow]"})
    assert pretrain_main(args) == 2
    err = capsys.readouterr().err.splitlines()
    (line,) = [x for x in err if x.startswith("further_pt:")]
    assert line == err[-1], err  # the last line: nothing after it (no traceback)
    assert line.startswith("further_pt: error: train.trackers: ['mlflow'] could not start (")
    assert "nosuchscheme" in line
