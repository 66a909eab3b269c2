"""Curated task-adaptive pretraining data: the corpus documents nearest to the task's texts.

Gururangan et al. (2020, sec. 5, "kNN-TAPT"): from a large in-domain corpus, take the
``k`` documents most similar to each task text and further-pretrain on them. Similarity
is the cosine of TF-IDF vectors (default: words, English stop words dropped, sublinear
tf, smoothed idf over the corpus, 2**20 hashed features) or of an encoder's mean-pooled,
L2-normalised embeddings (``method=embedding encoder=DIR``).

The corpus is streamed in chunks and only a running top-``k`` per task text is kept:
memory is O(chunk + task texts x k). TF-IDF reads the corpus three times (document
frequencies; scores; writing), embeddings twice. A document picked by several task texts
is written once, exact copies are one document, and a task text found verbatim in the
corpus is never picked (``include_task=true`` writes the task's own texts first).
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import importlib.util
import io
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from further_pt.config.validate import expand_paths
from further_pt.data.corpus import (
    MAX_DOCUMENT_CHARS,
    builder_for,
    check_file,
    json_lines,
    open_bytes,
)
from further_pt.errors import ConfigError, DataError

logger = logging.getLogger("further_pt.data.selection")
REQUIRED = "(required)"
N_FEATURES = 2**20
BLOCK_ELEMENTS = 2**24  # floats in one dense block of scores or queries (64 MiB)


def _key(default: Any, meaning: str) -> Any:
    return field(default=default, metadata={"meaning": meaning})


@dataclass(frozen=True)
class Options:
    """Every key of `further-pt select` with its default and meaning: the one place they live."""

    corpus: tuple[str, ...] = _key(REQUIRED, "[FILES]: the corpus to pick from (files, globs)")
    task: str = _key(REQUIRED, "FILE: the task's texts (.jsonl/.csv/.parquet; .txt: one a line)")
    output: str = _key(REQUIRED, "FILE.txt or FILE.txt.gz: the picked documents, one a line")
    k: int = _key(50, "nearest documents per task text (Gururangan et al.: 50, 150, 500)")
    method: str = _key("tfidf", "tfidf (TF-IDF cosine) or embedding (mean-pooled encoder)")
    encoder: str | None = _key(None, "MODEL_DIR or hub id: the encoder of method=embedding")
    text_column: str = _key("text", "text column of the corpus's .jsonl/.csv/.parquet files")
    task_text_column: str = _key("text", "text column of the task file")
    include_task: bool = _key(False, "true: write the task's own texts too, first")
    chunk_size: int = _key(20000, "corpus documents scored at once (memory: O(chunk + task x k))")
    batch_size: int = _key(64, "method=embedding: texts per forward pass")
    max_seq_length: int = _key(128, "method=embedding: tokens per text (longer ones are cut)")


KEYS = {f.name: (f.default, f.metadata["meaning"]) for f in fields(Options)}
USAGE = "further-pt select corpus=[FILES] task=FILE output=FILE.txt.gz [key=value ...]"
HELP = (f"usage: {USAGE}\n\nPicks the k corpus documents nearest to each task text (kNN-TAPT,"
        " Gururangan et al. 2020)\nand writes them as a pretraining corpus, with a report beside "
        "it (NAME.select.json).\n\n  key              default     meaning\n" + "".join(
            f"  {key:17s}{str(d).lower() if d != REQUIRED else d:12s}{meaning}\n"
            for key, (d, meaning) in KEYS.items()))


def parse(args: Sequence[str]) -> Options:
    """``key=value`` arguments -> Options; a one-line ConfigError for anything wrong."""
    given = dict(arg.partition("=")[::2] for arg in args)
    for arg, key in ((a, a.partition("=")[0]) for a in args):
        if "=" not in arg or key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            problem = "is not key=value" if "=" not in arg else "is an unknown key" + (
                f" (did you mean {close[0]!r}?)" if close else "")
            raise ConfigError(f"select: {key!r} {problem}; see further-pt select --help")
    values: dict[str, Any] = {}
    for key, (default, _) in KEYS.items():
        value = raw = given.get(key, default)
        if raw == REQUIRED:
            raise ConfigError(f"select: {key}=... is required; usage: {USAGE}")
        if key in given and key == "corpus":
            items = raw[1:-1].split(",") if raw.startswith("[") and raw.endswith("]") else [raw]
            value = tuple(i.strip() for i in items if i.strip())
        elif key in given and isinstance(default, bool):
            if raw.lower() not in ("true", "false"):
                raise ConfigError(f"select: {key} must be true or false, got {raw!r}")
            value = raw.lower() == "true"
        elif key in given and isinstance(default, int):
            if not raw.strip().isdigit() or int(raw) <= 0:
                raise ConfigError(f"select: {key} must be a whole number > 0, got {raw!r}")
            value = int(raw)
        values[key] = None if key == "encoder" and raw in ("", "null", "none") else value
    opts = Options(**values)
    if opts.method not in ("tfidf", "embedding"):
        raise ConfigError(f"select: method must be tfidf or embedding, got {opts.method!r}")
    if not opts.corpus:
        raise ConfigError("select: corpus=[] names no file: the corpus is empty")
    if not opts.output.lower().endswith((".txt", ".txt.gz")):
        raise ConfigError(f"select: output {opts.output} must end .txt or .txt.gz (one document "
                          "a line, as the pretraining recipes read it)")
    if (opts.method == "embedding") != bool(opts.encoder):
        raise ConfigError("select: method=embedding and encoder=MODEL_DIR go together")
    if opts.method == "tfidf" and importlib.util.find_spec("sklearn") is None:
        raise ConfigError("select: method=tfidf needs scikit-learn, which is not installed: "
                          "pip install further-pt[linear]")
    return opts


def corpus_files(specs: Sequence[str]) -> list[str]:
    files: list[str] = []
    for i, spec in enumerate(specs):
        found = [] if spec.startswith(("hf:", "builtin:")) else expand_paths(spec)
        if not found or any(path.lower().endswith(".zst") for path in found):
            raise ConfigError(f"select: corpus[{i}]: no local file matches {spec!r} (nor .zst)")
        for path in found:
            check_file(path, f"select: corpus[{i}]")
        files += found
    return files


def _records(path: str, column: str) -> Iterator[tuple[str, Any]]:
    """(where, value) of each record of one corpus file, streamed; .txt: a document a line."""
    builder = builder_for(path)
    if builder == "text":
        with io.TextIOWrapper(open_bytes(path), encoding="utf-8", errors="replace") as fh:
            yield from ((f"{path}:{n}", line) for n, line in enumerate(fh, 1))
        return
    if builder == "json":
        rows: Iterator[tuple[str, Any]] = ((f"{path}:{n}", obj if isinstance(obj, dict) else {})
                                           for n, obj in json_lines(path))
    else:  # csv, tsv, parquet: streamed by datasets, no cache written
        kwargs = {"delimiter": "\t"} if ".tsv" in path.lower() else {}
        stream = datasets.load_dataset(builder, data_files=[path], split="train", streaming=True,
                                       **kwargs)
        rows = ((f"{path} row index {n}", row) for n, row in enumerate(stream))
    for i, (where, row) in enumerate(rows):
        if i == 0 and column not in row:
            raise ConfigError(f"select: {path}: no column {column!r} (columns: "
                              f"{', '.join(row)}); set text_column=")
        yield where, row.get(column)


def documents(files: Sequence[str], opts: Options) -> Iterator[str]:
    """The corpus's non-empty documents, flattened to one line each, in file order."""
    for path in files:
        for where, value in _records(path, opts.text_column):
            if value is not None and not isinstance(value, str):
                raise DataError(f"{where}: column {opts.text_column!r} holds a "
                                f"{type(value).__name__}, not a text: {str(value)[:40]!r}")
            if value and len(value) > MAX_DOCUMENT_CHARS:
                raise ConfigError(f"{where}: a document of {len(value):,} characters (over "
                                  f"{MAX_DOCUMENT_CHARS:,}): no document boundaries?")
            if value and (text := " ".join(value.split())):  # one line; runs of spaces: one
                yield text


