"""Class ids users recognise (integers in numeric order, a hub dataset's ClassLabel names,
``hf:name:config:split``) and class weights for imbalanced tasks (``train.class_weights``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F

from further_pt.config import recipes, validate
from further_pt.data.corpus import hub_split
from further_pt.data.imbalance import class_weights
from further_pt.data.labelled import encode_labels, label_names
from further_pt.errors import ConfigError, DataError
from further_pt.objectives.classification import Classification, build_classifier, load_tasks


def _cfg(tmp_path: Path, model_dir: Path, *overrides: str):
    return recipes.load(["recipe=fit", f"output_dir={tmp_path / 'out'}",
                         f"model.name_or_path={model_dir}", "data.max_seq_length=32",
                         "data.head_tokens=8", f"data.cache_dir={tmp_path / 'cache'}",
                         *overrides], recipes.FinetuneSchema, kind="finetune",
                        validate=validate.validate_finetune)


def _saved_id2label(cfg, tasks, model_dir: Path, tokenizer, folder: Path) -> dict:
    """The id2label of the config.json a fine-tuned folder would carry."""
    build_classifier(cfg, tasks, model_dir).save(folder, tokenizer)
    return json.loads((folder / "config.json").read_text())["id2label"]


# --------------------------------------------------------------------------- label ids


def test_integer_labels_keep_their_numeric_ids(tmp_path, tiny_model_dir, tokenizer) -> None:
    """Labels 0..11 are ids 0..11 (they were sorted as strings: id 2 was label "10")."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"text {i}", "label": i % 12}) + "\n"
                             for i in range(24)))
    cfg = _cfg(tmp_path, tiny_model_dir, f"data.train_file={train}")
    tasks, _ = load_tasks(cfg, tokenizer)
    assert tasks[0].labels == [str(i) for i in range(12)]
    assert tasks[0].train["labels"][:12] == list(range(12))
    id2label = _saved_id2label(cfg, tasks, tiny_model_dir, tokenizer, tmp_path / "model")
    assert id2label == {str(i): str(i) for i in range(12)}


def test_digit_string_labels_sort_numerically_and_words_alphabetically() -> None:
    ds = datasets.Dataset.from_dict({"label": ["10", "2", "1", "2"]})
    assert label_names(ds, "label", "t.jsonl") == ["1", "2", "10"]
    words = datasets.Dataset.from_dict({"label": ["pos", "neg", "10"]})
    assert label_names(words, "label", "t.jsonl") == ["10", "neg", "pos"]


@pytest.mark.parametrize(("spec", "parts"), [
    ("hf:glue:mrpc:train", ("glue", "mrpc", "train")),
    ("hf:tweet_eval:emotion:validation", ("tweet_eval", "emotion", "validation")),
    ("hf:imdb:test", ("imdb", None, "test")),
    ("hf:owner/name", ("owner/name", None, "train")),
    ("hf:glue:sst2:train[:10%]", ("glue", "sst2", "train[:10%]")),
    ("hf:imdb:train[:100]", ("imdb", None, "train[:100]")),
])
def test_hub_specs_name_a_config_and_a_split(spec: str, parts: tuple) -> None:
    assert hub_split(spec) == parts


@pytest.mark.parametrize("spec", ["hf:glue:mrpc:train:extra", "hf:glue::train", "hf:"])
def test_a_malformed_hub_spec_is_named(spec: str) -> None:
    with pytest.raises(ConfigError, match=f"^{spec}: a hub dataset is hf:NAME, hf:NAME:SPLIT or "
                                          r"hf:NAME:CONFIG:SPLIT \(e\.g\. hf:glue:mrpc:train\)$"):
        hub_split(spec)


