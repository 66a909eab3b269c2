"""Task kinds: multi-label classification and regression, from the metrics' formulas to a
tiny BERT fine-tuned on toy tasks, its saved folder, `pipeline()` and `further-pt predict`."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
from helpers import write_multilabel_task, write_regression_task

from further_pt.errors import ConfigError
from further_pt.finetune import main as finetune_main

# --------------------------------------------------------------------------- metrics


def _toy_label_sets(seed: int, rows: int = 200, classes: int = 4):
    rng = random.Random(seed)
    truth = [[float(rng.random() < 0.3 + 0.1 * c) for c in range(classes)] for _ in range(rows)]
    probs = [[min(1.0, max(0.0, t * 0.6 + rng.random() * 0.5)) for t in row] for row in truth]
    return probs, truth


def test_multi_label_metrics_are_scikit_learns() -> None:
    from sklearn.metrics import accuracy_score, f1_score, hamming_loss

    from further_pt.objectives.scoring import multi_label

    probs, truth = _toy_label_sets(0)
    names = ["a", "b", "c", "d"]
    got = multi_label(probs, truth, names, prefix="eval_", threshold=0.5, metric="micro_f1")
    pred = [[int(p >= 0.5) for p in row] for row in probs]
    ref = [[int(t) for t in row] for row in truth]
    assert got["eval_micro_f1"] == pytest.approx(f1_score(ref, pred, average="micro"))
    assert got["eval_macro_f1"] == pytest.approx(f1_score(ref, pred, average="macro"))
    assert got["eval_subset_accuracy"] == pytest.approx(accuracy_score(ref, pred))
    assert got["eval_hamming_loss"] == pytest.approx(hamming_loss(ref, pred))
    assert list(got["eval_per_label_f1"].values()) == pytest.approx(
        list(f1_score(ref, pred, average=None)))
    assert got["eval_threshold"] == 0.5 and got["eval_examples"] == 200
    # a class never true and never predicted counts F1 = 0 in the macro mean (zero_division=0)
    none = multi_label([[0.9, 0.1]], [[1.0, 0.0]], ["x", "y"], prefix="", threshold=0.5,
                       metric="micro_f1")
    assert none["macro_f1"] == 0.5 and none["micro_f1"] == 1.0


def test_a_tuned_threshold_is_the_best_of_the_grid_for_the_metric() -> None:
    from further_pt.objectives.scoring import THRESHOLDS, multi_label

    probs, truth = _toy_label_sets(1)
    names = ["a", "b", "c", "d"]
    for metric in ("micro_f1", "macro_f1", "subset_accuracy"):
        tuned = multi_label(probs, truth, names, prefix="", threshold="tune", metric=metric)
        each = {t: multi_label(probs, truth, names, prefix="", threshold=t, metric=metric)[metric]
                for t in THRESHOLDS}
        assert tuned[metric] == max(each.values())
        assert tuned["threshold"] in [t for t, v in each.items() if v == max(each.values())]
    assert THRESHOLDS[0] == 0.05 and THRESHOLDS[-1] == 0.95 and len(THRESHOLDS) == 19
    # ties go to the threshold nearest 0.5: every threshold separates these perfectly
    assert multi_label([[0.99, 0.01]], [[1.0, 0.0]], ["x", "y"], prefix="", threshold="tune",
                       metric="micro_f1")["threshold"] == 0.5


def test_regression_metrics_are_scipys() -> None:
    from scipy import stats

    from further_pt.objectives.scoring import regression

    rng = random.Random(2)
    ref = [rng.uniform(0, 5) for _ in range(50)]
    pred = [r + rng.gauss(0, 1) for r in ref]
    got = regression(pred, ref, prefix="eval_")
    assert got["eval_pearson"] == pytest.approx(stats.pearsonr(pred, ref)[0])
    assert got["eval_spearman"] == pytest.approx(stats.spearmanr(pred, ref)[0])
    errors = [p - r for p, r in zip(pred, ref, strict=True)]
    assert got["eval_mse"] == pytest.approx(sum(e ** 2 for e in errors) / 50)
    assert got["eval_mae"] == pytest.approx(sum(abs(e) for e in errors) / 50)
    flat = regression([2.0] * 4, [1.0, 2.0, 3.0, 4.0], prefix="")  # no correlation: 0, not NaN
    assert flat["pearson"] == 0.0 and flat["spearman"] == 0.0 and flat["mse"] == 1.5


# --------------------------------------------------------------------------- labels and samples


def test_label_sets_are_named_encoded_and_checked() -> None:
    from further_pt.data.targets import encode_label_sets, label_set_names, value_problem

    assert label_set_names([[10, 2], [], [1]], "t.jsonl") == ["1", "2", "10"]  # numeric order
    assert label_set_names([["b", "a"], ["c"]], "t.jsonl") == ["a", "b", "c"]
    assert encode_label_sets([["b"], [], ["a", "c", "a"]], ["a", "b", "c"], "t.jsonl") == [
        [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0]]
    with pytest.raises(ConfigError, match=r"dev.jsonl: row 2 has label 'z' in its list, which "
                                          r"the training data does not have \(labels: a, b\)"):
        encode_label_sets([["a"], ["b", "z"]], ["a", "b"], "dev.jsonl")
    with pytest.raises(ConfigError, match=r"t.jsonl: no row has a label"):
        label_set_names([[], []], "t.jsonl")
    assert value_problem(["a", 3], "label_set") is None and value_problem([], "label_set") is None
    assert value_problem("a", "label_set") == "holds a str, not a list of labels"
    assert value_problem(["a", 1.5], "label_set") == ("holds a list with a float in it, not "
                                                      "labels (strings or integers)")
    assert value_problem(["a", " "], "label_set") == "holds a list with an empty label in it"
    for good in (3, -1.25, "2.5"):
        assert value_problem(good, "target") is None
    assert value_problem(float("nan"), "target") == "is not a finite number"
    assert value_problem(float("inf"), "target") == "is not a finite number"
    assert value_problem("high", "target") == "holds a str, not a number"
    assert value_problem(True, "target") == "holds a bool, not a number"


def test_label_set_subsample_keeps_the_rare_labels_in_proportion() -> None:
    """Stratified by each row's rarest label: a label on 2% of the rows is in a 50-row sample,
    which a uniform draw misses about a third of the time; the seed alone decides the rows."""
    from further_pt.data.targets import label_set_strata
    from further_pt.objectives.kinds import sample

    rng = random.Random(0)
    rows = []
    for i in range(1000):  # common: 60% of rows; medium: 20%; rare: 2% (always with common)
        rare = i % 50 == 0
        rows.append([float(rare or rng.random() < 0.6), float(rng.random() < 0.2), float(rare)])
    strata = label_set_strata(rows)
    assert all(s == 2 for s, r in zip(strata, rows, strict=True) if r[2])  # the rare label decides
    assert strata[next(i for i, r in enumerate(rows) if r == [0.0, 0.0, 0.0])] == 3  # none
    for seed in range(5):
        kept = sample(rows, 50, seed, kind="multi_label", num_names=3, where="t")
        assert len(kept) == 50 == len(set(kept))
        assert sum(rows[i][2] for i in kept) == 1  # 20 rare rows in 1000 -> 1 of 50
        assert kept == sample(rows, 50, seed, kind="multi_label", num_names=3, where="t")
    assert sample(rows, 50, 0, kind="multi_label", num_names=3, where="t") != sample(
        rows, 50, 1, kind="multi_label", num_names=3, where="t")
    with pytest.raises(ConfigError, match=r"'data.max_train_examples': 3 is below the 4 label "
                                          r"strata \(rows' rarest labels\) of t: every stratum"):
        sample(rows, 3, 0, kind="multi_label", num_names=3, where="t")


def test_target_subsample_spans_the_range() -> None:
    from further_pt.objectives.kinds import sample

    targets = [i / 10 for i in range(1000)]  # 0.0 .. 99.9, sorted
    kept = sample(targets, 20, 0, kind="regression", num_names=1, where="t")
    assert len(kept) == 20
    decile = [sum(1 for i in kept if 100 * b <= i < 100 * (b + 1)) for b in range(10)]
    assert decile == [2] * 10  # ten quantile bins, two rows each


# --------------------------------------------------------------------------- fine-tuning


def _finetune(out: Path, model: Path, train: Path, dev: Path | None, **extra: object) -> dict:
    args = {"output_dir": out, "model.name_or_path": model, "data.train_file": train,
            "data.eval_file": dev or "null", "data.max_seq_length": 32, "data.head_tokens": 8,
            "train.epochs": 4, "train.batch_size": 16, "train.lr": 1e-2, "train.head_lr": 1e-2,
            "train.layer_decay": 1.0, "train.log_every_steps": 5,
            "model.attn_implementation": "eager", "train.trackers": "[]", **extra}
    assert finetune_main(["recipe=fit", *(f"{k}={v}" for k, v in args.items())]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory, tiny_model_dir):
    """The toy multi-label task (fruit / motor / color topics, any subset per row), mean
    pooling, the threshold tuned on dev; fp32, so predict's metrics must equal training's
    (see ``regression``)."""
    base = tmp_path_factory.mktemp("multilabel")
    train = write_multilabel_task(base / "train.jsonl", 160, 0)
    dev = write_multilabel_task(base / "dev.jsonl", 40, 1)
    out = base / "run"
    metrics = _finetune(out, tiny_model_dir, train, dev, **{
        "task.kind": "multi_label", "task.threshold": "tune", "head.pooling": "mean",
        "train.mixed_precision": "no"})
    return out, dev, metrics


@pytest.fixture(scope="module")
def regression(tmp_path_factory, tiny_model_dir):
    """The toy regression task (target 5k/8 for k fruit words of 8), mean pooling, in fp32:
    the training evaluation runs under the run's autocast (bf16 under ``auto`` on an
    AMX/AVX512-BF16 CPU) and predict in fp32, so only at fp32 must their metrics agree."""
    base = tmp_path_factory.mktemp("regression")
    train = write_regression_task(base / "train.jsonl", 160, 0)
    dev = write_regression_task(base / "dev.jsonl", 40, 1)
    out = base / "run"
    return out, dev, _finetune(out, tiny_model_dir, train, dev, **{
        "task.kind": "regression", "head.pooling": "mean", "train.mixed_precision": "no"})


def test_multi_label_fine_tuning_learns_the_toy_task(multilabel) -> None:
    from further_pt.objectives.scoring import THRESHOLDS

    out, _, metrics = multilabel
    assert metrics["eval_micro_f1"] > 0.8 and metrics["eval_macro_f1"] > 0.8
    assert metrics["eval_subset_accuracy"] > 0.5
    assert set(metrics["eval_per_label_f1"]) == {"color", "fruit", "motor"}
    assert metrics["eval_threshold"] in THRESHOLDS
    assert "eval_accuracy" not in metrics and "eval_error_rate" not in metrics
    assert metrics["final_model"].endswith("by eval_micro_f1")  # eval.metric=auto
    assert metrics["config"]["eval"]["metric"] == "micro_f1"
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert config["id2label"] == {"0": "color", "1": "fruit", "2": "motor"}
    prep = json.loads((out / "final" / "preprocessing.json").read_text())
    assert prep["task_kind"] == "multi_label"
    assert prep["threshold"] == metrics["eval_threshold"]  # the best evaluation's, tuned
    log = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/label_accuracy" in x for x in log)


def test_multi_label_predict_writes_the_label_set_and_every_probability(multilabel,
                                                                        tmp_path) -> None:
    from further_pt.objectives.prediction import predict_file

    out, dev, metrics = multilabel
    found = predict_file(out / "final", str(dev), tmp_path / "p.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    threshold = metrics["eval_threshold"]
    assert len(rows) == 40
    for row in rows:
        assert set(row["probabilities"]) == {"color", "fruit", "motor"}
        assert row["prediction"] == [k for k, p in row["probabilities"].items()
                                     if p >= threshold]
    assert sum(sorted(r["prediction"]) == sorted(r["label"]) for r in rows) / 40 == (
        pytest.approx(found["eval_subset_accuracy"]))
    for key in ("eval_micro_f1", "eval_macro_f1", "eval_subset_accuracy", "eval_threshold"):
        assert found[key] == pytest.approx(metrics[key])  # the dev set, at the saved threshold


def test_regression_fine_tuning_learns_the_toy_task(regression) -> None:
    from further_pt.objectives.prediction import predict_file

    out, dev, metrics = regression
    assert metrics["eval_pearson"] > 0.9 and metrics["eval_spearman"] > 0.9
    assert 0 < metrics["eval_mse"] < 0.5  # the target's variance is about 3.3
    assert metrics["final_model"].endswith("by eval_pearson")
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["problem_type"] == "regression"
    assert config["id2label"] == {"0": "label"}
    found = predict_file(out / "final", str(dev), out / "predictions.jsonl")
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(isinstance(r["prediction"], float) and "probabilities" not in r for r in rows)
    assert found["eval_mse"] == pytest.approx(
        sum((r["prediction"] - r["label"]) ** 2 for r in rows) / 40, rel=1e-4)
    assert found["eval_pearson"] == pytest.approx(metrics["eval_pearson"])


@pytest.mark.parametrize("kind", ["multi_label", "regression"])
def test_pipeline_reads_a_standard_folder_as_predict_does(kind, tmp_path, tiny_model_dir,
                                                          caplog) -> None:
    """The standard head saved with its problem_type: `pipeline(top_k=None)` scores each class
    with a sigmoid (they do not sum to 1), or returns the value as is (without it, num_labels=1
    would mean a sigmoid): what predict writes. The subsample of max_train_examples is logged
    per label, or by the targets' range."""
    from transformers import pipeline

    from further_pt.objectives.prediction import predict_file

    write = write_multilabel_task if kind == "multi_label" else write_regression_task
    train = write(tmp_path / "train.jsonl", 60, 2)
    with caplog.at_level(logging.INFO, logger="further_pt.objectives.classification"):
        metrics = _finetune(tmp_path / "run", tiny_model_dir, train, None, **{
            "task.kind": kind, "train.epochs": 1, "data.max_train_examples": 12})
    assert metrics["data"]["train_examples"] == 12
    logged = "rows per label: color " if kind == "multi_label" else "targets 0 to 5, mean "
    assert any(f"kept 12 of 60 training examples; {logged}" in r.message
               for r in caplog.records)
    predict_file(tmp_path / "run" / "final", str(train), tmp_path / "p.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    classify = pipeline("text-classification", model=str(tmp_path / "run" / "final"),
                        top_k=None)
    for row in rows[:3]:
        scores = {r["label"]: r["score"] for r in classify([row["text"]])[0]}
        if kind == "regression":
            assert scores == pytest.approx({"label": row["prediction"]}, abs=1e-4)
            assert "probabilities" not in row
        else:
            assert scores == pytest.approx(row["probabilities"], abs=1e-4)
    if kind == "multi_label":
        assert any(abs(sum(r["probabilities"].values()) - 1) > 0.05 for r in rows)


