"""Held-out MLM loss and perplexity during further pretraining, and the model card it goes in.

The evaluation scores the same masked positions every time (masks fixed once, seeded by each
sequence's index), so two evaluations of one model agree and a curve moves only because the
model moved; it is the mean cross-entropy over the masked positions, as the Hugging Face
model's own loss computes it; any number of processes gives the one-process figure.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import (
    free_port,
    leave_process_group,
    pretrain_overrides,
    resume_after_step_3,
    run_script,
)

from further_pt import pretrain
from further_pt.data import corpus, prepare
from further_pt.data.tokenizer import load_tokenizer
from further_pt.objectives import encoder
from further_pt.objectives.evaluation import heldout_loss, pad_rows
from further_pt.objectives.mlm_loss import PretrainingObjective


def _held_out(tmp_path: Path, corpus_file: Path, model_dir: Path, **extra: object):
    cfg = pretrain.load(pretrain_overrides(tmp_path / "run", corpus_file, model_dir,
                                           tmp_path / "cache", **{"data.eval_fraction": 0.1,
                                                                  "objective.nsp": "false",
                                                                  **extra}))
    tok = load_tokenizer(str(model_dir))
    docs = prepare.read_corpus(cfg, corpus.resolve_sources(cfg.data.train_files))
    train, held = prepare.held_out_documents(cfg, docs)
    return cfg, tok, docs, train, held


def _module(model_dir: Path) -> PretrainingObjective:
    config = encoder.load_config(str(model_dir))
    net, _ = encoder.load_pretraining_model(model_dir, config, nsp=False,
                                            attn_implementation="eager", trust_remote_code=False)
    return PretrainingObjective(net, nsp=False, max_predictions=20)


def test_perplexity_is_exp_of_the_hf_models_own_loss(tmp_path, corpus_file, tiny_model_dir):
    cfg, tok, docs, train, held = _held_out(tmp_path, corpus_file, tiny_model_dir)
    assert len(train[0]) + len(held[0]) == len(docs[0]) and len(held[0]) == 30  # 10% of 300
    rows = prepare.evaluation_rows(cfg, held, tok)
    module = _module(tiny_model_dir)
    ours = heldout_loss(module, rows, batch_size=4, pad_id=tok.pad_token_id)
    batch = pad_rows(rows, tok.pad_token_id)  # every row in one batch: HF's mean over them
    module.model.eval()
    with torch.no_grad():
        hf = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          token_type_ids=batch["token_type_ids"], labels=batch["labels"]).loss
    assert ours["eval_loss"] == pytest.approx(float(hf), rel=1e-5)
    assert ours["eval_perplexity"] == pytest.approx(math.exp(ours["eval_loss"]), rel=1e-12)
    assert ours["eval_masked_tokens"] == int((batch["labels"] != -100).sum()) > 0
    assert module.training  # the training mode comes back


def test_two_evaluations_of_one_model_agree(tmp_path, corpus_file, tiny_model_dir) -> None:
    """The masks are drawn once, from each sequence's index: rebuilt, they are the same."""
    cfg, tok, _, _, held = _held_out(tmp_path, corpus_file, tiny_model_dir,
                                     **{"objective.masking": "whole_word"})
    rows, again = prepare.evaluation_rows(cfg, held, tok), prepare.evaluation_rows(cfg, held, tok)
    assert all(torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"],
                                                                     b["input_ids"])
               for a, b in zip(rows, again, strict=True))
    module = _module(tiny_model_dir)
    first = heldout_loss(module, rows, batch_size=3, pad_id=tok.pad_token_id)
    assert heldout_loss(module, again, batch_size=3, pad_id=tok.pad_token_id) == first
    other = heldout_loss(module, again, batch_size=5, pad_id=tok.pad_token_id)  # other padding
    assert other["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-6)
    cfg.eval.max_sequences = 4  # a seeded choice of 4, each masked as in the whole set
    capped = prepare.evaluation_rows(cfg, held, tok)
    assert len(capped) == 4 < len(rows)
    assert all(any(torch.equal(c["input_ids"], r["input_ids"]) and torch.equal(c["labels"],
                                                                             r["labels"])
                   for r in rows) for c in capped)


def _shard_worker(rank: int, world: int, port: int, folder: str, queue) -> None:
    import torch.distributed as dist

    from further_pt.objectives.base import EvalShard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    saved = torch.load(Path(folder) / "rows.pt", weights_only=True)

    def gather(items: list) -> list:
        out: list = [None] * world
        dist.all_gather_object(out, items)
        return [x for part in out for x in part]

    module = _module(Path(saved["model_dir"]))
    result = heldout_loss(module, saved["rows"], batch_size=4, pad_id=saved["pad_id"],
                          shard=EvalShard(rank, world, gather))
    if rank == 0:
        queue.put(result)
    leave_process_group()


@pytest.mark.slow
def test_two_processes_give_the_one_process_figure(tmp_path, corpus_file, tiny_model_dir):
    cfg, tok, _, _, held = _held_out(tmp_path, corpus_file, tiny_model_dir)
    rows = prepare.evaluation_rows(cfg, held, tok)
    one = heldout_loss(_module(tiny_model_dir), rows, batch_size=4, pad_id=tok.pad_token_id)
    torch.save({"rows": rows, "pad_id": tok.pad_token_id, "model_dir": str(tiny_model_dir)},
               tmp_path / "rows.pt")
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    torch.multiprocessing.start_processes(_shard_worker, args=(2, free_port(), str(tmp_path),
                                                               queue), nprocs=2,
                                          start_method="spawn")
    two = queue.get()
    assert two["eval_masked_tokens"] == one["eval_masked_tokens"]
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-6)