def _mrpc_like(split: str) -> datasets.Dataset:
    """A GLUE-MRPC-shaped split: two sentence columns, a ClassLabel, -1 labels in test."""
    features = datasets.Features({
        "sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["not_equivalent", "equivalent"])})
    label = (lambda i: -1) if split == "test" else (lambda i: i % 2)
    return datasets.Dataset.from_dict(
        {"sentence1": [f"apple plum {i}" for i in range(8)],
         "sentence2": [f"gear wheel {i}" for i in range(8)],
         "label": [label(i) for i in range(8)]}, features=features)


def test_hub_config_classlabel_names_and_pair_columns(tmp_path, tiny_model_dir, tokenizer,
                                                      monkeypatch) -> None:
    """hf:glue:mrpc:SPLIT is load_dataset("glue", "mrpc", split=SPLIT); the ClassLabel's names
    become the saved model's id2label, and sentence1/sentence2 are read as a pair."""
    calls = []

    def load_dataset(name, config=None, *, split):
        calls.append((name, config, split))
        return _mrpc_like(split)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = _cfg(tmp_path, tiny_model_dir, "data.train_file=hf:glue:mrpc:train",
               "data.eval_file=hf:glue:mrpc:validation", "data.text_column=sentence1",
               "data.text_pair_column=sentence2")
    tasks, _ = load_tasks(cfg, tokenizer)
    assert calls == [("glue", "mrpc", "train"), ("glue", "mrpc", "validation")]
    assert tasks[0].labels == ["not_equivalent", "equivalent"]
    assert tasks[0].eval["labels"] == [i % 2 for i in range(8)]
    assert all(1 in types for types in tasks[0].train["token_type_ids"])  # the second text
    id2label = _saved_id2label(cfg, tasks, tiny_model_dir, tokenizer, tmp_path / "model")
    assert id2label == {"0": "not_equivalent", "1": "equivalent"}
    with pytest.raises(DataError, match=r"row 1 has no label \(-1: a ClassLabel's missing value"):
        encode_labels(_mrpc_like("test"), "label", tasks[0].labels, "hf:glue:mrpc:test")
    named = datasets.Dataset.from_dict({"label": ["equivalent", "not_equivalent"]})
    assert encode_labels(named, "label", tasks[0].labels, "dev.jsonl") == [1, 0]


# --------------------------------------------------------------------------- class weights


def test_balanced_weights_are_sklearns_formula() -> None:
    """n_samples / (n_classes * count_c): 7 rows, 3 classes of 4, 2 and 1 rows."""
    names, labels = ["a", "b", "c"], [0, 1, 0, 2, 0, 1, 0]
    assert class_weights("balanced", names, labels) == pytest.approx(
        [7 / (3 * 4), 7 / (3 * 2), 7 / (3 * 1)])
    assert class_weights({"c": 5, "a": 0.5}, names, labels) == [0.5, 1.0, 5.0]
    assert class_weights(None, names, labels) is None


def test_the_loss_is_torchs_weighted_cross_entropy() -> None:
    """sum_i w[y_i] * -log p_i[y_i] / sum_i w[y_i] on a fixed batch."""
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 3), torch.tensor([0, 2, 1, 2, 2, 0])
    weight = torch.tensor([0.5, 1.0, 4.0])
    objective = Classification.__new__(Classification)
    objective.class_weights, objective.kind = {"main": weight}, "single_label"
    loss, _ = objective.loss(lambda **batch: logits, {"input_ids": None, "labels": labels},
                             stream="main", step=0, micro=0)
    picked = -logits.log_softmax(-1)[torch.arange(6), labels]
    assert loss.item() == pytest.approx((weight[labels] * picked).sum().item()
                                        / weight[labels].sum().item(), rel=1e-6)
    assert loss.item() != pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-3)
    objective.class_weights = {}  # null: the plain mean
    plain, _ = objective.loss(lambda **batch: logits, {"input_ids": None, "labels": labels},
                              stream="main", step=0, micro=0)
    assert plain.item() == pytest.approx(picked.mean().item(), rel=1e-6)


def test_class_weights_are_logged_and_recorded(tmp_path, tiny_model_dir, caplog) -> None:
    """A 9:3 task with balanced weights: the log line and metrics.json's data.class_weights."""
    from further_pt.finetune import main as finetune_main

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"apple plum {i}", "label": "ab"[i % 4 == 0]})
                             + "\n" for i in range(12)))
    with caplog.at_level(logging.INFO, logger="further_pt.objectives.classification"):
        assert finetune_main(["recipe=fit", f"output_dir={tmp_path / 'run'}",
                              f"model.name_or_path={tiny_model_dir}", f"data.train_file={train}",
                              "data.max_seq_length=16", "data.head_tokens=4", "train.epochs=1",
                              "train.batch_size=6", "train.class_weights=balanced",
                              "train.trackers=[]"]) == 0
    assert "main: class weights (train.class_weights=balanced): a 0.6667, b 2" in caplog.text
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data"]["class_weights"] == pytest.approx({"a": 12 / (2 * 9),
                                                              "b": 12 / (2 * 3)})
    assert metrics["config"]["train"]["class_weights"] == "balanced"
