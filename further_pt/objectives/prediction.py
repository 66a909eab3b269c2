"""Prediction: a sequence classifier's labels for a file of texts (``further-pt predict``).

Any ``AutoModelForSequenceClassification`` folder is read. A further_pt fine-tuned one
carries ``preprocessing.json``: the text is cut as training cut it, from the columns
training read, a custom head is rebuilt and every task of a multi-task model is
predicted. A plain Hugging Face folder has none: the text column is ``text`` unless
told, cut at its head to ``max_length`` tokens (the one given, else the tokenizer's
``model_max_length``, else the model's position limit), as ``pipeline(...,
truncation=True)`` cuts it. :func:`plan` says which, in words, before the model loads.

Batches are rows of similar length (sorted, then put back in order), padded to
multiples of 8 and run under autocast (bf16; fp16 on GPUs without it) on a GPU; the
probabilities stay tensors until the end, where they become labels once. The output's
format follows its suffix (``.jsonl``, ``.parquet``, ``.csv``): each input row plus
``prediction`` and ``probabilities`` ({label: p}), or with ``top_k`` the k best as
``top_k`` ([{label, score}], best first, as ``pipeline(..., top_k=k)`` gives them). A
multi-task model's columns carry the task's name (``topic_prediction``). In csv the
nested values are JSON text.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader

from further_pt.data import instances, labelled, segments
from further_pt.data.tokenizer import load_tokenizer
from further_pt.errors import ConfigError
from further_pt.objectives import encoder, kinds
from further_pt.objectives.evaluation import PREPROCESSING, compute, task_kind
from further_pt.objectives.heads import HEAD_CONFIG, load_classifier

FORMATS = (".jsonl", ".parquet", ".csv")
_HOST_EVERY = 1 << 24  # probabilities held on the device (elements) before a copy to the host


def output_format(path: str | Path) -> str:
    """The output's format, from its suffix; any other is an error before any work."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"predict: output={path}: the format is read from the suffix: "
                          f"{', '.join(FORMATS)}")
    return suffix


@dataclass(frozen=True)
class Reading:
    """How one task of the model is read from the input and cut."""

    task: str
    names: list[str]
    text_column: str
    text_pair_column: str | None
    label_column: str | None  # metrics when the input has it
    truncation: str  # head | tail | head_tail | segments
    max_length: int  # tokens per text or pair (per segment), special tokens included
    head_tokens: int
    max_segments: int
    source: str  # where max_length and the cut come from, in words
    kind: str = "single_label"  # task.kind: single_label | multi_label | regression
    threshold: float = 0.5  # multi_label: a class is predicted at this probability

    def describe(self) -> str:
        pair = f" + {self.text_pair_column!r}" if self.text_pair_column else ""
        cut = {"head_tail": f"head_tail ({min(self.head_tokens, self.max_length - 2)} head "
                            "tokens + the tail)",
               "segments": f"segments (at most {self.max_segments})"}.get(self.truncation,
                                                                           self.truncation)
        return (f"task {self.task}: text {self.text_column!r}{pair}, {cut} truncation to "
                f"{self.max_length} tokens ({self.source}), {len(self.names)} labels")


