"""Reading sources and mixing them by weight."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import datasets
import pytest

from further_pt.config.recipes import ConfigError
from further_pt.data.corpus import builder_for, load_documents, mix, resolve_sources


def _load(tmp_path: Path, spec: str, **kw) -> datasets.Dataset:
    (source,) = resolve_sources([spec])
    args = dict(txt_documents="line", text_column="text", cache_dir=tmp_path / "cache")
    args.update(kw)
    return load_documents(source, **args)


def test_formats_and_document_boundaries(tmp_path: Path) -> None:
    (tmp_path / "lines.txt").write_text("doc one. still one.\n\ndoc two.\n")
    with gzip.open(tmp_path / "bert.txt.gz", "wt") as fh:
        fh.write("s1 of d1.\ns2 of d1.\n\ns1 of d2.\n")
    (tmp_path / "rows.jsonl").write_text(
        "\n".join(json.dumps({"body": t, "label": 1}) for t in ["a b", "c d", "e f"]) + "\n")
    assert _load(tmp_path, str(tmp_path / "lines.txt"))["text"] == ["doc one. still one.",
                                                                    "doc two."]
    bert = _load(tmp_path, str(tmp_path / "bert.txt.gz"), txt_documents="blank_line")["text"]
    assert [t.strip() for t in bert] == ["s1 of d1.\ns2 of d1.", "s1 of d2."]
    assert _load(tmp_path, str(tmp_path / "rows.jsonl"), text_column="body")["text"] == [
        "a b", "c d", "e f"]
    assert builder_for("x.CSV.gz") == "csv" and builder_for("x.parquet") == "parquet"


def test_missing_column_and_empty_file_are_named(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"rows.jsonl: no column 'text' \(columns: body\)"):
        _load(tmp_path, str(tmp_path / "rows.jsonl"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConfigError, match=r"empty.txt is empty"):
        resolve_sources([str(tmp_path / "empty.txt")])


def test_directory_source_reads_every_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("first.\n")
    (tmp_path / "d" / "b.txt").write_text("second.\nthird.\n")
    assert sorted(_load(tmp_path, str(tmp_path / "d"))["text"]) == ["first.", "second.",
                                                                    "third."]


def test_weighted_mixing_keeps_a_small_source_at_its_share() -> None:
    small = datasets.Dataset.from_dict({"src": ["small"] * 100})
    large = datasets.Dataset.from_dict({"src": ["large"] * 20000})
    mixed = mix([small, large], [1.0, 1.0], seed=0)
    share = mixed["src"].count("small") / len(mixed)
    assert abs(share - 0.5) < 0.02
    assert mixed["src"].count("large") >= 20000  # every instance of the large source seen
    mixed = mix([small, large], [1.0, 3.0], seed=0)
    assert abs(mixed["src"].count("small") / len(mixed) - 0.25) < 0.02


def test_unweighted_mixing_is_concatenation() -> None:
    a = datasets.Dataset.from_dict({"src": ["a"] * 10})
    b = datasets.Dataset.from_dict({"src": ["b"] * 30})
    assert mix([a, b], None, seed=0)["src"] == ["a"] * 10 + ["b"] * 30


def test_a_text_that_is_not_a_string_is_a_data_error(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from further_pt.errors import DataError

    rows = [{"body": "a b"}, {"body": None}, {"body": "  "}, {"body": 7}, {"body": "c d"}]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"mixed.jsonl:4: column 'body' holds an int, not a "
                                        r"text: 7"):
        _load(tmp_path, str(tmp_path / "mixed.jsonl"), text_column="body")
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "nums.parquet")
    with pytest.raises(DataError, match=r"nums.parquet row index 0: column 'text' holds an int"):
        _load(tmp_path, str(tmp_path / "nums.parquet"))
    # null and blank documents are still dropped, not errors
    (tmp_path / "gaps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    assert _load(tmp_path, str(tmp_path / "gaps.jsonl"), text_column="body")["text"] == ["a b"]


def test_a_pyarrow_crash_on_a_number_becomes_a_data_error(tmp_path: Path, monkeypatch) -> None:
    import pyarrow as pa

    from further_pt.data.corpus import load_files
    from further_pt.errors import DataError

    path = tmp_path / "t.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write('{"text": "a"}\n\n{"text": 3.5}\n')

    def crash(*args, **kwargs):
        raise pa.ArrowInvalid("JSON parse error: Column(/text) changed from string to number")

    monkeypatch.setattr(datasets, "load_dataset", crash)
    with pytest.raises(DataError, match=r"t.jsonl.gz:3: column 'text' holds a float, not a text"):
        load_files("json", [str(path)], "data.train_files[0]", text_column="text")


def test_a_dataset_mapping_is_read_through_load_dataset(tmp_path, tiny_model_dir) -> None:
    """`{hf: NAME, config:, split:, revision:, data_files:, text_column:}` beside path strings:
    a local json file through the same load_dataset call a Hub id takes (offline)."""
    from further_pt import pretrain
    from further_pt.data import corpus, prepare

    rows = [{"body": f"document number {i} about engines and brakes", "id": i} for i in range(50)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = pretrain.load(["recipe=demo", "model.from_scratch=null",
                         f"model.name_or_path={tiny_model_dir}", "data.max_documents=20",
                         f"data.cache_dir={tmp_path / 'cache'}", "data.max_seq_length=64",
                         f"data.train_files=[{{hf: json, data_files: [{path}], "
                         "text_column: body}]"])
    sources = corpus.resolve_sources(cfg.data.train_files)
    assert sources[0].spec == "hf:json (split=train, text_column=body)"
    docs = prepare.read_corpus(cfg, sources)
    assert docs[0]["text"] == [r["body"] for r in rows[:20]]  # max_documents: a split slice


@pytest.mark.parametrize(("entry", "message"), [
    ({"hf": "json", "files": ["x.jsonl"]}, "'data.train_files[0].files': not a key of a "
                                           "dataset source (the keys are hf, config, split"),
    ({"config": "en"}, "'data.train_files[0].hf': a dataset source needs the dataset's name")])
def test_a_bad_dataset_mapping_names_its_key(entry, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_sources([entry])
