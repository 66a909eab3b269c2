"""Classification data: labelled files -> token ids, with the long-text strategies of Sun et al.

Files are ``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet`` (optionally compressed)
or ``hf:owner/name[[:config]:split]``; ``text_column`` (and ``text_pair_column`` for
pairs) hold the text, ``label_column`` the label. Class ids are those users know: a
hub dataset's ``ClassLabel`` names in their order, integer labels in numeric order
(labels 0..n-1 are ids 0..n-1), other labels sorted; a label in evaluation data
that training never saw is an error naming the file, the row and the label.

Data quality is checked as a class, not case by case: every text must be a
non-blank string and every label a non-blank string or an integer (``label_role``
"label_set": a list of them; "target": a finite number; :mod:`.targets`); a bad value
is a :class:`DataError` naming file, line (row index for parquet), column and
value, or, with ``invalid_rows="skip"``, a dropped and counted row. The low-label
regime (:func:`further_pt.data.targets.stratified_subsample`) keeps a seeded, stratified
sample.

Long texts (Sun et al. 2019, sec. 5.3.1, Table 2), ``max_seq_length`` counting
``[CLS]`` and ``[SEP]``:

- ``head``: the first ``max_seq_length - 2`` tokens;
- ``tail``: the last ``max_seq_length - 2`` tokens;
- ``head_tail``: the first ``head_tokens`` and the last
  ``max_seq_length - 2 - head_tokens`` (the paper's best: 128 + 382 of 510);
- ``segments``: the whole text cut into up to ``max_segments`` consecutive
  pieces of ``max_seq_length - 2`` tokens, each ``[CLS] piece [SEP]``, for the
  hierarchical classifier (see heads.py).

Text pairs are truncated longest-first by the tokenizer.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets

from further_pt.data import targets
from further_pt.data.corpus import (
    builder_for,
    check_file,
    hub_split,
    json_lines,
    load_files,
    open_bytes,
)
from further_pt.errors import ConfigError, DataError

logger = logging.getLogger("further_pt.data.labelled")
STRATEGIES = ("head", "tail", "head_tail", "segments")


def read_labelled(path: str, *, columns: Sequence[str] | None, cache_dir: str | None = None,
                  text_columns: Sequence[str] = (), label_column: str | None = None,
                  invalid_rows: str = "error", label_role: str = "label") -> datasets.Dataset:
    """Read a labelled file (or ``hf:name[:split]``) keeping ``columns``; name what is missing.

    Naming ``text_columns``/``label_column`` checks their values (see :func:`load_labelled`,
    which also returns how many rows ``invalid_rows="skip"`` dropped).
    """
    return load_labelled(path, columns=columns, cache_dir=cache_dir, text_columns=text_columns,
                         label_column=label_column, invalid_rows=invalid_rows,
                         label_role=label_role)[0]


def read_predict_input(path: str, text_columns: Sequence[str]) -> datasets.Dataset:
    """The rows ``further-pt predict`` classifies, every column kept, texts checked as training's.

    A null text would be predicted as "" and a number would crash the tokenizer, so each
    must be a non-blank string (there is no skipping: every row gets a prediction); a file
    without rows is refused rather than answered with an empty output. Errors name the
    file, line, column and value (:class:`DataError`) or the file (:class:`ConfigError`).
    """
    if not path.startswith("hf:"):
        check_file(path, "predict input")
    return load_labelled(path, columns=None, text_columns=text_columns, skip_hint=False)[0]


def load_labelled(path: str, *, columns: Sequence[str] | None, cache_dir: str | None = None,
                  text_columns: Sequence[str] = (), label_column: str | None = None,
                  invalid_rows: str = "error", skip_hint: bool = True, label_role: str = "label"
                  ) -> tuple[datasets.Dataset, int]:
    """Read and check a labelled file: (the rows kept, the number of invalid rows dropped).

    Texts must be non-blank strings, labels non-blank strings or integers (see
    :func:`value_problem`). A bad row is a :class:`DataError` naming file, line (row index
    for parquet and hub data), column and value; ``invalid_rows="skip"`` drops and counts
    bad rows instead (logged once). JSON lines are scanned with :mod:`json` before
    ``datasets`` reads them: datasets 5 silently JSON-encodes a column whose values mix
    types (a number among texts), so mixed columns must never reach it. ``skip_hint=False``
    leaves the ``data.invalid_rows=skip`` hint out of errors (for a reader without that key).
    """
    hint = _SKIP_HINT if skip_hint else ""
    if invalid_rows not in INVALID_ROWS:
        raise ConfigError(f"config key 'data.invalid_rows': {invalid_rows!r} is not one of "
                          f"{', '.join(INVALID_ROWS)}")
    roles = {c: "text" for c in text_columns} | ({label_column: label_role} if label_column
                                                  else {})
    checked = list(dict.fromkeys([*(columns or ()), *roles]))
    bad: dict[int, _Bad] = {}
    scanned = prefiltered = False
    if path.startswith("hf:"):
        name, config, split = hub_split(path)
        ds = datasets.load_dataset(name, config, split=split)
    else:
        builder = builder_for(path)
        if builder == "text":
            raise ConfigError(f"{path}: labelled data must be .jsonl, .csv, .tsv or .parquet")
        check_file(path, "labelled data")
        mixed = False
        if builder == "json" and checked and _is_json_lines(path):
            bad, mixed, rows = _scan_json_lines(path, checked, roles)
            scanned = True
            if not rows:  # blank lines only: datasets would say 'corresponds to no data'
                raise ConfigError(f"{path}: holds no rows")
            if bad and invalid_rows == "error":
                raise DataError(_describe(path, bad) + hint)
        kwargs: dict[str, Any] = {"delimiter": "\t"} if ".tsv" in path.lower() else {}
        if builder == "csv":  # "NA", "null", "None" are texts and labels, not missing values
            kwargs["keep_default_na"] = False
        if mixed:  # skip mode: datasets would JSON-encode the mixed column, so build it here
            if len(bad) == rows:
                raise DataError(f"{path}: every row is invalid; first: {_describe(path, bad)}")
            prefiltered = True
            ds = datasets.Dataset.from_list([{c: obj.get(c) for c in checked} for i, (_, obj)
                                             in enumerate(_json_rows(path)) if i not in bad])
        else:
            ds = load_files(builder, [path], "labelled data", cache_dir=cache_dir, **kwargs)
    if len(ds) == 0:
        raise ConfigError(f"{path}: holds no rows")
    for column in checked:
        if column not in ds.column_names:
            raise ConfigError(f"{path}: no column {column!r} (columns: "
                              f"{', '.join(ds.column_names)})")
    if roles and not scanned:
        bad = _find_bad_rows(ds, roles, stop_at_first=invalid_rows == "error")
        if bad and invalid_rows == "error":
            raise DataError(_describe(path, bad) + hint)
    if columns is not None:
        ds = ds.select_columns(list(columns))
    if bad:
        logger.warning("%s: dropped %d invalid rows (data.invalid_rows=skip); first: %s", path,
                       len(bad), _describe(path, bad))
        if not prefiltered and len(bad) == len(ds):
            raise DataError(f"{path}: every row is invalid; first: {_describe(path, bad)}")
        if not prefiltered:
            ds = ds.select([i for i in range(len(ds)) if i not in bad])
    return ds, len(bad)


def value_problem(value: Any, role: str) -> str | None:
    """Why ``value`` cannot be a text or a label, or ``None`` when it can.

    A text is a string with a non-space character. A label is a string with a
    non-space character, an int or a bool (class names are ``str(value)``); null,
    "" and floats (NaN from a blank csv cell) are refused: none may become a class. Roles
    "label_set" and "target" are the other task kinds' (:func:`targets.value_problem`).
    """
    if value is None:
        return "is null"
    if role in ("label_set", "target"):
        return targets.value_problem(value, role)
    if isinstance(value, str):
        return None if value.strip() else ("is empty" if not value else "is blank")
    if role == "label" and isinstance(value, int):  # bool is an int
        return None
    wanted = "a string" if role == "text" else "a string or an integer"
    name = type(value).__name__
    return f"holds {'an' if name[0] in 'aeiou' else 'a'} {name}, not {wanted}"


def label_names(train: datasets.Dataset, label_column: str, path: str) -> list[str]:
    """The class names of the training data in id order: a ``ClassLabel``'s names; integers
    (or digit strings) numerically, so 0..11 are ids 0..11 (not 0, 1, 10, 11, 2); else sorted.
    A null or blank label is a DataError."""
    _raise_bad_labels(train, label_column, path)
    feature = train.features.get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    else:
        values = {str(v) for v in train[label_column]}
        numeric = all(v.lstrip("-").isdecimal() for v in values)
        names = sorted(values, key=(lambda v: (int(v), v)) if numeric else None)
    if len(names) < 2:
        raise ConfigError(f"{path}: the training data has a single class ({names[0]!r}); "
                          "classification needs at least two")
    return names


def encode_labels(ds: datasets.Dataset, label_column: str, names: list[str], path: str
                  ) -> list[int]:
    """Label ids by ``names`` (a ``ClassLabel``'s ids read as its names); a label training
    never saw, or a ClassLabel's -1 (no label), is an error naming the row."""
    _raise_bad_labels(ds, label_column, path)
    index = {name: i for i, name in enumerate(names)}
    feature = ds.features.get(label_column)
    ids = []
    for row, value in enumerate(ds[label_column]):
        if isinstance(feature, datasets.ClassLabel):
            if value < 0:
                raise DataError(f"{path}: row {row + 1} has no label ({value}: a ClassLabel's "
                                "missing value, as in a test split)")
            value = feature.int2str(value)
        if str(value) not in index:
            raise ConfigError(f"{path}: row {row + 1} has label {str(value)!r}, which the "
                              f"training data does not have (labels: {', '.join(names)})")
        ids.append(index[str(value)])
    return ids


# --------------------------------------------------------------------------- row checks

INVALID_ROWS = ("error", "skip")
_SKIP_HINT = " (data.invalid_rows=skip drops such rows)"
_JSON_SUFFIXES = tuple(f".{e}{c}" for e in ("jsonl", "json") for c in ("", ".gz", ".bz2", ".xz"))


@dataclass(frozen=True)
class _Bad:
    """One unusable value; ``line`` is known when a JSON-lines scan found it; ``advice`` says
    which ``task.kind`` the value would fit."""

    column: str
    value: Any
    problem: str
    line: int | None = None
    advice: str = ""


def _describe(path: str, bad: dict[int, _Bad]) -> str:
    """The message of the first bad row (its position looked up only now: it may cost a scan)."""
    row, first = next(iter(bad.items()))
    where = f"{path}:{first.line}" if first.line is not None else _position(path, row)
    advice = f"; {first.advice}" if first.advice else ""
    return f"{where}: column {first.column!r} {first.problem}: {_show(first.value)}{advice}"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_rows(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line, as pyarrow reads them (blank lines skipped)."""
    try:
        for number, obj in json_lines(path):
            yield number, obj if isinstance(obj, dict) else {}
    except ValueError as exc:
        raise ConfigError(f"labelled data: {path} {exc}") from None


def _is_json_lines(path: str) -> bool:
    """A JSON-lines file we can scan (not a JSON array, not .zst)."""
    if not path.lower().endswith(_JSON_SUFFIXES):
        return False
    with open_bytes(path) as fh:
        return not fh.read(4096).lstrip().startswith(b"[")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    return "number" if isinstance(value, int | float) else type(value).__name__


def _scan_json_lines(path: str, columns: Sequence[str], roles: dict[str, str]
                     ) -> tuple[dict[int, _Bad], bool, int]:
    """Check every row of a JSON-lines file: (bad rows, whether types mix, rows).

    A column whose non-null values are of several JSON types is a bad row at the
    first deviating line, whatever its role.
    """
    bad: dict[int, _Bad] = {}
    first: dict[str, tuple[str, int]] = {}
    keys: dict[str, None] = {}  # every field name met, in order: for the "no column" error
    mixed, row = False, -1
    for row, (number, obj) in enumerate(_json_rows(path)):
        keys.update(dict.fromkeys(obj))
        for column in columns:
            value = obj.get(column)
            problem = value_problem(value, roles[column]) if column in roles else None
            if problem and column not in obj:
                problem = "is missing from the line"
            if value is not None:
                kind = _kind(value)
                seen, line = first.setdefault(column, (kind, number))
                if kind != seen:
                    mixed = True
                    problem = problem or f"holds a {kind} where line {line} holds a {seen}"
            if problem and row not in bad:
                bad[row] = _Bad(column, value, problem, number,
                                targets.advice(value, roles.get(column, "")))
    absent = [c for c in columns if c not in keys]
    if absent and row >= 0:  # a wrong column name, not bad rows: say so before any row
        raise ConfigError(f"{path}: no column {absent[0]!r} (columns: {', '.join(keys)})")
    return bad, mixed, row + 1


def _find_bad_rows(ds: datasets.Dataset, roles: dict[str, str], *, stop_at_first: bool
                   ) -> dict[int, _Bad]:
    """{row: message} of rows whose text/label values are unusable (Arrow-vectorised for text)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    bad: dict[int, _Bad] = {}
    for column, role in roles.items():
        data = ds.data.column(column)
        if role == "text" and data.type in (pa.string(), pa.large_string()):
            empty = pc.or_kleene(pc.is_null(data), pc.equal(pc.utf8_trim_whitespace(data), ""))
            rows = pc.indices_nonzero(pc.fill_null(empty, True)).to_pylist()
            values = data.take(rows).to_pylist() if rows else []
        else:
            rows, values = [], []
            for i, value in enumerate(ds[column]):
                if value_problem(value, role):
                    rows.append(i)
                    values.append(value)
                    if stop_at_first:
                        break
        for row, value in zip(rows, values, strict=True):
            if row not in bad:
                bad[row] = _Bad(column, value, value_problem(value, role) or "",
                                advice=targets.advice(value, role))
            if stop_at_first:
                break
    return dict(sorted(bad.items()))


def _raise_bad_labels(ds: datasets.Dataset, label_column: str, path: str,
                      role: str = "label") -> None:
    bad = _find_bad_rows(ds, {label_column: role}, stop_at_first=True)
    if bad:
        raise DataError(_describe(path, bad) + _SKIP_HINT)


def check_labels(ds: datasets.Dataset, label_column: str, path: str, role: str) -> None:
    """A DataError naming the first row whose label cannot be a ``role`` (see value_problem)."""
    _raise_bad_labels(ds, label_column, path, role)


def _position(path: str, row: int) -> str:
    """``file:line`` of data row ``row`` (0-based) of a text file, else ``file row index N``."""
    if not path.startswith("hf:") and builder_for(path) == "json" and _is_json_lines(path):
        for i, (number, _) in enumerate(_json_rows(path)):
            if i == row:
                return f"{path}:{number}"
    if not path.startswith("hf:") and builder_for(path) == "csv" and os.path.isfile(path):
        delimiter = "\t" if ".tsv" in path.lower() else ","
        with io.TextIOWrapper(open_bytes(path), encoding="utf-8", errors="replace",
                              newline="") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            start, records = 1, -1  # the header is record -1
            for record in reader:
                if record:
                    if records == row:
                        return f"{path}:{start}"
                    records += 1
                start = reader.line_num + 1
    return f"{path} row index {row}"


# --------------------------------------------------------------------------- low-label regime
