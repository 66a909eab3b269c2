"""Corpus: turn ``data.train_files`` into datasets of documents, and mix sources by weight.

Each entry of ``data.train_files`` is one *source* (a file, a folder, a glob, a
hub dataset ``hf:owner/name`` or a built-in corpus ``builtin:NAME``). A source
becomes a :class:`datasets.Dataset` with one column, ``text``, one row per
document. Datasets are Arrow files memory-mapped from disk, so a corpus larger
than RAM is read in a stream and never held in memory.

Document boundaries matter for NSP: in ``.txt`` files a document is one line
(``txt_documents: line``) or, in Google BERT's format, a block of lines separated
by blank lines with one sentence per line (``txt_documents: blank_line``).
Rows of ``.jsonl``/``.csv``/``.parquet`` files are documents, read from
``text_column``.

Bad input fails before any training with one line naming the file: an empty or
binary file (NUL bytes in its first 8 KB), a JSON line that does not parse (with
its line number), a missing column, a "document" over ``MAX_DOCUMENT_CHARS``
(a file that is not one document per line). A text value that is not a string
(a number in a JSON line, a numeric csv column) is a :class:`DataError` naming
the file and the line (row index for parquet); null and blank documents are
dropped. Bytes that are not valid UTF-8 are
replaced with U+FFFD, as Python's ``errors="replace"`` does: one stray byte in a
40 GB corpus should not stop a run.
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import datasets
from omegaconf import OmegaConf

from further_pt.config.recipes import ConfigError
from further_pt.config.validate import expand_paths
from further_pt.data.builtin import builtin_corpus
from further_pt.errors import DataError

logger = logging.getLogger("further_pt.data.corpus")

_BUILDERS = {
    ".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json",
    ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
MAX_DOCUMENT_CHARS = 1_000_000  # a longer "document" is a file without document boundaries


@dataclass(frozen=True)
class Source:
    """One entry of ``data.train_files``, expanded."""

    spec: str
    files: tuple[str, ...]
    hub: tuple[tuple[str, Any], ...] | None = None  # a mapping entry's keys (see HUB_KEYS)


#: The keys of a ``data.train_files`` entry given as a mapping: a dataset ``load_dataset``
#: reads (a Hub id, or a builder such as ``json`` with ``data_files``).
HUB_KEYS = ("hf", "config", "split", "revision", "data_files", "text_column")


def hub_source(entry: Mapping[str, Any], where: str) -> Source:
    """A mapping entry (``{hf: wikitext, config: wikitext-103-raw-v1, split: train}``)."""
    if OmegaConf.is_config(entry):
        entry = OmegaConf.to_container(entry, resolve=True)  # type: ignore[assignment]
    if isinstance(entry.get("data_files"), list):
        entry = {**entry, "data_files": tuple(entry["data_files"])}
    unknown = sorted(set(entry) - set(HUB_KEYS))
    if unknown:
        raise ConfigError(f"config key '{where}.{unknown[0]}': not a key of a dataset source "
                          f"(the keys are {', '.join(HUB_KEYS)})")
    name = entry.get("hf")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"config key '{where}.hf': a dataset source needs the dataset's name "
                          "(a Hub id, or a builder such as json with data_files)")
    keys = {"split": "train", **{k: v for k, v in entry.items() if v is not None}}
    shown = ", ".join(f"{k}={keys[k]}" for k in HUB_KEYS[1:] if k in keys and k != "data_files")
    spec = f"hf:{name}" + (f" ({shown})" if shown else "")
    return Source(spec=spec, files=(), hub=tuple(sorted(keys.items())))


def hub_split(spec: str) -> tuple[str, str | None, str]:
    """``hf:name[:config]:split`` (or ``hf:name``: its train split) -> (name, config, split).

    ``hf:glue:mrpc:train`` is GLUE's MRPC, ``hf:imdb:test`` imdb's test split. A split may
    carry a slice (``train[:10%]``), whose colon is not a separator.
    """
    head, bracket, rest = spec.removeprefix("hf:").partition("[")
    parts = head.split(":")
    if bracket:
        parts[-1] += f"[{rest}"
    if len(parts) > 3 or not all(parts):
        raise ConfigError(f"{spec}: a hub dataset is hf:NAME, hf:NAME:SPLIT or "
                          "hf:NAME:CONFIG:SPLIT (e.g. hf:glue:mrpc:train)")
    if len(parts) == 1:
        parts.append("train")
    return parts[0], parts[1] if len(parts) == 3 else None, parts[-1]


def load_dataset_source(source: Source, *, split_suffix: str = "", streaming: bool = False
                        ) -> tuple[Any, str | None]:
    """A dataset source (a mapping entry, or ``hf:NAME``) through ``load_dataset``, as a
    Dataset or (``streaming``) an IterableDataset; and its own text column, if it names one.

    A Hub id needs the network (or a warm hub cache); a builder with local ``data_files``
    (json, parquet, ...) does not, which is how the tests reach this path.
    """
    hub = dict(source.hub or {"hf": source.spec.removeprefix("hf:"), "split": "train"})
    files = hub.get("data_files")
    ds = datasets.load_dataset(hub["hf"], hub.get("config"), split=hub["split"] + split_suffix,
                               revision=hub.get("revision"), streaming=streaming,
                               data_files=list(files) if isinstance(files, tuple) else files)
    return ds, hub.get("text_column")


def builder_kwargs(builder: str, files: Sequence[str], txt_documents: str) -> dict[str, Any]:
    """How a builder reads these files: text by line or by blank-line block, tsv by tabs."""
    if builder == "text":
        return {"sample_by": "paragraph" if txt_documents == "blank_line" else "line"}
    if builder == "csv" and all(f.lower().split(".gz")[0].endswith(".tsv") for f in files):
        return {"delimiter": "\t"}
    return {}


def builder_for(path: str) -> str:
    """The `datasets` builder that reads a file, by its extension (compression suffix ignored)."""
    name = path.lower()
    for suffix in _COMPRESSION:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return _BUILDERS.get(os.path.splitext(name)[1], "text")


def open_bytes(path: str) -> IO[bytes]:
    """Open a file for reading bytes, decompressing .gz/.bz2/.xz."""
    for suffix, opener in _OPENERS.items():
        if path.lower().endswith(suffix):
            return opener(path, "rb")
    return open(path, "rb")


def check_file(path: str, where: str) -> None:
    """Reject a missing, empty or binary file, naming it."""
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: file {path} does not exist")
    if os.path.getsize(path) == 0:
        raise ConfigError(f"{where}: file {path} is empty")
    if builder_for(path) == "parquet" or path.lower().endswith(".zst"):
        return
    try:
        with open_bytes(path) as fh:
            head = fh.read(8192)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise ConfigError(f"{where}: file {path} cannot be read ({exc})") from None
    if b"\x00" in head:
        raise ConfigError(f"{where}: file {path} looks binary (NUL bytes in its first 8 KB), "
                          "not text")


def json_lines(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, object) of each non-blank line of a JSON-lines file, as pyarrow reads it.

    A line that does not parse raises ValueError ``"line N: reason"``.
    """
    with open_bytes(path) as fh:
        for number, raw in enumerate(fh, start=1):
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"line {number}: {exc}") from None
            yield number, obj


