"""Head warm-up: a model loaded without its MLM head trains that head alone first.

An encoder saved without heads (as sentence-transformers, e5 or GTE ship them)
gets a random MLM head; its gradients would otherwise flow through the
pretrained encoder from step 0. With ``objective.head_warmup.steps: auto`` the
new head learns alone (encoder frozen) for ``auto_steps`` steps, then the whole
model trains for ``train.max_steps`` under the recipe's schedule.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from helpers import pretrain_overrides, run_script, run_scripts
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def headless_dir(tmp_path_factory, tiny_model_dir: Path) -> Path:
    """The tiny BERT's encoder alone (BertModel: no MLM/NSP heads), as a HF folder."""
    from transformers import AutoTokenizer, BertForPreTraining

    folder = tmp_path_factory.mktemp("headless")
    BertForPreTraining.from_pretrained(tiny_model_dir).bert.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def _args(out: Path, corpus: Path, model: Path, cache: Path, **extra: object) -> list[str]:
    settings = {"objective.nsp": "false", "objective.head_warmup.auto_steps": 4,
                "train.max_steps": 2, "train.warmup_steps": 0, "train.lr": 5e-4,
                "train.log_every_steps": 1,
                "checkpoint.every_steps": 2, "checkpoint.keep_last": 5, **extra}
    return pretrain_overrides(out, corpus, model, cache, **settings)


def _encoder(folder: Path) -> dict[str, torch.Tensor]:
    weights = load_file(folder / "model.safetensors")
    return {k.removeprefix("bert."): v for k, v in weights.items()
            if k.startswith("bert.") or not k.startswith("cls.")}


def _mlm_loss(folder: Path, corpus: Path) -> float:
    """The MLM loss of a checkpoint's model on the corpus' first 16 lines, masked with seed 0."""
    from transformers import AutoTokenizer, BertForMaskedLM

    from further_pt.data import masking

    tok = AutoTokenizer.from_pretrained(folder)
    lines = [x for x in corpus.read_text().splitlines() if x.strip()][:16]
    batch = tok(lines, padding=True, truncation=True, max_length=64, return_tensors="pt")
    masked, labels = masking.mask_tokens(
        batch["input_ids"], batch["attention_mask"], special_ids=masking.special_ids_tensor(tok),
        mask_token_id=tok.mask_token_id, vocab_size=len(tok), masked_lm_prob=0.15,
        max_predictions=20, generator=torch.Generator().manual_seed(0), strategy="token")
    model = BertForMaskedLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return float(model(input_ids=masked, attention_mask=batch["attention_mask"],
                           labels=labels).loss)


@pytest.mark.slow
@pytest.mark.smoke
def test_new_head_learns_alone_then_the_encoder_moves(tmp_path: Path, corpus_file: Path,
                                                      headless_dir: Path) -> None:
    out = tmp_path / "run"
    proc = run_script(_args(out, corpus_file, headless_dir, tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((out / "head_warmup.json").read_text())
    assert plan["steps"] == 4 and "cls.predictions.transform.dense.weight" in plan["heads"]
    assert not any(h.startswith("bert.") for h in plan["heads"])
    assert "head warm-up: " in proc.stderr and "encoder frozen" in proc.stderr
    base = {k: v for k, v in load_file(headless_dir / "model.safetensors").items()
            if "pooler" not in k}
    during = _encoder(out / "checkpoints" / "step-000004")  # the last warm-up step
    after = _encoder(out / "final")  # 2 steps of the whole model later
    assert all(torch.equal(during[k], v) for k, v in base.items())  # bit-identical
    assert sum(not torch.equal(after[k], v) for k, v in base.items()) > len(base) // 2
    head_during = load_file(out / "checkpoints" / "step-000004" / "model.safetensors")
    head_start = load_file(out / "checkpoints" / "step-000002" / "model.safetensors")
    key = "cls.predictions.transform.dense.weight"
    assert not torch.equal(head_during[key], head_start[key])  # the head itself learns
    logs = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    lrs = {x["step"]: (x["lr/encoder"], x["lr/heads"]) for x in logs}
    # Logged after each step: the lr of the next one. Steps 1-4 warm up at 1e-3 (encoder 0),
    # steps 5-6 follow train.lr = 5e-4's linear decay for every group.
    assert lrs[1] == lrs[3] == (0.0, pytest.approx(1e-3))
    assert lrs[4] == (pytest.approx(5e-4), pytest.approx(5e-4))
    assert lrs[5] == (pytest.approx(2.5e-4), pytest.approx(2.5e-4))
    # The head's loss falls during the warm-up, on one fixed batch: the logged losses are of
    # different batches, whose spread (about 0.01 here) hides two steps' progress.
    assert _mlm_loss(out / "checkpoints" / "step-000004", corpus_file) < _mlm_loss(
        out / "checkpoints" / "step-000002", corpus_file)


@pytest.mark.slow
def test_no_warmup_when_the_checkpoint_has_its_heads(tmp_path: Path, corpus_file: Path,
                                                     tiny_model_dir: Path) -> None:
    out = tmp_path / "run"
    proc = run_script(_args(out, corpus_file, tiny_model_dir, tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "head_warmup.json").read_text()) == {"steps": 0, "heads": []}
    assert "head warm-up" not in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]


@pytest.mark.slow
def test_resume_inside_the_warmup_is_bit_exact(tmp_path: Path, corpus_file: Path,
                                               headless_dir: Path) -> None:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = _args(cut, corpus_file, headless_dir, tmp_path / "cache-cut")
    reference, killed = run_scripts(  # side by side: independent outputs and caches
        (_args(whole, corpus_file, headless_dir, tmp_path / "cache-whole"), None),
        (args, {"FURTHER_PT_FAULT": "step:3"}))  # killed after step-000002
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert killed.returncode == -signal.SIGKILL
    resumed = run_script(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "step 2" in resumed.stderr
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(
        cut / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