def chunks(files: Sequence[str], opts: Options) -> Iterator[list[str]]:
    docs = documents(files, opts)
    return iter(lambda: list(itertools.islice(docs, opts.chunk_size)), [])


def read_task(path: str, column: str) -> list[str]:
    """The task's distinct texts, flattened, in file order."""
    check_file(path, "select: task")
    if builder_for(path) == "text":
        with io.TextIOWrapper(open_bytes(path), encoding="utf-8", errors="replace") as fh:
            texts = list(fh)
    else:
        from further_pt.data.labelled import load_labelled

        quiet = datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()  # a small file: no "Generating train split" bar
        try:
            texts = load_labelled(path, columns=[column], text_columns=[column],
                                  skip_hint=False)[0][column]
        finally:
            (datasets.disable_progress_bars if quiet else datasets.enable_progress_bars)()
    unique = list(dict.fromkeys(t for t in (" ".join(t.split()) for t in texts) if t))
    if not unique:
        raise DataError(f"select: task {path} holds no text")
    return unique


def digests(texts: Sequence[str]) -> np.ndarray:
    """A 64-bit digest of each text (blake2b: the same in every process and run)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(),
                                       "little", signed=True) for t in texts), np.int64, len(texts))


class TfIdf:
    """Cosine of TF-IDF vectors; only the task texts' terms take part in the products."""

    def __init__(self, opts: Options, task: list[str]) -> None:
        from sklearn.feature_extraction.text import HashingVectorizer

        self.vectorizer = HashingVectorizer(n_features=N_FEATURES, alternate_sign=False,
                                            norm=None, stop_words="english", dtype=np.float32)
        self.task, self.dense, self.width = task, {}, 0

    def fit(self, corpus: Iterator[list[str]]) -> None:
        """Pass 1: the corpus's document frequencies -> idf; the task's vectors."""
        df, n = np.zeros(N_FEATURES, np.int64), 0
        for chunk in corpus:
            df += np.bincount(self.vectorizer.transform(chunk).indices, minlength=N_FEATURES)
            n += len(chunk)
            logger.info("pass 1 (document frequencies): %s documents", f"{n:,}")
        self.idf = (np.log((1 + n) / (1 + df)) + 1).astype(np.float32)
        queries = self._weigh(self.vectorizer.transform(self.task))
        self.terms = np.intersect1d(queries.indices, np.flatnonzero(df))  # sorted, unique
        self.width = len(self.terms)
        self.queries = queries[:, self.terms]  # only the task's terms add to a dot product
        self.cache = self.width * len(self.task) <= 4 * BLOCK_ELEMENTS  # else rebuilt per chunk

    def _weigh(self, x: Any) -> Any:
        from sklearn.preprocessing import normalize

        x.data = (np.log(x.data) + 1) * self.idf[x.indices]
        return normalize(x, copy=False)

    def embed(self, chunk: list[str]) -> Any:
        return self._weigh(self.vectorizer.transform(chunk))[:, self.terms]

    def scores(self, docs: Any, lo: int, hi: int) -> np.ndarray:
        """(chunk) x (task texts lo:hi) cosines."""
        block = self.dense.get(lo)
        if block is None:
            block = self.queries[lo:hi].T.toarray()  # terms x task texts
            if self.cache:
                self.dense[lo] = block
        return np.asarray(docs @ block)