# ------------------------------------------------------------------ a run: curve, resume, card


@pytest.fixture(scope="module")
def heldout_run(tmp_path_factory, corpus_file, tiny_model_dir):
    base = tmp_path_factory.mktemp("heldout")
    args = pretrain_overrides(base / "run", corpus_file, tiny_model_dir, base / "cache", **{
        "data.eval_fraction": 0.1, "eval.every_steps": 2, "checkpoint.keep_best_by": "eval_loss"})
    proc = run_script(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base / "run", args, proc


def _evals(out: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["eval_loss"] for x in lines if "eval_loss" in x}


def test_the_run_logs_the_held_out_curve(heldout_run) -> None:
    out, _, proc = heldout_run
    curve = _evals(out)
    assert sorted(curve) == [2, 4, 6]
    assert "step 2 (epoch 1): eval_loss=" in proc.stderr and "eval_perplexity=" in proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    best = min(curve, key=curve.get)
    assert metrics["eval_loss"] == curve[best]  # keep_best_by: final/ is the best model
    assert metrics["final_model"].startswith("best epoch") and (out / "best").is_dir()
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))


@pytest.mark.slow
@pytest.mark.smoke
def test_a_resumed_runs_evaluations_equal_the_uninterrupted_ones(heldout_run, tmp_path):
    out, args, _ = heldout_run
    crashed = resume_after_step_3(out, args, tmp_path)  # died after the step-3 checkpoint
    assert _evals(crashed) == _evals(out)  # steps 4 and 6 evaluated again, to the last bit


def test_every_final_and_best_folder_has_a_model_card(heldout_run, tiny_model_dir) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    out, _, _ = heldout_run
    metrics = json.loads((out / "metrics.json").read_text())
    for folder in (out / "final", out / "best"):
        card = ModelCard.load(folder / "README.md")
        data = card.data
        ModelCardData(**data.to_dict())  # the metadata validates (model-index parses back)
        assert data.base_model == str(tiny_model_dir) and data.library_name == "transformers"
        assert data.pipeline_tag == "fill-mask" and "further_pt" in data.tags
        found = {r.metric_type: r.metric_value for r in data.eval_results}
        assert found == {"loss": metrics["eval_loss"], "perplexity": metrics["eval_perplexity"]}
        assert "Don't Stop Pretraining" in card.text and "How to Fine-Tune BERT" in card.text
        assert "datasets fingerprint" in card.text and "global batch: 4 sequences" in card.text
    manifest = json.loads((out / "final" / "manifest.json").read_text())
    assert "README.md" in manifest["files"]  # checked with the weights