def first_bad_json_line(path: str) -> str | None:
    """``"line N: reason"`` for the first line of a JSON-lines file that does not parse."""
    try:
        for _ in json_lines(path):
            pass
    except ValueError as exc:
        return str(exc)
    return None


def first_non_text(path: str, column: str) -> tuple[int, object] | None:
    """(line number, value) of the first JSON line whose ``column`` is neither a string nor null."""
    with open_bytes(path) as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                row = json.loads(raw.decode("utf-8", errors="replace"))
            except ValueError:
                continue
            value = row.get(column) if isinstance(row, dict) else None
            if value is not None and not isinstance(value, str):
                return number, value
    return None


def _non_text_message(path_line: str, column: str, value: object) -> str:
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    name = type(value).__name__
    return (f"{path_line}: column {column!r} holds {'an' if name[0] in 'aeiou' else 'a'} {name}, "
            f"not a text: {shown}")


def load_files(builder: str, files: list[str], where: str, *, text_column: str | None = None,
               **kwargs: object) -> datasets.Dataset:
    """``datasets.load_dataset`` on local files, its errors turned into one line naming the file.

    A JSON file whose ``text_column`` holds a number can crash inside pyarrow; the
    file is then scanned with :mod:`json` for the line, a :class:`DataError`.
    """
    if builder in ("text", "json", "csv"):
        kwargs.setdefault("encoding_errors", "replace")
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    except Exception as exc:  # datasets wraps parser errors in several exception types
        if builder == "json":
            for path in files:
                bad = first_bad_json_line(path)
                if bad:
                    raise ConfigError(f"{where}: {path} {bad}") from None
            for path in files if text_column else ():
                hit = first_non_text(path, text_column)
                if hit:
                    raise DataError(_non_text_message(f"{path}:{hit[0]}", text_column,
                                                      hit[1])) from None
        cause = exc.__cause__ or exc
        raise ConfigError(f"{where}: {', '.join(files)[:200]} cannot be read "
                          f"({' '.join(str(cause).split())[:200]})") from None