class Embedding:
    """Cosine of an encoder's last hidden states mean-pooled over the attention mask."""

    def __init__(self, opts: Options, task: list[str]) -> None:
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(opts.encoder)
            self.model = AutoModel.from_pretrained(opts.encoder)
        except Exception as exc:  # a missing folder, a hub id offline, a damaged file
            raise ConfigError(f"select: encoder {opts.encoder} cannot be loaded "
                              f"({' '.join(str(exc).split())[:200]})") from None
        self.device = self.model.to("cuda" if torch.cuda.is_available() else "cpu").eval().device
        self.max_length = min(opts.max_seq_length, getattr(
            self.model.config, "max_position_embeddings", None) or opts.max_seq_length)
        self.batch_size, self.width = opts.batch_size, self.model.config.hidden_size
        self.queries = self.embed(task)

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), self.width), np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                rows = order[start:start + self.batch_size]
                batch = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                hidden = self.model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out[rows] = torch.nn.functional.normalize(mean, dim=-1).cpu().numpy()
        return out

    def scores(self, docs: np.ndarray, lo: int, hi: int) -> np.ndarray:
        return docs @ self.queries[lo:hi].T


def _top(scores: np.ndarray, ids: np.ndarray, hashes: np.ndarray, k: int) -> list[np.ndarray]:
    """Per row the k best (highest score, then lowest id), one entry per distinct text."""
    order = np.lexsort((ids, -scores, hashes), axis=1)  # copies side by side, the best first
    hashes_sorted = np.take_along_axis(hashes, order, 1)
    copy = np.pad(hashes_sorted[:, 1:] == hashes_sorted[:, :-1], ((0, 0), (1, 0)))
    later = np.empty_like(copy)
    np.put_along_axis(later, order, copy, 1)
    scores = np.where(later | (ids < 0), -np.inf, scores)
    best = np.lexsort((ids, -scores), axis=1)[:, :k]
    return [np.take_along_axis(a, best, 1) for a in (scores, ids, hashes)]