def plan(model_dir: str | Path, *, max_length: int | None = None,
         text_column: str | None = None, text_pair_column: str | None = None,
         label_column: str | None = None) -> list[Reading]:
    """How each task of the model will read the input, from the folder alone (no weights).

    Columns given here replace the folder's (every task's); ``max_length`` replaces the
    length training used. A length beyond the model's positions is an error.
    """
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model: {folder} is not a model folder (no config.json)")
    config = encoder.load_config(str(folder))
    names = _task_names(folder, config)
    limit = encoder.position_limit(config)
    prep_path = folder / PREPROCESSING
    prep: dict[str, Any] = {}
    if prep_path.is_file():
        try:
            prep = json.loads(prep_path.read_text())
            columns = prep.get("tasks") or {name: {"text_column": prep["text_column"],
                                                   "label_column": prep["label_column"]}
                                            for name in names}
            length, pair = max_length or prep["max_seq_length"], prep["text_pair_column"]
            cut = (prep["truncation"], prep["head_tokens"], prep["max_segments"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"model: {prep_path} is damaged ({' '.join(str(exc).split())[:120]}"
                              "); copy the model folder again") from None
        source = "given" if max_length else f"as in training: {PREPROCESSING}"
    else:
        columns = {name: {"text_column": "text", "label_column": None} for name in names}
        length, source = max_length, "given"
        if length is None:
            model_max = load_tokenizer(str(folder)).model_max_length
            length, source = ((model_max, "the tokenizer's model_max_length")
                              if model_max and model_max < 1_000_000 else
                              (limit, "the model's max_position_embeddings"))
        if length is None:
            raise ConfigError(f"model: {folder} states no length limit: give max_length=N")
        pair, cut = None, ("head", 0, 1)
    if limit is not None and length > limit:
        raise ConfigError(f"predict: max_length={length} exceeds the model's {limit} positions")
    if length < 3:
        raise ConfigError(f"predict: max_length={length}: at least 3 tokens ([CLS] x [SEP])")
    kind = task_kind(prep, json.loads((folder / "config.json").read_text()))
    thresholds = prep.get("thresholds") or {}
    return [Reading(task, names[task], text_column or c["text_column"],
                    text_pair_column or pair, label_column or c["label_column"], cut[0],
                    int(length), int(cut[1]), int(cut[2]), source, kind,
                    float(thresholds.get(task, prep.get("threshold", 0.5))))
            for task, c in columns.items()]


def _task_names(folder: Path, config: Any) -> dict[str, list[str]]:
    """Each task's label names: a custom head's head_config.json, else the config's id2label."""
    if (folder / HEAD_CONFIG).is_file():
        return dict(json.loads((folder / HEAD_CONFIG).read_text())["tasks"])
    return {"main": [config.id2label[i] for i in range(config.num_labels)]}


def device_settings(device: torch.device) -> tuple[int | None, Callable[[], Any]]:
    """GPU: lengths padded to multiples of 8 (tensor cores) and autocast, bf16 where the GPU
    has it (fp16 on V100, T4); CPU: neither (fp32, the longest row's length)."""
    if device.type != "cuda":
        return None, contextlib.nullcontext
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return 8, partial(torch.autocast, "cuda", dtype=dtype)


@torch.no_grad()
def probabilities(classifier: Any, encoded: datasets.Dataset, tasks: Sequence[str], *,
                  batch_size: int, device: torch.device, pad_id: int,
                  task_kinds: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Each task's scores in the rows' order (:func:`kinds.scores`: (rows, labels)
    probabilities, a sigmoid per class for multi-label, or (rows,) values for regression);
    one encoder pass per batch. Batches hold rows of similar length; results stay on the
    device until ``_HOST_EVERY`` elements, then move to the host in one copy."""
    task_kinds = task_kinds or {}
    pad, autocast = device_settings(device)
    order = torch.argsort(instances.lengths(encoded), descending=True, stable=True)
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    loader = DataLoader(encoded, batch_sampler=batches, collate_fn=partial(
        segments.collate, pad_id=pad_id, pad_to_multiple_of=pad))
    held: dict[str, list[torch.Tensor]] = {t: [] for t in tasks}
    host: dict[str, list[torch.Tensor]] = {t: [] for t in tasks}
    count = 0
    for batch in loader:
        batch.pop("labels")
        with autocast():
            logits = classifier.logits_by_task(**{k: v.to(device, non_blocking=True)
                                                  for k, v in batch.items()})
        for task in tasks:
            held[task].append(kinds.scores(task_kinds.get(task, "single_label"), logits[task]))
            count += held[task][-1].numel()
        if count >= _HOST_EVERY:
            for task in tasks:
                host[task].append(torch.cat(held[task]).cpu())
                held[task] = []
            count = 0
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    for task in tasks:
        if held[task]:
            host[task].append(torch.cat(held[task]).cpu())
    return {task: torch.cat(host[task])[inverse].numpy() for task in tasks}


def predict_file(model_dir: str | Path, input_path: str, output_path: str | Path, *,
                 batch_size: int = 64, top_k: int | None = None,
                 readings: list[Reading] | None = None) -> dict[str, Any]:
    """Predict every row of ``input_path`` for every task; write ``output_path``.

    ``readings`` (see :func:`plan`; planned here if not given) say how. The input is read
    and checked before the model loads. Metrics (``eval_*``; ``eval_TASK_*`` with several
    tasks) are returned for each task whose label column the input holds.
    """
    suffix = output_format(output_path)
    readings = readings or plan(model_dir)
    texts = list(dict.fromkeys(c for r in readings for c in (r.text_column, r.text_pair_column)
                               if c))
    raw = labelled.read_predict_input(input_path, texts)  # texts checked, before the model
    if top_k is not None and top_k < 1:
        raise ConfigError(f"predict: top_k={top_k} must be at least 1")
    tokenizer = load_tokenizer(str(model_dir))
    classifier = load_classifier(model_dir).eval()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # one process
    classifier.to(device)
    single = len(readings) == 1
    out: dict[str, pa.Array] = {}
    metrics: dict[str, Any] = {}
    groups: dict[tuple[str, str | None], list[Reading]] = {}
    for r in readings:
        groups.setdefault((r.text_column, r.text_pair_column), []).append(r)
    for (text, pair), group in groups.items():
        first = group[0]
        encoded = segments.tokenize(
            raw.select_columns([c for c in (text, pair) if c]), tokenizer, text_column=text,
            text_pair_column=pair, labels=[0] * len(raw), strategy=first.truncation,
            max_seq_length=first.max_length, head_tokens=first.head_tokens,
            max_segments=first.max_segments)
        probs = probabilities(classifier, encoded, [r.task for r in group],
                              batch_size=batch_size, device=device,
                              pad_id=tokenizer.pad_token_id,
                              task_kinds={r.task: r.kind for r in group})
        for r in group:
            prefix = "" if single else f"{r.task}_"
            out.update(_columns(probs[r.task], r, prefix, top_k))
            if _has_labels(raw, r.label_column):
                refs = kinds.read(raw, r.label_column, input_path, r.kind, r.names)[1]
                metrics.update(compute(r.kind, probs[r.task].tolist(), refs, r.names,
                                       "eval_" if single else f"eval_{r.task}_",
                                       threshold=r.threshold))
    table = raw.with_format("arrow")[:]
    table = table.drop_columns([c for c in out if c in table.column_names])
    for name, values in out.items():
        table = table.append_column(name, values)
    _write(table, Path(output_path), suffix)
    return metrics


def _columns(probs: np.ndarray, reading: Reading, prefix: str, top_k: int | None
             ) -> dict[str, pa.Array]:
    """``prediction`` and ``probabilities`` (or ``top_k``) of one task, from the array at once:
    the class, the label set at the saved threshold (multi-label) or the value (regression)."""
    if reading.kind == "regression":
        return {f"{prefix}prediction": pa.array(probs.astype(np.float64))}
    names = reading.names
    labels = np.array(names, dtype=object)
    rounded = np.round(probs.astype(np.float64), 6)
    if reading.kind == "multi_label":
        chosen = [list(labels[row >= reading.threshold]) for row in probs]
        columns = {f"{prefix}prediction": pa.array(chosen, pa.list_(pa.string()))}
    else:
        columns = {f"{prefix}prediction": pa.array(labels[probs.argmax(1)], pa.string())}
    if top_k is None:
        columns[f"{prefix}probabilities"] = pa.StructArray.from_arrays(
            [pa.array(rounded[:, j]) for j in range(len(names))], names=names)
        return columns
    k = min(top_k, len(names))
    best = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    entries = pa.StructArray.from_arrays(
        [pa.array(labels[best].ravel(), pa.string()),
         pa.array(np.take_along_axis(rounded, best, 1).ravel())], names=["label", "score"])
    columns[f"{prefix}top_k"] = pa.ListArray.from_arrays(
        pa.array(np.arange(0, len(probs) * k + 1, k, dtype=np.int32)), entries)
    return columns


def _has_labels(raw: datasets.Dataset, column: str | None) -> bool:
    """The input holds the task's labels (a ClassLabel column of -1 only is a test split's)."""
    if column is None or column not in raw.column_names:
        return False
    feature = raw.features[column]
    return not (isinstance(feature, datasets.ClassLabel) and max(raw[column]) < 0)


def _write(table: pa.Table, path: Path, suffix: str) -> None:
    """The table in the suffix's format, written whole or not at all (a temporary, renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, tmp)
    elif suffix == ".csv":
        import pyarrow.csv as pcsv

        for i, field in enumerate(table.schema):  # csv has no nesting: JSON text
            if pa.types.is_nested(field.type):
                text = [json.dumps(v, ensure_ascii=False, default=str)
                        for v in table.column(i).to_pylist()]
                table = table.set_column(i, field.name, pa.array(text, pa.string()))
        pcsv.write_csv(table, tmp)
    else:
        with open(tmp, "w", encoding="utf-8") as fh:
            for batch in table.to_batches():
                for row in batch.to_pylist():
                    fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)
