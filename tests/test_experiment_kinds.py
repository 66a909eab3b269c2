"""The experiment runner and its report on a multi-label and a regression task (toy grids:
BERT-FiT and the linear reference, or BERT-Feat without scikit-learn; 2 seeds):
the stages fine-tune the task kind, the report's columns and comparisons follow it."""

from __future__ import annotations

import csv
import importlib.util
import json
import statistics

import pytest
from helpers import write_multilabel_task, write_regression_task

from further_pt.cli.main import main

# The second row is the linear reference (seconds, in-process) where scikit-learn is installed,
# else BERT-Feat (a fine-tuning stage more).
VARIANTS = ["fit", "linear"] if importlib.util.find_spec("sklearn") else ["fit", "feat"]
FINETUNE = ("finetune.overrides=['data.max_seq_length=32','data.head_tokens=8',"
            "'train.epochs=1','train.batch_size=16','train.lr=1e-2','train.head_lr=1e-2',"
            "'head.pooling=mean','head.layers=[-2,-1]','train.trackers=[]','model.attn_implementation=eager']")


def _grid(base, model, kind: str, sizes: str, variants: list[str]) -> tuple:
    write = write_multilabel_task if kind == "multi_label" else write_regression_task
    train, dev = write(base / "train.jsonl", 64, 0), write(base / "dev.jsonl", 24, 1)
    out = base / "exp"
    assert main(["experiment", "recipe=paper_grid", f"output_dir={out}", "seeds=[1,2]",
                 f"variants=[{','.join(variants)}]", f"train_sizes={sizes}",
                 f"base_model={model}", f"task.train_file={train}", f"task.eval_file={dev}",
                 f"task.kind={kind}", "forgetting.docs=0", "launcher=[inprocess]",
                 FINETUNE]) == 0
    with open(out / "report.csv") as fh:
        table = list(csv.DictReader(fh))
    with open(out / "paired.csv") as fh:
        paired = list(csv.DictReader(fh))
    return out, table, paired


def _metrics(out, variant: str, tag: str) -> list[dict]:
    return [json.loads((out / f"finetune-{variant}-{tag}-seed{s}" / "metrics.json").read_text())
            for s in (1, 2)]


@pytest.fixture(scope="module")
def multilabel_grid(tmp_path_factory, tiny_model_dir):
    return _grid(tmp_path_factory.mktemp("ml-grid"), tiny_model_dir, "multi_label", "[12,null]",
                 VARIANTS)


@pytest.fixture(scope="module")
def regression_grid(tmp_path_factory, tiny_model_dir):
    return _grid(tmp_path_factory.mktemp("rg-grid"), tiny_model_dir, "regression", "[null]",
                 VARIANTS)


