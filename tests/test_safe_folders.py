"""A saved classifier folder never predicts noise: for every head kind, ``pipeline()`` either
predicts what ``further-pt predict`` does or refuses, naming how to load the folder.

Before, a custom head (``head.safetensors``) left the HF folder's own ``classifier.*``
untrained and ``pipeline("text-classification")`` loaded it silently: on a tiny run that
``further-pt predict`` scores 1.0 on, it gave 0.5 (ulmfit) and 0.0 (pooler) accuracy with
near-uniform probabilities (0.50-0.55).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from further_pt.cli.main import main as cli_main
from further_pt.objectives.heads import Classifier, HeadSpec, load_classifier
from further_pt.objectives.standard_folder import REFUSAL

LABELS = ["apple", "brake", "cherry"]
TEXTS = ["apple melon plum", "engine brake gear wheel", "the cherry of the list",
         "return the value of the path"]
#: name -> (pooling, layers, layer_combine, tasks, hierarchical, whether pipeline() may load it)
KINDS = {
    "cls (standard)": ("cls", [-1], "concat", 1, False, True),
    "pooler": ("pooler", [-1], "concat", 1, False, True),  # BERT's own head, exactly
    "cls_raw": ("cls_raw", [-1], "concat", 1, False, False),
    "mean": ("mean", [-1], "concat", 1, False, False),
    "max": ("max", [-1], "concat", 1, False, False),
    "ulmfit concat": ("concat", [-1], "concat", 1, False, False),
    "feat layers": ("cls_raw", [-2, -1], "concat", 1, False, False),
    "layer mean": ("mean", [0, -1], "mean", 1, False, False),
    "multi-task": ("cls", [-1], "concat", 2, False, False),
    "segments": ("cls", [-1], "concat", 1, True, False),
}


def _save(folder: Path, tokenizer, kind: str) -> None:
    """A classifier of ``kind`` with seeded random weights, saved as fine-tuning saves it."""
    from transformers import BertConfig, BertForSequenceClassification

    pooling, layers, combine, n_tasks, hierarchical, _ = KINDS[kind]
    torch.manual_seed(0)
    hf = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}))
    tasks = {"main": LABELS, **({"other": ["x", "y"]} if n_tasks > 1 else {})}
    spec = HeadSpec(pooling=pooling, layers=layers, layer_combine=combine,
                    segment_pooling="mean", dropout=0.1, tasks=tasks)
    clf = Classifier(hf, spec, hierarchical=hierarchical)
    with torch.no_grad():  # heads far from the HF head's init: noise would show
        trained = [p for p in clf.parameters() if not any(p is q for q in hf.parameters())]
        for p in trained or [hf.classifier.weight]:  # the standard head trains its own
            if p.ndim == 2:
                p.normal_(0, 10.0)
    clf.train()  # saved mid-training: the probe must not leave it in eval mode
    clf.save(folder, tokenizer)
    assert clf.training
    (folder / "preprocessing.json").write_text(json.dumps({
        "text_column": "text", "text_pair_column": None, "label_column": "label",
        "max_seq_length": 32, "truncation": "segments" if hierarchical else "head",
        "head_tokens": 8, "max_segments": 2}))


def _further_pt_predict(folder: Path, tmp_path: Path) -> list[dict[str, float]]:
    rows = tmp_path / "in.jsonl"
    rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "out.jsonl"
    assert cli_main(["predict", f"model={folder}", f"input={rows}", f"output={out}"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    # one task: "probabilities"; several: each task's "TASK_probabilities" (the first here)
    key = next(k for k in rows[0] if k.endswith("probabilities"))
    return [row[key] for row in rows]


@pytest.mark.parametrize("kind", list(KINDS))
def test_pipeline_predicts_exactly_or_refuses(kind: str, tmp_path, tokenizer) -> None:
    from transformers import AutoModelForSequenceClassification, pipeline

    folder = tmp_path / "model"
    _save(folder, tokenizer, kind)
    ours = _further_pt_predict(folder, tmp_path)  # further_pt's own loader reads every kind
    assert load_classifier(folder).custom == (kind != "cls (standard)")
    if KINDS[kind][-1]:
        got = pipeline("text-classification", model=str(folder))(TEXTS, top_k=None)
        for row, expected in zip(got, ours, strict=True):
            scores = {x["label"]: x["score"] for x in row}
            assert scores.keys() == expected.keys()
            assert all(abs(scores[k] - expected[k]) < 1e-5 for k in expected), (scores, expected)
        assert max(max(p.values()) for p in ours) > 0.6  # not near-uniform (1/3): the head
        return
    for load in (lambda: AutoModelForSequenceClassification.from_pretrained(folder),
                 lambda: pipeline("text-classification", model=str(folder))):
        with pytest.raises(ValueError) as raised:
            load()
        assert REFUSAL in str(raised.value)
        assert "further-pt predict model=FOLDER" in str(raised.value)