def test_the_closing_line_names_each_kinds_metrics(tmp_path) -> None:
    from omegaconf import OmegaConf

    from further_pt.finetune import report

    cfg = OmegaConf.create({"output_dir": str(tmp_path)})
    multi = {"eval_micro_f1": 0.9, "eval_macro_f1": 0.8, "eval_subset_accuracy": 0.7,
             "final_model": "best epoch 2 by eval_micro_f1"}
    assert report(cfg, {**multi, "eval_threshold": 0.35}).splitlines()[0] == (
        "dev micro-F1 0.9000, macro-F1 0.8000, subset accuracy 0.7000 at threshold 0.35 "
        "(best epoch 2 by eval_micro_f1)")
    assert "subset accuracy 0.7000 (best" in report(cfg, multi)  # multi-task: no one threshold
    assert report(cfg, {"eval_pearson": 0.91, "eval_spearman": 0.9, "eval_mse": 0.25,
                        "final_model": "last step (8)"}).splitlines()[0] == (
        "dev Pearson 0.9100, Spearman 0.9000, MSE 0.2500 (last step (8))")


def test_a_hub_datasets_class_label_lists_keep_their_names_and_order(tmp_path) -> None:
    """go_emotions-style labels: lists of ClassLabel ids read as the dataset's names, ids in
    the dataset's order (not sorted, not the ids' digits)."""
    import datasets

    from further_pt.objectives.kinds import read

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.Sequence(
        datasets.ClassLabel(names=["joy", "anger", "fear"]))})
    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [[1], [0, 2], []]},
                                    features=features)
    names, rows = read(ds, "label", "hf:go_emotions", "multi_label")
    assert names == ["joy", "anger", "fear"]
    assert rows == [[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    dev = datasets.Dataset.from_dict({"text": ["d"], "label": [[2]]}, features=features)
    assert read(dev, "label", "dev", "multi_label", names)[1] == [[0.0, 0.0, 1.0]]