def select(opts: Options) -> dict[str, Any]:
    """Check everything, pick, write the corpus file and its report; returns the report."""
    start, out = time.monotonic(), Path(opts.output)
    files = corpus_files(opts.corpus)
    if out.resolve() in {Path(f).resolve() for f in [*files, opts.task]}:
        raise ConfigError(f"select: output {out} is one of the input files")
    task = read_task(opts.task, opts.task_text_column)
    if not any([next(documents([path], opts), None) for path in files]):  # each file's columns
        raise DataError(f"select: the corpus ({', '.join(files)[:200]}) holds no document")
    out.parent.mkdir(parents=True, exist_ok=True)
    scorer = (TfIdf if opts.method == "tfidf" else Embedding)(opts, task)
    if isinstance(scorer, TfIdf):
        scorer.fit(chunks(files, opts))
    task_hashes = digests(task)
    n_task, k, n = len(task), opts.k, 0
    best = [np.full((n_task, k), -np.inf, np.float32), np.full((n_task, k), -1, np.int64),
            np.zeros((n_task, k), np.int64)]  # score, document number, digest
    found: set[int] = set()  # digests of task texts met in the corpus
    for chunk in chunks(files, opts):
        hashes, ids = digests(chunk), np.arange(n, n + len(chunk))
        in_task = np.isin(hashes, task_hashes)
        found.update(hashes[in_task].tolist())
        keep = ~in_task & np.isin(ids - n, np.unique(hashes, return_index=True)[1])  # 1st copy
        docs, kk = scorer.embed(chunk), min(k, len(chunk))
        block = max(1, min(n_task, BLOCK_ELEMENTS // max(scorer.width, opts.chunk_size)))
        for lo in range(0, n_task, block):
            rows = slice(lo, min(lo + block, n_task))
            scores = torch.from_numpy(np.asarray(scorer.scores(docs, lo, rows.stop), np.float32))
            scores[torch.from_numpy(~keep)] = -torch.inf
            top, part = (t.T.numpy() for t in scores.topk(kk, dim=0))  # task texts x kk
            new = [top, ids[part], hashes[part]]
            both = [np.concatenate([b[rows], c], 1) for b, c in zip(best, new, strict=True)]
            for b, m in zip(best, _top(*both, k), strict=True):
                b[rows] = m
        n += len(chunk)
        logger.info("pass %s (scores): %s documents", 2 if opts.method == "tfidf" else 1, f"{n:,}")
    return _write(opts, files, task, best, found, n, start)


def _write(opts: Options, files: list[str], task: list[str], best: list[np.ndarray],
           found: set[int], n: int, start: float) -> dict[str, Any]:
    """Last pass: write each picked document once, in corpus order; then the report."""
    picked = (best[1] >= 0) & (best[0] > (0 if opts.method == "tfidf" else -np.inf))
    rows = np.nonzero(picked)[0]
    sims, ids, hashes = (b[picked] for b in best)
    group = np.unique(hashes, return_inverse=True)[1]
    counts = np.bincount(group)  # how many task texts picked each text
    order = np.lexsort((ids, -sims, group))  # per text: best similarity first, then lowest id
    first = order[np.unique(group[order], return_index=True)[1]]  # one entry per text
    by_sim = first[np.argsort(-sims[first], kind="stable")]
    shown = list(dict.fromkeys(by_sim[[0, len(by_sim) // 2, -1]].tolist())) if len(first) else []
    wanted, shown_ids = set(ids[first].tolist()), set(ids[shown].tolist())
    examples, out = {}, Path(opts.output)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with (gzip.open(tmp, "wt", encoding="utf-8") if out.name.lower().endswith(".gz")
          else open(tmp, "w", encoding="utf-8")) as fh:
        fh.writelines(f"{text}\n" for text in (task if opts.include_task else ()))
        for number, doc in enumerate(documents(files, opts)):
            if number in wanted:
                fh.write(doc + "\n")
                if number in shown_ids:
                    examples[number] = doc
    os.replace(tmp, out)
    report = {
        "output": str(out), "documents_written": len(first) + len(task) * opts.include_task,
        "corpus": files, "corpus_documents": n, "task": opts.task, "task_texts": len(task),
        "k": opts.k, "method": opts.method, "encoder": opts.encoder,
        "include_task": opts.include_task,
        "selected": len(first), "selected_by_several_task_texts": int((counts > 1).sum()),
        "task_texts_in_corpus_excluded": len(found),
        "task_texts_with_fewer_than_k": int((picked.sum(1) < opts.k).sum()),
        "similarity": {f: round(float(getattr(np, f)(sims[first])), 4) if len(first) else None
                       for f in ("min", "median", "max")},
        "examples": [{"similarity": round(float(sims[i]), 4), "document": examples[int(ids[i])]
                      [:500], "nearest_task_text": task[rows[i]][:500]} for i in shown],
        "seconds": round(time.monotonic() - start, 1),
    }
    report_path(out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def report_path(output: Path) -> Path:  # x.txt.gz, x.txt -> x.select.json beside it
    return output.with_name(re.sub(r"\.txt(\.gz)?$", "", output.name, flags=re.I) + ".select.json")


def summary(r: dict[str, Any]) -> str:
    """The report as the few lines `further-pt select` prints."""
    sim = r["similarity"]
    return "\n".join([
        f"select ({r['method']}): {r['corpus_documents']:,} corpus documents, "
        f"{r['task_texts']:,} task texts, k={r['k']}",
        f"  selected {r['selected']:,} documents, {r['selected_by_several_task_texts']:,} of "
        f"them by more than one task text; similarity min {sim['min']}, median "
        f"{sim['median']}, max {sim['max']}",
        f"  task texts found verbatim in the corpus and excluded: "
        f"{r['task_texts_in_corpus_excluded']:,}; task texts with fewer than k neighbours: "
        f"{r['task_texts_with_fewer_than_k']:,}",
        *(f"  {ex['similarity']:.3f} {ex['document'][:100]!r}\n"
          f"        nearest task text: {ex['nearest_task_text'][:100]!r}" for ex in r["examples"]),
        f"wrote {r['documents_written']:,} documents{' (task texts first)' * r['include_task']} "
        f"to {r['output']} (report: {report_path(Path(r['output']))}) in {r['seconds']} s"])
