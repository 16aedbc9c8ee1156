"""Evaluation metrics (GLUE's) computed on the host with scikit-learn / scipy."""

from __future__ import annotations

from collections.abc import Sequence
import math

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from flaxbert_cls.errors import UserError

METRIC_NAMES = ("accuracy", "f1", "f1_macro", "matthews_correlation",
                "pearson", "spearmanr")
REGRESSION_METRICS = ("pearson", "spearmanr")


def _accuracy(p, y):
  return float(np.mean(p == y))


def _f1(p, y):
  classes = np.union1d(p, y)
  if not np.all(np.isin(classes, (0, 1))):
    raise ValueError(
        "'f1' is binary F1 (positive class 1) but the labels/predictions "
        f"hold classes {classes.tolist()}; use 'f1_macro'")
  # zero_division=0: no positive prediction or label gives 0, not a warning.
  return float(skm.f1_score(y, p, pos_label=1, average="binary",
                            zero_division=0))


def _f1_macro(p, y):
  return float(skm.f1_score(y, p, average="macro", zero_division=0))


def _mcc(p, y):
  return float(skm.matthews_corrcoef(y, p))


def _correlation(fn):
  def compute(p, y):
    # Constant input has no correlation: report NaN rather than a warning.
    if len(p) < 2 or np.all(p == p[0]) or np.all(y == y[0]):
      return math.nan
    return float(fn(p, y)[0])
  return compute


def _class_ids(x: np.ndarray, what: str) -> np.ndarray:
  # Guard against passing logits or scores where class ids are expected.
  if x.dtype.kind not in "iub" and not np.all(x == np.round(x)):
    raise ValueError(f"{what} must be class ids (integers), got {x.dtype} "
                     f"values such as {x[0]!r}")
  return x.astype(np.int64)


_METRICS = {
    "accuracy": _accuracy,
    "f1": _f1,
    "f1_macro": _f1_macro,
    "matthews_correlation": _mcc,
    "pearson": _correlation(stats.pearsonr),
    "spearmanr": _correlation(stats.spearmanr),
}


def compute_metrics(metric_names: Sequence[str], predictions: np.ndarray,
                    labels: np.ndarray) -> dict[str, float]:
  """Returns {name: value} as Python floats.

  Args:
    metric_names: names from `METRIC_NAMES`.
    predictions: class ids (classification) or scores (regression), shape [n].
    labels: gold class ids or scores, shape [n].
  """
  unknown = [m for m in metric_names if m not in _METRICS]
  if unknown:
    raise UserError(
        f"unknown metric(s) {unknown}; known: {list(METRIC_NAMES)}")
  predictions = np.asarray(predictions).reshape(-1)
  labels = np.asarray(labels).reshape(-1)
  if predictions.shape != labels.shape:
    raise ValueError(
        f"{predictions.shape[0]} predictions for {labels.shape[0]} labels")
  if predictions.size == 0:
    raise ValueError("no examples to compute metrics on")
  out = {}
  for name in metric_names:
    if name in REGRESSION_METRICS:
      p, y = predictions.astype(np.float64), labels.astype(np.float64)
    else:
      p, y = _class_ids(predictions, "predictions"), _class_ids(labels, "labels")
    out[name] = float(_METRICS[name](p, y))
  return out


def per_class_metrics(predictions: np.ndarray, labels: np.ndarray,
                      label_names: Sequence[str]) -> dict[str, dict[str, float]]:
  """{name: {precision, recall, f1, support}} per class (single-label: class ids [n];
  multi-label: multi-hot [n, labels] decisions and gold)."""
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  ids = None if labels.ndim == 2 else np.arange(len(label_names))
  precision, recall, f1, support = skm.precision_recall_fscore_support(
      labels.astype(np.int64), predictions.astype(np.int64), labels=ids, average=None,
      zero_division=0)
  return {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
          for name, p, r, f, s in zip(label_names, precision, recall, f1, support)}


MULTILABEL_METRIC_NAMES = ("f1_macro", "f1_micro", "subset_accuracy")


def multilabel_metrics(metric_names: Sequence[str], predictions: np.ndarray,
                       labels: np.ndarray) -> dict[str, float]:
  """Macro / micro F1 over labels and exact-match (subset) accuracy of multi-hot decisions.

  Args:
    metric_names: names from `MULTILABEL_METRIC_NAMES`.
    predictions: 0/1 decisions [n, labels] (e.g. probability > 0.5).
    labels: gold multi-hot [n, labels].
  """
  unknown = [m for m in metric_names if m not in MULTILABEL_METRIC_NAMES]
  if unknown:
    raise UserError(f"unknown multi-label metric(s) {unknown}; known: "
                    f"{list(MULTILABEL_METRIC_NAMES)}")
  p = np.asarray(predictions).astype(np.int64)
  y = np.asarray(labels).astype(np.int64)
  if p.shape != y.shape or p.ndim != 2:
    raise ValueError(f"multi-label predictions {p.shape} and labels {y.shape} must be the same "
                     "[n, labels] shape")
  compute = {
      # A label with no positive and no predicted example scores 0 (sklearn's zero_division).
      "f1_macro": lambda: skm.f1_score(y, p, average="macro", zero_division=0),
      "f1_micro": lambda: skm.f1_score(y, p, average="micro", zero_division=0),
      "subset_accuracy": lambda: skm.accuracy_score(y, p),
  }
  return {name: float(compute[name]()) for name in metric_names}
