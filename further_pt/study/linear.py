"""A linear reference for the experiment: TF-IDF features + logistic regression.

Why: a data-size study (Sun et al. 2019, sec. 5.5) only means something next to
a cheap baseline; if a fine-tuned encoder does not beat a bag of n-grams at 400
examples, further pretraining is not the first thing to fix.

Model (fixed, nothing is tuned on the dev set):

- features: two TF-IDF blocks side by side, word 1-2 grams and character 2-5
  grams within word boundaries (``char_wb``), both lowercased, ``sublinear_tf``
  (1 + log tf) and L2-normalised per block; the vocabulary is the training
  sample's, every n-gram seen once counts (``min_df=1``: at 8 or 400 examples a
  higher cut-off would drop most of it);
- classifier: multinomial logistic regression (lbfgs, up to 2000 iterations)
  with the inverse regularisation strength ``C`` the recipe gives
  (``linear.C``), chosen a priori, never searched on dev; a multi-label task
  (``task.kind``) fits one such binary regression per class (one-vs-rest; a
  class is predicted at probability >= 0.5), a regression task a ridge
  regression with ``alpha = 1 / C``.

It trains on exactly the rows the fine-tuner uses for the same seed and size:
the labelled file is read and its labels encoded as the fine-tuner does
(:func:`labelled.read_labelled`, :func:`kinds.read`), then :func:`kinds.sample`
picks the rows. It writes the fine-tuner's ``metrics.json`` keys
(:func:`evaluation.compute`), so the report treats it as one more
variant. scikit-learn is an optional extra: ``pip install further-pt[linear]``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from further_pt.data import labelled, targets
from further_pt.errors import ConfigError
from further_pt.files import atomic_write_text
from further_pt.objectives import evaluation, kinds

logger = logging.getLogger("further_pt.study.linear")
EXTRA = "pip install further-pt[linear]"
MAX_ITER = 2000


def require_sklearn() -> None:
    """ConfigError naming the extra when scikit-learn is not installed (checked at validation)."""
    if importlib.util.find_spec("sklearn") is None:
        raise ConfigError(f"config key 'variants': variant 'linear' needs scikit-learn, which is "
                          f"not installed: {EXTRA}")


def read_train(path: str, text_column: str, label_column: str, kind: str = "single_label"
               ) -> tuple[list[str], list[Any], list[str]]:
    """(texts, encoded labels, class names) of a training file, read as the fine-tuner does."""
    texts, labels, names = _read(path, text_column, label_column, kind, None)
    return texts, labels, names


def read_eval(path: str, text_column: str, label_column: str, names: list[str],
              kind: str = "single_label") -> tuple[list[str], list[Any]]:
    """(texts, encoded labels) of an evaluation file; a label training never saw is an error."""
    texts, labels, _ = _read(path, text_column, label_column, kind, names)
    return texts, labels


def _read(path: str, text_column: str, label_column: str, kind: str,
          names: list[str] | None) -> tuple[list[str], list[Any], list[str]]:
    ds = labelled.read_labelled(path, columns=[text_column, label_column],
                                text_columns=[text_column], label_column=label_column,
                                label_role=targets.ROLES[kind])
    names, labels = kinds.read(ds, label_column, path, kind, names)
    return list(ds[text_column]), labels, names


def sample_rows(labels: Sequence[Any], size: int | None, seed: int, *, num_classes: int,
                where: str, kind: str = "single_label") -> list[int]:
    """The fine-tuner's training rows for ``size`` (``None``: all) and ``seed``."""
    if size is None:
        return list(range(len(labels)))
    return kinds.sample(labels, size, seed, kind=kind, num_names=num_classes, where=where)


def build(C: float, word_ngrams: Sequence[int], char_ngrams: Sequence[int], seed: int,
          kind: str = "single_label") -> Any:
    """The unfitted scikit-learn pipeline: TF-IDF word + char n-grams -> logistic regression
    (one per class for a multi-label task; ridge regression for a regression task)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import FeatureUnion, Pipeline

    features = FeatureUnion([
        ("word", TfidfVectorizer(analyzer="word", ngram_range=tuple(word_ngrams),
                                 sublinear_tf=True, min_df=1)),
        ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=tuple(char_ngrams),
                                 sublinear_tf=True, min_df=1)),
    ])
    model: Any = LogisticRegression(C=C, max_iter=MAX_ITER, random_state=seed)
    if kind == "multi_label":
        model = OneVsRestClassifier(model)
    elif kind == "regression":
        model = Ridge(alpha=1.0 / C)
    return Pipeline([("tfidf", features), ("logreg", model)])


def run(output_dir: Path, *, train_file: str, eval_file: str, text_column: str,
        label_column: str, size: int | None, seed: int, C: float,
        word_ngrams: Sequence[int], char_ngrams: Sequence[int],
        kind: str = "single_label") -> dict[str, Any]:
    """Train on the seed's sample, evaluate on ``eval_file``; write and return metrics.json."""
    import numpy as np

    start = time.time()
    texts, labels, names = read_train(train_file, text_column, label_column, kind)
    rows = sample_rows(labels, size, seed, num_classes=len(names), where=train_file, kind=kind)
    eval_texts, eval_labels = read_eval(eval_file, text_column, label_column, names, kind)
    pipeline = build(C, word_ngrams, char_ngrams, seed, kind)
    pipeline.fit([texts[r] for r in rows], np.asarray([labels[r] for r in rows]))
    if kind == "single_label":
        predictions = [int(p) for p in pipeline.predict(eval_texts)]
        metrics = evaluation.compute_metrics(predictions, eval_labels, names)
    else:
        scores = (pipeline.predict_proba(eval_texts) if kind == "multi_label"
                  else pipeline.predict(eval_texts))
        metrics = evaluation.compute(kind, scores.tolist(), eval_labels, names, threshold=0.5)
    metrics.update({
        "model": "tfidf-logreg", "train_examples": len(rows), "train_rows_total": len(labels),
        "features": len(pipeline.named_steps["tfidf"].get_feature_names_out()),
        "seconds": time.time() - start,
        "config": {"train_file": train_file, "eval_file": eval_file, "text_column": text_column,
                   "label_column": label_column, "kind": kind, "train_size": size,
                   "seed": seed, "C": C,
                   "word_ngrams": list(word_ngrams), "char_ngrams": list(char_ngrams),
                   "max_iter": MAX_ITER}})
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=1))
    first = kinds.METRICS[kind][0]
    logger.info("linear n=%s seed %d: eval %s %.4f on %d examples", size, seed, first,
                metrics[f"eval_{first}"], len(eval_labels))
    return metrics