def resolve_sources(train_files: Sequence[Any], key: str = "data.train_files") -> list[Source]:
    sources = []
    for i, spec in enumerate(train_files):
        if isinstance(spec, Mapping):
            sources.append(hub_source(spec, f"{key}[{i}]"))
            continue
        files = expand_paths(spec)
        if not files:
            raise ConfigError(f"config key '{key}[{i}]': no file matches {spec!r}")
        if not spec.startswith(("builtin:", "hf:")):
            for path in files:
                check_file(path, f"{key}[{i}]")
        sources.append(Source(spec=spec, files=tuple(files)))
    return sources


def default_cache_dir(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(datasets.config.HF_DATASETS_CACHE) / "further_pt"


def load_documents(
    source: Source,
    *,
    txt_documents: str,
    text_column: str,
    cache_dir: Path,
    max_documents: int | None = None,
) -> datasets.Dataset:
    """Read one source into a dataset with a single ``text`` column, one row per document."""
    if source.spec.startswith("builtin:"):
        path = builtin_corpus(source.spec.removeprefix("builtin:"), cache_dir)
        source = Source(spec=source.spec, files=(str(path),))
    if source.hub is not None or source.spec.startswith("hf:"):
        ds, column = load_dataset_source(
            source, split_suffix=f"[:{max_documents}]" if max_documents else "")
        parts = [_text_only(ds, column or text_column, source.spec)]
    else:
        by_builder: dict[str, list[str]] = {}
        for path in source.files:
            by_builder.setdefault(builder_for(path), []).append(path)
        parts = []
        for builder, files in sorted(by_builder.items()):
            kwargs = builder_kwargs(builder, files, txt_documents)
            column = text_column if builder != "text" else "text"
            ds = load_files(builder, files, source.spec, cache_dir=str(cache_dir / "datasets"),
                            text_column=column, **kwargs)
            parts.append(_text_only(ds, column, files[0], files=files, builder=builder))
    docs = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    _check_document_lengths(docs, source.spec)
    docs = docs.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]],
                       batched=True, desc=f"dropping empty documents of {source.spec}")
    if len(docs) == 0:
        raise ConfigError(f"data.train_files: {source.spec} holds no non-empty document")
    if max_documents is not None and len(docs) > max_documents:
        docs = docs.select(range(max_documents))
    return docs


def _check_document_lengths(docs: datasets.Dataset, where: str) -> None:
    """One vectorised pass over the Arrow column: no document may exceed MAX_DOCUMENT_CHARS."""
    import pyarrow.compute as pc

    lengths = pc.utf8_length(docs.data.column("text"))
    longest = pc.max(lengths).as_py() or 0
    if longest > MAX_DOCUMENT_CHARS:
        row = pc.index(lengths, longest).as_py()
        raise ConfigError(
            f"{where}: document {row + 1} (line {row + 1} of a one-document-per-line file) is "
            f"{longest:,} characters long; a document over {MAX_DOCUMENT_CHARS:,} characters "
            "means the file has no document boundaries: split it into lines, or use "
            "data.txt_documents=blank_line for blank-line separated documents")


def _text_only(ds: datasets.Dataset, column: str, where: str, *, files: Sequence[str] = (),
               builder: str = "") -> datasets.Dataset:
    """The text column alone, renamed ``text``; a value that is not a string is a DataError.

    Null and blank documents are not errors: load_documents drops them.
    """
    if column not in ds.column_names:
        raise ConfigError(
            f"{where}: no column {column!r} (columns: {', '.join(ds.column_names)}); "
            "set data.text_column"
        )
    import pyarrow as pa

    kind = ds.data.column(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        for path in files if builder == "json" else ():
            hit = first_non_text(path, column)
            if hit:
                raise DataError(_non_text_message(f"{path}:{hit[0]}", column, hit[1]))
        for row, value in enumerate(v for batch in ds.select_columns([column]).iter(1000)
                                    for v in batch[column]):
            if value is not None and not isinstance(value, str):
                place = f"{where} row index {row}" + (" (of the files read together)"
                                                      if len(files) > 1 else "")
                raise DataError(_non_text_message(place, column, value))
    ds = ds.select_columns([column])
    if column != "text":
        ds = ds.rename_column(column, "text")
    return ds


def mix(sources: list[datasets.Dataset], weights: Sequence[float] | None, seed: int
        ) -> datasets.Dataset:
    """Mix the instances of several sources.

    ``weights`` are the expected share of training instances drawn from each
    source (normalised to sum to 1). A source that runs out starts over, and the
    mixture ends once every source has been seen in full at least once, so a small
    in-domain corpus with weight 0.5 stays half of every batch however large the
    general corpus beside it is. ``None`` keeps every instance exactly once
    (shares proportional to source sizes).
    """
    if len(sources) == 1:
        return sources[0]
    if weights is None:
        return datasets.concatenate_datasets(sources)
    total = float(sum(weights))
    return datasets.interleave_datasets(
        sources, probabilities=[w / total for w in weights], seed=seed,
        stopping_strategy="all_exhausted",
    )


# --------------------------------------------------------------------------- built-in corpora


