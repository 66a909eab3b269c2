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
  (``linear.C``), chosen a priori, never searched on dev.

It trains on exactly the rows the fine-tuner uses for the same seed and size:
the labelled file is read and its labels encoded as the fine-tuner does
(:func:`labelled.read_labelled` / ``label_names`` /
``encode_labels``), then :func:`labelled.stratified_subsample`
picks the rows. It writes the fine-tuner's ``metrics.json`` keys
(:func:`evaluation.compute_metrics`), so the report treats it as one more
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

from further_pt.data import labelled
from further_pt.errors import ConfigError
from further_pt.files import atomic_write_text
from further_pt.objectives import evaluation

logger = logging.getLogger("further_pt.study.linear")
EXTRA = "pip install further-pt[linear]"
MAX_ITER = 2000


def require_sklearn() -> None:
    """ConfigError naming the extra when scikit-learn is not installed (checked at validation)."""
    if importlib.util.find_spec("sklearn") is None:
        raise ConfigError(f"config key 'variants': variant 'linear' needs scikit-learn, which is "
                          f"not installed: {EXTRA}")


def read_train(path: str, text_column: str, label_column: str
               ) -> tuple[list[str], list[int], list[str]]:
    """(texts, label ids, class names) of a training file, encoded as the fine-tuner does."""
    ds = labelled.read_labelled(path, columns=[text_column, label_column],
                                text_columns=[text_column])
    names = labelled.label_names(ds, label_column, path)
    return list(ds[text_column]), labelled.encode_labels(ds, label_column, names,
                                                         path), names


def read_eval(path: str, text_column: str, label_column: str, names: list[str]
              ) -> tuple[list[str], list[int]]:
    """(texts, label ids) of an evaluation file; a label training never saw is an error."""
    ds = labelled.read_labelled(path, columns=[text_column, label_column],
                                text_columns=[text_column])
    return list(ds[text_column]), labelled.encode_labels(ds, label_column, names,
                                                         path)


def sample_rows(labels: Sequence[int], size: int | None, seed: int, *, num_classes: int,
                where: str) -> list[int]:
    """The fine-tuner's training rows for ``size`` (``None``: all) and ``seed``."""
    if size is None:
        return list(range(len(labels)))
    return labelled.stratified_subsample(labels, size, seed, num_classes=num_classes,
                                         where=where)


def build(C: float, word_ngrams: Sequence[int], char_ngrams: Sequence[int], seed: int) -> Any:
    """The unfitted scikit-learn pipeline: TF-IDF word + char n-grams -> logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, Pipeline

    features = FeatureUnion([
        ("word", TfidfVectorizer(analyzer="word", ngram_range=tuple(word_ngrams),
                                 sublinear_tf=True, min_df=1)),
        ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=tuple(char_ngrams),
                                 sublinear_tf=True, min_df=1)),
    ])
    model = LogisticRegression(C=C, max_iter=MAX_ITER, random_state=seed)
    return Pipeline([("tfidf", features), ("logreg", model)])


def run(output_dir: Path, *, train_file: str, eval_file: str, text_column: str,
        label_column: str, size: int | None, seed: int, C: float,
        word_ngrams: Sequence[int], char_ngrams: Sequence[int]) -> dict[str, Any]:
    """Train on the seed's sample, evaluate on ``eval_file``; write and return metrics.json."""
    start = time.time()
    texts, labels, names = read_train(train_file, text_column, label_column)
    rows = sample_rows(labels, size, seed, num_classes=len(names), where=train_file)
    eval_texts, eval_labels = read_eval(eval_file, text_column, label_column, names)
    pipeline = build(C, word_ngrams, char_ngrams, seed)
    pipeline.fit([texts[r] for r in rows], [labels[r] for r in rows])
    predictions = [int(p) for p in pipeline.predict(eval_texts)]
    metrics = evaluation.compute_metrics(predictions, eval_labels, names)
    metrics.update({
        "model": "tfidf-logreg", "train_examples": len(rows), "train_rows_total": len(labels),
        "features": len(pipeline.named_steps["tfidf"].get_feature_names_out()),
        "seconds": time.time() - start,
        "config": {"train_file": train_file, "eval_file": eval_file, "text_column": text_column,
                   "label_column": label_column, "train_size": size, "seed": seed, "C": C,
                   "word_ngrams": list(word_ngrams), "char_ngrams": list(char_ngrams),
                   "max_iter": MAX_ITER}})
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=1))
    logger.info("linear n=%s seed %d: eval error rate %.4f on %d examples", size, seed,
                metrics["eval_error_rate"], len(eval_labels))
    return metrics
