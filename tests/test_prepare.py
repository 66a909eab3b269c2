"""`further-pt prepare`: tokenise a corpus into data.cache_dir ahead of the run, which reuses it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import pretrain_overrides, run_script

from further_pt.cli import main

NSP_MAP = "building NSP instances"  # the desc of build_instances' datasets.map progress bar


def _arrow_files(cache: Path) -> dict[Path, int]:
    """Every Arrow file under the cache, with its modification time (ns)."""
    return {p: p.stat().st_mtime_ns for p in cache.rglob("*.arrow")}


@pytest.mark.slow
def test_the_run_reuses_what_prepare_built(tmp_path: Path, corpus_file: Path,
                                           tiny_model_dir: Path, capfd) -> None:
    import datasets

    out, cache = tmp_path / "run", tmp_path / "cache"
    args = pretrain_overrides(out, corpus_file, tiny_model_dir, cache, **{
        "train.max_steps": 2, "train.log_every_steps": 1, "checkpoint.every_steps": 2})

    assert main.main(["prepare", *args]) == 0
    stdout, stderr = capfd.readouterr()
    assert not out.exists()  # prepare reads and caches; it never claims the output dir
    found = re.search(r"source 1/1 \S+: ([\d,]+) documents -> ([\d,]+) instances, ([\d,]+) "
                      r"tokens; .* cache: (\S+)\n", stdout)
    assert found, stdout
    documents, built, tokens = (int(found[i].replace(",", "")) for i in (1, 2, 3))
    folder = Path(found[4])
    assert documents == 300 and folder.is_relative_to(cache) and folder.is_dir()
    assert f"data.cache_dir={cache}" in stdout.splitlines()[-1]
    # The printed numbers are those of the instances in the cache.
    tables = [datasets.Dataset.from_file(str(p)) for p in folder.glob("cache-*.arrow")]
    nsp = [t for t in tables if "next_sentence_label" in t.column_names]
    assert len(nsp) == 1 and len(nsp[0]) == built > 30
    assert sum(len(ids) for ids in nsp[0]["input_ids"]) == tokens > built * 10

    before = _arrow_files(cache)
    proc = run_script(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "final" / "model.safetensors").is_file()
    assert _arrow_files(cache) == before  # nothing read, filtered or tokenized again
    if NSP_MAP in stderr:  # progress bars on (the default): prepare showed it, the run did not
        assert NSP_MAP not in proc.stderr


@pytest.mark.parametrize("key", ["from_scratch", "extend_vocab"])
def test_prepare_refuses_a_tokenizer_the_run_makes(tmp_path: Path, corpus_file: Path,
                                                   tiny_model_dir: Path, capfd, key: str) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = pretrain_overrides(out, corpus_file, tiny_model_dir, cache)
    if key == "from_scratch":  # the demo recipe's from_scratch block, no pretrained model
        args = [a for a in args if not a.startswith("model.")] + ["model.name_or_path=null"]
    else:
        args.append("model.extend_vocab={max_new_tokens:10,min_frequency:2}")
    assert main.main(["prepare", *args]) == 2
    _, stderr = capfd.readouterr()
    lines = [line for line in stderr.splitlines() if line.startswith("further_pt:")]
    assert len(lines) == 1 and f"'model.{key}'" in lines[0]
    assert "prepare cannot know the tokenizer" in lines[0]
    assert not out.exists() and not cache.exists()  # refused before reading anything


def test_a_scratch_tokenizer_is_trained_once_per_corpus_and_settings(
        tmp_path: Path, corpus_file: Path, monkeypatch) -> None:
    """tokenizers' WordPiece training is not deterministic (huggingface/tokenizers#1794), so a
    second run of one recipe from scratch must reuse the first run's vocabulary from the cache
    - same bytes, no second training - or the two runs train different models. Other settings
    train their own."""
    from further_pt import pretrain
    from further_pt.data import corpus, prepare

    def config(run: str, **extra: object):
        return pretrain.load(["recipe=demo", f"output_dir={tmp_path / run}",
                              f"data.train_files=[{corpus_file}]",
                              f"data.cache_dir={tmp_path / 'cache'}",
                              "model.from_scratch.vocab_size=300",
                              *(f"{k}={v}" for k, v in extra.items())])

    first = config("first")
    docs = prepare.read_corpus(first, corpus.resolve_sources(first.data.train_files))
    trained = prepare.scratch_tokenizer(first, docs, tmp_path / "first")
    assert 100 < len(trained) <= 300

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained a second time")

    monkeypatch.setattr(prepare, "train_wordpiece", no_training)
    second = config("second")
    docs = prepare.read_corpus(second, corpus.resolve_sources(second.data.train_files))
    again = prepare.scratch_tokenizer(second, docs, tmp_path / "second")
    assert again.get_vocab() == trained.get_vocab()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert ((tmp_path / "second" / "tokenizer" / name).read_bytes()
                == (tmp_path / "first" / "tokenizer" / name).read_bytes())
    other = config("other", **{"model.from_scratch.vocab_size": 250})
    with pytest.raises(AssertionError, match="trained a second time"):
        prepare.scratch_tokenizer(other, docs, tmp_path / "other")
