"""End to end, as users run it: a script under python or `accelerate launch`, on CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import pretrain_overrides, run_script, weights


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus_file, tiny_model_dir):
    base = tmp_path_factory.mktemp("pretrain")
    out, cache = base / "run", base / "cache"
    args = pretrain_overrides(out, corpus_file, tiny_model_dir, cache)
    proc = run_script(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, args, proc


@pytest.mark.smoke
def test_run_writes_loadable_checkpoints_and_logs(finished_run) -> None:
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    out, _, proc = finished_run
    # train.fast_cpu_dropout (the recipes' default) on a CPU; eager attention stays as it is
    assert ("CPU dropout: 7 dropout layers and the attention of 0 model(s) draw their masks "
            "with further_pt's fast sampler (train.fast_cpu_dropout)") in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003",
                                                                       "step-000006"]
    for folder in (out / "checkpoints" / "step-000003", out / "final"):
        model = AutoModelForMaskedLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        assert model.config.vocab_size == len(tok)
    fill = pipeline("fill-mask", model=str(out / "final"))
    assert len(fill(f"return the {fill.tokenizer.mask_token} of the list.")) == 5
    state = json.loads((out / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["streams"]["corpus"][1] > 0  # [epoch, micro-batch]
    lines = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4, 6]
    assert all(x["train/mlm_loss"] > 0 and 0 <= x["train/nsp_accuracy"] <= 1 for x in lines)
    assert all(0 < x["train/mfu"] < 1 and x["train/tokens_per_s"] > 0 for x in lines)
    assert lines[0]["train/lr"] > lines[-1]["train/lr"] == 0.0  # linear decay to 0
    assert list((out / "logs" / "pretrain").rglob("events.out.tfevents*"))
    assert (out / "config.yaml").is_file()
    assert "Final model:" in proc.stdout


@pytest.mark.slow
def test_rerunning_a_finished_run_does_nothing(finished_run) -> None:
    out, args, _ = finished_run
    before = (out / "final" / "model.safetensors").stat().st_mtime_ns
    proc = run_script(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already holds a finished run of 6 steps" in proc.stderr
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.smoke
def test_resumed_run_equals_uninterrupted_run(finished_run, tmp_path: Path) -> None:
    out, args, _ = finished_run
    crashed = tmp_path / "crashed"
    shutil.copytree(out, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-000006")  # died after the step-3 checkpoint
    shutil.rmtree(crashed / "final")
    resumed_args = [a if not a.startswith("output_dir=") else f"output_dir={crashed}"
                    for a in args]
    proc = run_script(resumed_args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "step-000003" in proc.stderr
    want, got = weights(out / "final"), weights(crashed / "final")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_from_scratch_packed_whole_word(tmp_path: Path, corpus_file: Path) -> None:
    from transformers import AutoModelForMaskedLM

    out = tmp_path / "scratch"
    args = ["recipe=demo", f"output_dir={out}", f"data.train_files=[{corpus_file}]",
            f"data.cache_dir={tmp_path / 'cache'}", "data.max_seq_length=64",
            "objective.nsp=false", "objective.masking=whole_word",
            "model.from_scratch.vocab_size=400", "model.from_scratch.hidden_size=32",
            "model.from_scratch.intermediate_size=64", "train.max_steps=4",
            "train.warmup_steps=1", "train.batch_size=4", "checkpoint.every_steps=4",
            "train.log_every_steps=2", "train.gradient_accumulation_steps=2",
            "train.fast_cpu_dropout=false"]
    proc = run_script(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CPU dropout:" not in proc.stderr  # false: torch's own dropout
    model = AutoModelForMaskedLM.from_pretrained(out / "final")
    assert model.config.architectures == ["BertForMaskedLM"]
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert model.config.vocab_size <= 400


@pytest.mark.slow
def test_world_size_disagreement_fails_loudly(tmp_path: Path, corpus_file: Path,
                                              tiny_model_dir: Path) -> None:
    """`accelerate launch --cpu --num_processes 2` starts ONE process: never train silently so."""
    args = pretrain_overrides(tmp_path / "out", corpus_file, tiny_model_dir, tmp_path / "cache")
    proc = run_script(args, env={"WORLD_SIZE": "2"}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "further_pt: error: WORLD_SIZE=2 but Accelerate runs 1 process(es)")
    assert not (tmp_path / "out").exists()