@pytest.mark.slow  # 8 stages (10 s); the regression grid keeps the runner's kind path fast
def test_a_multi_label_grid_reports_macro_and_micro_f1(multilabel_grid) -> None:
    out, table, paired = multilabel_grid
    assert [(r["key"], r["train_size"], r["train_examples"]) for r in table] == [
        (v, size, n) for size, n in (("12", "12"), ("all", "64")) for v in VARIANTS]
    assert set(table[0]) >= {"macro_f1_mean", "macro_f1_sd", "micro_f1_mean",
                             "subset_accuracy_mean", "relative_error_reduction"}
    assert "error_rate_mean" not in table[0] and "accuracy_mean" not in table[0]
    for r in table:
        tag = "n12" if r["train_size"] == "12" else "all"
        runs = _metrics(out, r["key"], tag)
        macro = [m["eval_macro_f1"] for m in runs]
        assert float(r["macro_f1_mean"]) == pytest.approx(statistics.mean(macro))
        assert float(r["macro_f1_sd"]) == pytest.approx(statistics.stdev(macro))
        assert float(r["micro_f1_mean"]) == pytest.approx(
            statistics.mean(m["eval_micro_f1"] for m in runs))
        fit = next(x for x in table if x["key"] == "fit" and x["train_size"] == r["train_size"])
        error_fit, error = 1 - float(fit["macro_f1_mean"]), 1 - float(r["macro_f1_mean"])
        assert float(r["relative_error_reduction"]) == pytest.approx(
            (error_fit - error) / error_fit)  # error = 1 - macro-F1
    stage = json.loads((out / "finetune-fit-n12-seed1" / "metrics.json").read_text())
    assert stage["config"]["task"]["kind"] == "multi_label" and stage["data"][
        "train_examples"] == 12
    assert set(stage) >= {"eval_micro_f1", "eval_subset_accuracy", "eval_threshold"}
    report = (out / "report.md").read_text()
    assert ("| model | training examples | macro-F1 (%) | micro-F1 (%) | subset accuracy (%) | "
            "delta vs FiT |") in report
    assert "error = 1 - macro-F1" in report and "error rate" not in report
    assert "Welch's t-test over the per-seed macro-F1 scores" in report
    assert (out / "macro_f1.png").stat().st_size > 1000 and (out / "data_size.png").is_file()
    other = VARIANTS[1]
    row = next(p for p in paired if p["key"] == other and p["train_size"] == "all")
    diffs = [f["eval_macro_f1"] - b["eval_macro_f1"]
             for f, b in zip(_metrics(out, other, "all"), _metrics(out, "fit", "all"), strict=True)]
    assert row["metric"] == "macro_f1"
    assert [float(d) for d in row["diffs"].split(";")] == pytest.approx(diffs, abs=1e-6)
    assert int(row["wins"]) == sum(d > 0 for d in diffs)  # higher macro-F1 wins


def test_a_regression_grid_reports_pearson_and_mse(regression_grid) -> None:
    out, table, paired = regression_grid
    assert [r["key"] for r in table] == VARIANTS
    assert set(table[0]) >= {"pearson_mean", "pearson_sd", "spearman_mean", "mse_mean"}
    for r in table:
        runs = _metrics(out, r["key"], "all")
        assert float(r["pearson_mean"]) == pytest.approx(
            statistics.mean(m["eval_pearson"] for m in runs))
        assert float(r["mse_mean"]) == pytest.approx(statistics.mean(m["eval_mse"] for m in runs))
    fit = next(r for r in table if r["key"] == "fit")
    assert float(fit["pearson_mean"]) > 0.3  # mean pooling learns the toy target, even in 1 epoch
    report = (out / "report.md").read_text()
    assert ("| model | Pearson r (x100) | Spearman rho (x100) | MSE | delta vs FiT |") in report
    mse = f"{float(fit['mse_mean']):.4f}"
    assert f"| BERT-FiT | {100 * float(fit['pearson_mean']):.2f} +- " in report and mse in report
    assert (out / "pearson.png").is_file()
    assert {p["metric"] for p in paired} == {"pearson"}
    if "linear" in VARIANTS:  # ridge regression on TF-IDF: the same metric keys
        linear = _metrics(out, "linear", "all")[0]
        assert linear["model"] == "tfidf-logreg" and linear["config"]["kind"] == "regression"
        assert set(linear) >= {"eval_pearson", "eval_spearman", "eval_mse"}


def test_an_unknown_task_kind_is_named_before_any_stage(tmp_path, capsys) -> None:
    train = write_regression_task(tmp_path / "t.jsonl", 8, 0)
    assert main(["experiment", "recipe=paper_grid", f"output_dir={tmp_path / 'exp'}",
                 "variants=[fit]", "base_model=x", f"task.train_file={train}",
                 f"task.eval_file={train}", "task.kind=ordinal", "launcher=[python]"]) == 2
    assert ("config key 'task.kind': must be one of single_label, multi_label, regression; got "
            "'ordinal'") in capsys.readouterr().err
    assert not (tmp_path / "exp").exists()
