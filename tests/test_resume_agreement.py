"""Objectives are built from the checkpoint every process agreed on (issue 27, item 5).

Each process picks a checkpoint alone before the process group exists (the main one with
checksums, the others by sizes); ``Trainer.start`` then hands every process the main
one's choice. An objective's constructor reads a config and tokenizer from the process's
own pick, for its checks before any work; ``build`` must use the agreed one, or a process
whose view differed trains with another tokenizer, or fails alone while the others wait.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import free_port, pretrain_overrides, run_script, write_task

from further_pt import finetune, pretrain
from further_pt.objectives.classification import Classification
from further_pt.objectives.masked_lm import MaskedLM
from further_pt.train import checkpoint


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory, docs: list[str]) -> Path:
    """Another checkpoint's view: a 600-piece tokenizer and a model of that vocabulary."""
    from transformers import BertConfig, BertForPreTraining

    from further_pt.data.tokenizer import train_wordpiece

    tok = train_wordpiece(docs, vocab_size=600, lowercase=True, max_seq_length=64)
    folder = tmp_path_factory.mktemp("other-bert")
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    BertForPreTraining(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _run(output: Path, agreed: Path | None) -> SimpleNamespace:
    """The Trainer as ``build`` sees it after ``start()``: one CPU process, resuming ``agreed``."""
    accelerator = SimpleNamespace(device=torch.device("cpu"),
                                  main_process_first=contextlib.nullcontext)
    output.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(accelerator=accelerator, output_dir=output, resume_from=agreed,
                           is_main=True, rank=0, world=1, claim=lambda: None)


@pytest.mark.parametrize("agreed", ["none", "checkpoint"])
def test_masked_lm_builds_from_the_agreed_checkpoint_not_its_own(
        tmp_path, corpus_file, tiny_model_dir, tokenizer, other_model_dir, agreed) -> None:
    """This process saw ``other_model_dir`` (600 pieces); the main process chose no checkpoint
    (a fresh start from model.name_or_path) or another one: both hold the 800-piece
    tokenizer, and the built objective has it, with a model of 800 embedding rows."""
    cfg = pretrain.load(pretrain_overrides(tmp_path / "run", corpus_file, tiny_model_dir,
                                           tmp_path / "cache"))
    objective = MaskedLM(cfg, other_model_dir)  # the checks ran on this process's own view
    assert len(objective.tokenizer) == 600 and objective.model_config.vocab_size == 600
    chosen = tiny_model_dir if agreed == "checkpoint" else None
    objective.build(_run(tmp_path / "run", chosen))
    assert objective.resume_from == chosen
    assert len(objective.tokenizer) == len(tokenizer) == 800
    assert objective.model_config.vocab_size == 800
    assert objective.module.model.get_input_embeddings().weight.shape[0] == 800
    ids = [row["input_ids"] for row in objective.streams[0].dataset.select(range(4))]
    assert max(max(r) for r in ids) < 800 and objective.streams[0].dataset.num_rows > 0
    collate = objective.streams[0].collate  # masks in the workers, with the agreed tokenizer
    assert collate.vocab_size == 800 and int(collate.special_ids.max()) < 800


def test_classification_builds_from_the_agreed_checkpoint_not_its_own(
        tmp_path, tiny_model_dir, tokenizer, other_model_dir) -> None:
    """Fine-tuning alike: this process saw a checkpoint, the main process none (a fresh start
    from model.name_or_path): the texts are tokenized with that model's tokenizer."""
    train = write_task(tmp_path / "train.jsonl", 16, seed=0)
    cfg = finetune.load(["recipe=fit", f"output_dir={tmp_path / 'run'}",
                         f"model.name_or_path={tiny_model_dir}", f"data.train_file={train}",
                         "data.eval_file=null", "data.max_seq_length=64",
                         f"data.cache_dir={tmp_path / 'cache'}"])
    objective = Classification(cfg, other_model_dir)
    assert len(objective.tokenizer) == 600
    objective.build(_run(tmp_path / "run", None))
    assert objective.resume_from is None
    assert len(objective.tokenizer) == len(tokenizer) == 800
    assert objective.model_config.vocab_size == 800
    encoded = objective.tasks[0].train[0]["input_ids"]
    assert encoded == tokenizer(json.loads(train.read_text().splitlines()[0])["text"],
                                truncation=True, max_length=64)["input_ids"]


@pytest.mark.slow
def test_a_process_whose_view_differs_resumes_the_main_ones_choice(
        tmp_path, corpus_file, tiny_model_dir) -> None:
    """Two gloo processes, an extend_vocab run. The only checkpoint's weights have a flipped
    byte: its sizes are right, so rank 1 (sizes only) picks it, while rank 0 (checksums)
    skips it and starts afresh. Rank 1's objective was checked on the checkpoint's extended
    tokenizer; built from rank 0's choice it trains from model.name_or_path like rank 0.
    Before, rank 1 loaded the base model with the checkpoint's extended config and failed
    alone (the other process waiting on it)."""
    out = tmp_path / "run"
    args = pretrain_overrides(out, corpus_file, tiny_model_dir, tmp_path / "cache", **{
        "model.extend_vocab": "{max_new_tokens:20,min_frequency:3}",
        "data.group_by_length": "false", "train.global_batch_size": 4,
        "train.collective_timeout_s": 60})
    first = run_script(args, env={"FURTHER_PT_FAULT": "after_checkpoint:3"}, timeout=300)
    ckpt = out / "checkpoints" / "step-000003"
    assert first.returncode != 0 and ckpt.is_dir(), first.stderr[-3000:]
    extended = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    assert extended > 800  # the checkpoint holds the extended vocabulary
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # bit rot: the size is right, the checksum is not
    weights.write_bytes(bytes(data))
    assert checkpoint.latest_checkpoint(out / "checkpoints", checksums=False) == ckpt
    assert checkpoint.latest_checkpoint(out / "checkpoints", checksums=True) is None

    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    second = run_script(args, launcher=launcher, timeout=300, env={"ACCELERATE_USE_CPU": "true"})
    assert second.returncode == 0, second.stderr[-3000:]
    assert "skipping checkpoint" in second.stderr and "starting from step 0" in second.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6
    final = json.loads((out / "final" / "config.json").read_text())
    assert final["vocab_size"] == extended  # the same extension, chosen again from the corpus
    state = json.loads((out / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
