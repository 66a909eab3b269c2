"""Labelled data: value checks that name file, line, column and value; stratified subsamples."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from further_pt.data.labelled import (
    encode_labels,
    label_names,
    load_labelled,
    read_labelled,
)
from further_pt.data.targets import describe_subsample, stratified_subsample
from further_pt.errors import ConfigError, DataError

TEXT, LABEL = ["text"], "label"


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _load(path: str, **kw):
    return load_labelled(path, columns=["text", "label"], text_columns=TEXT, label_column=LABEL,
                         cache_dir=str(Path(path).parent / "cache"), **kw)


GOOD = [{"text": "first text", "label": "a"}, {"text": "second text", "label": "b"}]


# --------------------------------------------------------------------------- stratified subsample


def _labels() -> list[int]:  # 4037 rows over 12 classes of unequal sizes
    sizes = [900, 700, 500, 450, 400, 300, 250, 200, 150, 100, 50, 37]
    return [c for c, k in enumerate(sizes) for _ in range(k)]


def test_subsample_is_stratified_and_covers_every_class() -> None:
    labels = _labels()
    n12 = stratified_subsample(labels, 12, seed=0, num_classes=12, where="train.jsonl")
    assert sorted(labels[r] for r in n12) == list(range(12))  # one each: the minimum binds
    for n in (40, 401):
        rows = stratified_subsample(labels, n, seed=0, num_classes=12, where="train.jsonl")
        assert len(rows) == n == len(set(rows)) and rows == sorted(rows)
        kept = Counter(labels[r] for r in rows)
        assert set(kept) == set(range(12))
        total = Counter(labels)
        for c in range(12):
            proportional = n * total[c] / len(labels)
            assert abs(kept[c] - proportional) < 1 or (kept[c] == 1 and proportional < 1)
    kept = Counter(labels[r] for r in stratified_subsample(labels, 40, 0, num_classes=12,
                                                           where="t"))
    assert [kept[c] for c in range(12)] == [9, 7, 5, 4, 4, 3, 2, 2, 1, 1, 1, 1]


def test_subsample_depends_only_on_the_seed() -> None:
    labels = _labels()
    a = stratified_subsample(labels, 40, seed=1, num_classes=12, where="t")
    assert a == stratified_subsample(list(labels), 40, seed=1, num_classes=12, where="t")
    b = stratified_subsample(labels, 40, seed=2, num_classes=12, where="t")
    assert a != b and len(set(a) & set(b)) < 20
    assert Counter(labels[r] for r in a) == Counter(labels[r] for r in b)
    assert stratified_subsample(labels, len(labels), 3, num_classes=12,
                                where="t") == list(range(len(labels)))


def test_subsample_errors_name_the_key_and_the_file() -> None:
    labels = _labels()
    with pytest.raises(ConfigError, match=r"'data.max_train_examples': 0 must be at least 1"):
        stratified_subsample(labels, 0, 0, num_classes=12, where="train.jsonl")
    with pytest.raises(ConfigError, match=r"11 is below the 12 classes of train.jsonl: every "
                                          r"class needs an example"):
        stratified_subsample(labels, 11, 0, num_classes=12, where="train.jsonl")
    with pytest.raises(ConfigError, match=r"4038 exceeds the 4037 rows of train.jsonl"):
        stratified_subsample(labels, 4038, 0, num_classes=12, where="train.jsonl")


def test_describe_subsample() -> None:
    line = describe_subsample([0, 0, 2, 1, 0], ["admin", "devel", "ops", "none"], 4037)
    assert line == "kept 5 of 4037 training examples: admin 3, devel 1, ops 1"


# --------------------------------------------------------------------------- bad values


def test_number_in_jsonl_text_column_names_line_and_column(tmp_path: Path) -> None:
    rows = [*GOOD, {"text": 5, "label": "a"}, {"text": "fine", "label": "b"}]
    for path in (_jsonl(tmp_path / "t.jsonl", rows), str(tmp_path / "t.jsonl.gz")):
        if path.endswith(".gz"):
            with gzip.open(path, "wt") as fh:
                fh.write("\n\n".join(json.dumps(r) for r in rows))  # blank lines count
        line = 3 if path.endswith(".jsonl") else 5
        with pytest.raises(DataError, match=rf"t.jsonl(.gz)?:{line}: column 'text' holds an "
                                            r"int, not a string: 5"):
            _load(path)
        # without roles (today's calls) the mixed column is still caught at read time
        with pytest.raises(DataError, match=rf":{line}: column 'text' holds a number where line"):
            read_labelled(path, columns=["text", "label"])


@pytest.mark.parametrize(("row", "message"), [
    ({"text": "x", "label": None}, "column 'label' is null: None"),
    ({"text": "x", "label": ""}, "column 'label' is empty: ''"),
    ({"text": "x", "label": 1.5}, "column 'label' holds a float, not a string or an integer"),
    ({"text": None, "label": "a"}, "column 'text' is null: None"),
    ({"text": "  \t", "label": "a"}, r"column 'text' is blank: '  \\t'"),
])
def test_bad_values_in_jsonl(tmp_path: Path, row: dict, message: str) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [*GOOD, row])
    with pytest.raises(DataError, match=rf"bad.jsonl:3: {message}"):
        _load(path)


def test_long_values_are_truncated(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "t.jsonl", [*GOOD, {"text": "x", "label": ["y" * 100]}])
    with pytest.raises(DataError) as info:
        _load(path)
    assert "t.jsonl:3: column 'label' holds a list" in str(info.value)
    shown = str(info.value).split("integer: ")[1].split("; rows with a list")[0]
    assert shown == "['" + "y" * 35 + "..." and len(shown) == 40


def test_label_checks_without_roles(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "t.jsonl", [*GOOD, {"text": "x", "label": None}])
    ds = read_labelled(path, columns=["text", "label"])  # today's call: labels checked later
    with pytest.raises(DataError, match=r"t.jsonl:3: column 'label' is null"):
        label_names(ds, "label", path)
    with pytest.raises(DataError, match=r"t.jsonl:3: column 'label' is null"):
        encode_labels(ds, "label", ["a", "b"], path)


def test_csv_empty_cells_and_na_strings(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text('text,label\n"two\nlines",1\nNA,2\nthird,\n')
    with pytest.raises(DataError, match=r"t.csv:5: column 'label' is empty: ''"):
        _load(str(path))
    ds, dropped = _load(str(path), invalid_rows="skip")
    assert dropped == 1 and ds["text"] == ["two\nlines", "NA"] and ds["label"] == ["1", "2"]
    tsv = tmp_path / "t.tsv"
    tsv.write_text("text\tlabel\nhello\ta\n \tb\n")
    with pytest.raises(DataError, match=r"t.tsv:3: column 'text' is blank"):
        _load(str(tsv))


def test_parquet_names_the_row_index(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": ["x", None, "y"]}), path)
    with pytest.raises(DataError, match=r"t.parquet row index 1: column 'label' is null"):
        _load(path)
    pq.write_table(pa.table({"text": [1, 2], "label": ["x", "y"]}), path)
    with pytest.raises(DataError, match=r"t.parquet row index 0: column 'text' holds an int"):
        _load(path)


def test_skip_mode_drops_and_counts(tmp_path: Path) -> None:
    rows = [*GOOD, {"text": 5, "label": "a"}, {"text": "", "label": "b"},
            {"text": "ok", "label": None}, {"text": "kept", "label": "b"}]
    ds, dropped = _load(_jsonl(tmp_path / "t.jsonl", rows), invalid_rows="skip")
    assert dropped == 3
    assert ds["text"] == ["first text", "second text", "kept"]
    assert ds["label"] == ["a", "b", "b"]
    ds, dropped = _load(_jsonl(tmp_path / "u.jsonl", [*GOOD, {"text": "x", "label": ""}]),
                        invalid_rows="skip")
    assert dropped == 1 and len(ds) == 2
    ds, dropped = _load(_jsonl(tmp_path / "v.jsonl", GOOD), invalid_rows="skip")
    assert dropped == 0 and len(ds) == 2
    with pytest.raises(DataError, match=r"every row is invalid"):
        _load(_jsonl(tmp_path / "w.jsonl", [{"text": "", "label": "a"}]), invalid_rows="skip")
    with pytest.raises(ConfigError, match=r"'data.invalid_rows': 'drop' is not one of"):
        _load(_jsonl(tmp_path / "x.jsonl", GOOD), invalid_rows="drop")


def test_int_and_bool_labels_are_classes(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}])
    ds, _ = _load(path)
    assert label_names(ds, "label", path) == ["0", "1"]
