"""Fine-tuning end to end on CPU: a tiny BERT learns a separable task and writes metrics.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import free_port, run_script, run_scripts, write_task


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("task")
    return write_task(base / "train.jsonl", 160, 0), write_task(base / "dev.jsonl", 40, 1)


def _args(recipe: str, out: Path, model_dir: Path, train: Path, dev: Path | None, **extra):
    args = {"output_dir": out, "model.name_or_path": model_dir, "data.train_file": train,
            "data.eval_file": dev if dev else "null", "data.max_seq_length": 32,
            "data.head_tokens": 8, "train.epochs": 3, "train.batch_size": 16,
            "train.lr": 3e-3, "train.head_lr": 3e-3, "train.layer_decay": 1.0,
            "train.log_every_steps": 5, "model.attn_implementation": "eager"}
    args.update(extra)
    return [f"recipe={recipe}", *(f"{k}={v}" for k, v in args.items())]


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory, tiny_model_dir, task):
    out = tmp_path_factory.mktemp("fit") / "run"
    args = _args("fit", out, tiny_model_dir, *task)
    proc = run_script(args, script="finetune.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, args, proc


@pytest.mark.smoke
def test_fit_learns_and_writes_metrics(fit_run) -> None:
    out, _, proc = fit_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_accuracy"] > 0.9
    assert metrics["eval_error_rate"] == pytest.approx(1 - metrics["eval_accuracy"])
    assert set(metrics["eval_per_class_f1"]) == {"fruit", "motor"}
    assert sum(map(sum, metrics["eval_confusion_matrix"])) == 40
    assert metrics["config"]["train"]["lr"] == 3e-3
    assert metrics["steps"] == 3 * math.ceil(160 / 16)
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert "dev accuracy" in proc.stdout


@pytest.mark.smoke
def test_final_model_is_a_standard_hf_classifier(fit_run) -> None:
    from transformers import pipeline

    out, _, _ = fit_run
    classify = pipeline("text-classification", model=str(out / "final"))
    assert classify("engine brake gear wheel motor")[0]["label"] == "motor"
    assert classify("apple melon plum peach grape")[0]["label"] == "fruit"


@pytest.mark.slow
def test_rerun_does_nothing_and_unknown_eval_label_is_named(fit_run, tmp_path, task,
                                                            tiny_model_dir) -> None:
    _, args, _ = fit_run
    again = run_script(args, script="finetune.py")
    assert again.returncode == 0 and "already holds a finished run" in again.stderr
    bad_dev = write_task(tmp_path / "dev.jsonl", 6, 2, labels=("fruit", "motor", "sweet"))
    proc = run_script(_args("fit", tmp_path / "bad", tiny_model_dir, task[0], bad_dev),
                      script="finetune.py")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"further_pt: error: {bad_dev}: row 3 has label 'sweet', which the training data does "
        "not have (labels: fruit, motor)")


def test_ulmfit_hierarchical_with_accumulation(tmp_path, tiny_model_dir, task) -> None:
    """STLR + discriminative rates + gradual unfreezing + concat pooling over 2 segments."""
    from further_pt.objectives.heads import load_classifier

    out = tmp_path / "ulmfit"
    args = _args("ulmfit", out, tiny_model_dir, *task, **{
        "train.gradient_accumulation_steps": 3, "train.unfreeze_every_steps": 2,
        "data.truncation": "segments", "data.max_seq_length": 16, "data.max_segments": 2,
        "head.segment_pooling": "attention", "train.epochs": 2, "train.layer_decay": 0.3846})
    proc = run_script(args, script="finetune.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 * math.ceil(math.ceil(160 / 16) / 3)  # T after accumulation
    clf = load_classifier(out / "final")
    assert clf.custom and clf.hierarchical and clf.spec.pooling == "concat"
    lr_lines = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()
                if '"lr/head"' in x]
    first = lr_lines[0]
    assert first["lr/layer_0"] == pytest.approx(first["lr/layer_1"] * 0.3846)  # xi = 1/2.6


@pytest.mark.slow
def test_multitask_evaluates_each_task(tmp_path, tiny_model_dir, task) -> None:
    train_b = write_task(tmp_path / "b_train.jsonl", 90, 3, labels=("motor", "fruit", "sweet"))
    dev_b = write_task(tmp_path / "b_dev.jsonl", 30, 4, labels=("motor", "fruit", "sweet"))
    tasks = (f"[{{name:a,train_file:{task[0]},eval_file:{task[1]},text_column:text,"
             f"label_column:label}},{{name:b,train_file:{train_b},eval_file:{dev_b},"
             "text_column:text,label_column:label}]")
    out = tmp_path / "mt"
    args = [a for a in _args("multitask", out, tiny_model_dir, task[0], task[1])
            if not a.startswith(("data.train_file", "data.eval_file"))]
    # fp32: predict (fp32) must then score the saved folder exactly as training's evaluation
    proc = run_script([*args, f"tasks={tasks}", "train.mixed_precision=no"], script="finetune.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["eval_b_per_class_f1"]) == {"fruit", "motor", "sweet"}
    assert metrics["eval_accuracy"] == pytest.approx(
        (metrics["eval_a_accuracy"] + metrics["eval_b_accuracy"]) / 2)
    assert metrics["steps"] == 3 * (math.ceil(160 / 16) + math.ceil(90 / 16))
    from further_pt.objectives.prediction import predict_file  # every task, from the saved folder

    scores = predict_file(out / "final", str(task[1]), tmp_path / "preds.csv")
    assert scores["eval_a_accuracy"] == pytest.approx(metrics["eval_a_accuracy"])
    assert scores["eval_b_examples"] == 40  # b's label column is "label" too: scored as well


@pytest.mark.smoke
def test_predict_writes_one_line_per_row_cut_as_in_training(fit_run, task, tmp_path,
                                                            capsys) -> None:
    from further_pt.cli.main import main

    out, _, _ = fit_run
    preds = tmp_path / "preds.jsonl"
    assert main(["predict", f"model={out / 'final'}", f"input={task[1]}", f"output={preds}"]) == 0
    rows = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(rows) == 40
    assert sum(r["prediction"] == r["label"] for r in rows) / 40 > 0.9
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert printed["eval_accuracy"] == pytest.approx(
        sum(r["prediction"] == r["label"] for r in rows) / 40)
    assert main(["predict", f"model={out / 'final'}", f"input={task[1]}"]) == 2
    assert "missing output=..." in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_count_steps_after_sharding_and_follow_stlr(tmp_path, tiny_model_dir,
                                                                  task) -> None:
    """T = epochs x optimizer steps per epoch of one process's shard, after accumulation."""
    import sys

    from further_pt.objectives.schedules import stlr_factor

    port = free_port()
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(port)]
    out = tmp_path / "ddp"
    args = _args("ulmfit", out, tiny_model_dir, *task, **{
        "train.epochs": 2, "train.batch_size": 8, "train.gradient_accumulation_steps": 2,
        "train.log_every_steps": 1, "train.unfreeze": "none", "head.pooling": "cls",
        "train.layer_decay": 1.0})
    proc = run_script(args, script="finetune.py", launcher=launcher,
                      env={"ACCELERATE_USE_CPU": "true"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Evaluation is sharded over both processes and gathered: the whole dev set, once.
    assert "(evaluated on 2 processes)" in proc.stderr
    per_rank = 160 // 2
    total = 2 * math.ceil(math.ceil(per_rank / 8) / 2)  # 2 epochs x 5 steps
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == total == 10
    lrs = {x["step"]: x["lr/head"] for x in map(json.loads, (out / "logs" / "metrics.jsonl")
                                                .read_text().splitlines()) if "lr/head" in x}
    for step, lr in lrs.items():  # logged after `step` updates: the lr of the next step
        assert lr == pytest.approx(3e-3 * stlr_factor(step, total, 0.1, 32))
    assert metrics["eval_examples"] == 40  # every dev example, none twice
    # The gathered metrics are those of the whole dev set: predict on one process agrees.
    from further_pt.objectives.prediction import predict_file

    single = predict_file(out / "final", str(task[1]), tmp_path / "pred.jsonl")
    assert single["eval_accuracy"] == metrics["eval_accuracy"]


def test_subsample_and_skipped_rows_are_logged_and_counted(tmp_path, tiny_model_dir) -> None:
    """A stratified subsample of the (cleaned) training file; invalid rows skipped, counted."""
    train = write_task(tmp_path / "train.jsonl", 60, 0, labels=("fruit", "motor", "sweet"))
    with open(train, "a") as fh:  # two bad rows: a null label, a whitespace-only text
        fh.write('{"text": "apple plum", "label": null}\n{"text": "  ", "label": "fruit"}\n')
    out = tmp_path / "run"
    args = _args("fit", out, tiny_model_dir, train, None, **{
        "data.invalid_rows": "skip", "data.max_train_examples": 9, "data.head_tokens": "auto",
        "train.epochs": 1, "train.batch_size": 4})
    strict = [a if a != "data.invalid_rows=skip" else "data.invalid_rows=error" for a in args]
    proc, refused = run_scripts((args, None), ([*strict, f"output_dir={tmp_path / 'strict'}",
                                                f"data.cache_dir={tmp_path / 'cache'}"], None),
                                script="finetune.py")  # side by side
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kept 9 of 60 training examples: fruit 3, motor 3, sweet 3" in proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == {"invalid_train_rows_skipped": 2, "train_examples_available": 60,
                               "train_examples": 9}
    assert metrics["steps"] == math.ceil(9 / 4)
    prep = json.loads((out / "final" / "preprocessing.json").read_text())
    assert prep["head_tokens"] == 8  # auto: a quarter of the 30-token budget, rounded
    assert refused.returncode == 2
    assert "train.jsonl:61: column 'label'" in refused.stderr


def test_the_final_folder_carries_a_model_card(fit_run, tiny_model_dir) -> None:
    """final/README.md: base model, pipeline tag, the task and its dev metrics, as metrics.json."""
    from huggingface_hub import ModelCard

    out, _, _ = fit_run
    metrics = json.loads((out / "metrics.json").read_text())
    for folder in (out / "final", out / "best"):
        card = ModelCard.load(folder / "README.md")
        assert card.data.base_model == str(tiny_model_dir)
        assert card.data.pipeline_tag == "text-classification"
        found = {r.metric_type: r.metric_value for r in card.data.eval_results}
        assert found == {k: metrics[f"eval_{k}"] for k in ("accuracy", "macro_f1", "error_rate")}
        assert "160 training examples, 2 labels (fruit, motor)" in card.text
