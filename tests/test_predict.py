"""``further-pt predict`` on folders the ecosystem makes: a plain Hugging Face classifier saved
with save_pretrained (no preprocessing.json), and a further_pt multi-task model. Outputs in each
format are read back and compared with the model's own probabilities."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import FRUIT, MOTOR

from further_pt.cli.main import main

NAMES = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny BertForSequenceClassification built from a config, saved as the ecosystem does."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("plain")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                        pad_token_id=tokenizer.pad_token_id, num_labels=3,
                        id2label=dict(enumerate(NAMES)))
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Texts of very different lengths (some beyond the 64 positions: cut), in no length order."""
    import random

    rng = random.Random(0)
    return [" ".join(rng.choices(FRUIT + MOTOR, k=n)) for n in (3, 90, 1, 12, 40, 7, 150, 2, 25, 5)]


def _expected(folder: Path, texts: list[str], max_length: int) -> torch.Tensor:
    """The model's own probabilities, as a pipeline computes them (truncated to max_length)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    enc = tok(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.softmax(-1)


def _read(path: Path) -> list[dict]:
    """An output read back with the libraries users would use; csv's nested cells are JSON."""
    import pandas as pd

    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    if path.suffix == ".parquet":
        import datasets

        return datasets.Dataset.from_parquet(str(path)).to_list()
    rows = pd.read_csv(path).to_dict("records")
    for row in rows:
        for key in ("probabilities", "top_k"):
            if key in row:
                row[key] = json.loads(row[key])
    return rows


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_a_plain_hf_folder_predicts_in_each_format(plain_dir, texts, tmp_path, suffix,
                                                   capsys) -> None:
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / f"preds{suffix}"
    assert main(["predict", f"model={plain_dir}", f"input={data}", f"output={out}",
                 "batch_size=4"]) == 0
    said = capsys.readouterr().out
    assert ("task main: text 'text', head truncation to 64 tokens (the tokenizer's "
            "model_max_length), 3 labels") in said
    rows = _read(out)
    expected = _expected(plain_dir, texts, 64)
    assert [r["id"] for r in rows] == list(range(len(texts)))  # the input's order, columns kept
    assert [r["prediction"] for r in rows] == [NAMES[i] for i in expected.argmax(-1).tolist()]
    got = torch.tensor([[r["probabilities"][n] for n in NAMES] for r in rows])
    assert torch.allclose(got, expected, atol=2e-6)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_top_k_writes_the_k_best_labels_with_their_probabilities(plain_dir, texts, tmp_path,
                                                                 suffix) -> None:
    data = tmp_path / "in.csv"
    data.write_text("text\n" + "".join(f"{t}\n" for t in texts))
    out = tmp_path / f"top{suffix}"
    assert main(["predict", f"model={plain_dir}", f"input={data}", f"output={out}",
                 "top_k=2", "max_length=16"]) == 0
    rows = _read(out)
    scores, ids = _expected(plain_dir, texts, 16).topk(2, dim=-1)
    for row, s, i in zip(rows, scores.tolist(), ids.tolist(), strict=True):
        assert "probabilities" not in row
        assert [e["label"] for e in row["top_k"]] == [NAMES[j] for j in i]
        assert [e["score"] for e in row["top_k"]] == pytest.approx(s, abs=2e-6)
        assert row["prediction"] == row["top_k"][0]["label"]


def test_an_output_suffix_without_a_format_is_refused_before_the_model_loads(
        plain_dir, tmp_path, monkeypatch, capsys) -> None:
    from further_pt.objectives import prediction

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(prediction, "load_classifier", never)
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "apple"}\n')
    out = tmp_path / "preds.txt"
    assert main(["predict", f"model={plain_dir}", f"input={data}", f"output={out}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"further_pt: error: predict: output={out}: the format is read from the suffix: "
        ".jsonl, .parquet, .csv")
    assert main(["predict", f"model={plain_dir}", f"input={data}", f"output={out}.csv",
                 "max_length=65"]) == 2
    assert "max_length=65 exceeds the model's 64 positions" in capsys.readouterr().err
    assert not out.exists() and not Path(f"{out}.csv").exists()


def test_every_task_of_a_multi_task_model_is_predicted(tiny_model_dir, tokenizer, texts,
                                                       tmp_path) -> None:
    """A further_pt multi-task folder (two heads on one encoder, pairs of texts): each task's
    prediction and probabilities, equal to the model's own for that task."""
    from transformers import AutoModelForSequenceClassification

    from further_pt.objectives.heads import Classifier, HeadSpec, load_classifier

    torch.manual_seed(1)
    tasks = {"topic": ["fruit", "motor"], "mood": ["calm", "angry", "odd"]}
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    clf = Classifier(model, HeadSpec(pooling="mean", layers=[-1], layer_combine="concat",
                                     segment_pooling="mean", dropout=0.1, tasks=tasks))
    folder = tmp_path / "mt"
    clf.save(folder, tokenizer)
    (folder / "preprocessing.json").write_text(json.dumps({
        "text_column": "text", "text_pair_column": "second", "label_column": "label",
        "max_seq_length": 32, "truncation": "head", "head_tokens": 8, "max_segments": 1,
        "tasks": {"topic": {"text_column": "text", "label_column": "topic"},
                  "mood": {"text_column": "text", "label_column": "mood"}}}))
    pairs = list(reversed(texts))
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": a, "second": b, "topic": "motor"}) + "\n"
                            for a, b in zip(texts, pairs, strict=True)))
    out = tmp_path / "preds.jsonl"
    assert main(["predict", f"model={folder}", f"input={data}", f"output={out}"]) == 0
    rows = _read(out)
    loaded = load_classifier(folder).eval()
    enc = tokenizer(texts, pairs, truncation="longest_first", max_length=32, padding=True,
                    return_tensors="pt")
    for task, names in tasks.items():
        with torch.no_grad():
            probs = loaded(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"],
                           task=task).softmax(-1)
        assert [r[f"{task}_prediction"] for r in rows] == [names[i] for i in
                                                           probs.argmax(-1).tolist()]
        got = torch.tensor([[r[f"{task}_probabilities"][n] for n in names] for r in rows])
        assert torch.allclose(got, probs, atol=2e-6)
    assert "prediction" not in rows[0]
