"""data.streaming: a corpus read, tokenized and packed on the fly through datasets'
IterableDataset, from local jsonl and parquet files loaded by the same load_dataset path a
Hub dataset takes; exact resume by a counted skip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import pretrain_overrides, resume_after_step_3, run_script, weights


@pytest.fixture(scope="module")
def sources(tmp_path_factory, docs) -> tuple[Path, Path]:
    """The docstrings split into a jsonl and a parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("stream-sources")
    half = len(docs) // 2
    jsonl = folder / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:half]))
    parquet = folder / "b.parquet"
    pq.write_table(pa.table({"body": docs[half:]}), parquet)
    return jsonl, parquet


def _args(out: Path, sources: tuple[Path, Path], model_dir: Path, cache: Path,
          **extra: object) -> list[str]:
    jsonl, parquet = sources
    return pretrain_overrides(out, jsonl, model_dir, cache, **{
        "data.streaming": "true", "objective.nsp": "false", "data.max_documents": "null",
        "data.train_files": f"[{jsonl},{{hf: parquet, data_files: [{parquet}], "
                            "text_column: body}]", "data.source_weights": "[1,3]", **extra})


def test_the_counted_skip_resumes_at_the_same_block(sources, tiny_model_dir, tmp_path) -> None:
    """Micro-batches from position 2 of an epoch are those an uninterrupted read gives after
    its first 2; the next epoch reshuffles."""
    from functools import partial

    from further_pt import pretrain
    from further_pt.data import corpus, instances, streaming
    from further_pt.data.tokenizer import load_tokenizer

    cfg = pretrain.load(_args(tmp_path / "run", sources, tiny_model_dir, tmp_path / "cache",
                              **{"data.max_documents": 120}))  # per source: a short read
    tok = load_tokenizer(str(tiny_model_dir))
    stream = streaming.training_stream(cfg, corpus.resolve_sources(cfg.data.train_files), tok,
                                       rank=0, world=1)
    collate = partial(instances.collate, pad_id=tok.pad_token_id)

    def first(n: int, epoch: int, position: int) -> list:
        it = streaming.micro_batches(stream, batch_size=4, collate=collate, epoch=epoch,
                                     position=position)
        return [next(it) for _ in range(n)]

    whole = first(5, 0, 0)
    resumed = first(3, 0, 2)
    assert [(e, p) for e, p, _ in resumed] == [(0, 3), (0, 4), (0, 5)]
    assert all(torch.equal(a["input_ids"], b["input_ids"])
               for (_, _, a), (_, _, b) in zip(whole[2:], resumed, strict=True))
    assert all(b["input_ids"].shape == (4, 64) for _, _, b in whole)  # full packed blocks
    assert not torch.equal(first(1, 1, 0)[0][2]["input_ids"], whole[0][2]["input_ids"])


@pytest.fixture(scope="module")
def streamed_run(tmp_path_factory, sources, tiny_model_dir):
    base = tmp_path_factory.mktemp("streamed")
    args = _args(base / "run", sources, tiny_model_dir, base / "cache")
    proc = run_script(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base / "run", args


@pytest.mark.slow
def test_a_streamed_run_trains_and_saves(streamed_run) -> None:
    from transformers import AutoModelForMaskedLM

    out, _ = streamed_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["tokens"] == 6 * 4 * 64  # full blocks only
    AutoModelForMaskedLM.from_pretrained(out / "final")
    assert "read on the fly (data.streaming)" in (out / "final" / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.smoke
def test_a_resumed_streamed_run_equals_the_uninterrupted_one(streamed_run, tmp_path) -> None:
    out, args = streamed_run
    crashed = resume_after_step_3(out, args, tmp_path)  # died after the step-3 checkpoint
    want, got = weights(out / "final"), weights(crashed / "final")
    assert all(torch.equal(want[k], got[k]) for k in want)
