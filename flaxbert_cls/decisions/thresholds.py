"""Decision thresholds tuned on the validation set to maximise F1 (NumPy, exact).

A label is predicted when its probability is >= its threshold.
  per-label (multi-label): each label's threshold maximises that label's F1;
  global (multi-label): one threshold for every label maximising micro F1 (TP, FP, FN
    pooled over all labels; exact, as one binary problem over the N x L pairs);
  binary single-label: the threshold on P(positive class) maximising that class's F1.

Every distinct validation probability is a candidate cut; the threshold returned is the
midpoint between the cut's probability and the next lower one (half the lowest for the
lowest), so rounding of probabilities at predict time cannot flip a validation decision.
Ties in F1 go to the threshold closest to 0.5 (the untuned rule), then to the higher one.
A label without positives in the validation set has no F1 to maximise: it keeps 0.5.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from flaxbert_cls.errors import UserError

DEFAULT_THRESHOLD = 0.5


def best_f1_threshold(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
  """(threshold, F1 at it) for binary outcomes `labels` scored by `probabilities` (any shape,
  flattened); (0.5, nan) when there is no positive."""
  p = np.asarray(probabilities, np.float64).reshape(-1)
  y = np.asarray(labels).reshape(-1).astype(bool)
  positives = int(y.sum())
  if positives == 0:
    return DEFAULT_THRESHOLD, float("nan")
  order = np.argsort(-p, kind="stable")
  p, y = p[order], y[order]
  # Cut after the last row of each distinct probability: predicted = the rows above.
  last = np.append(np.flatnonzero(np.diff(p) != 0), len(p) - 1)
  tp = np.cumsum(y)[last]
  fp = np.cumsum(~y)[last]
  f1 = 2 * tp / (2 * tp + fp + (positives - tp))  # exact ratio of integers: ties compare equal
  cut = p[last]
  thresholds = (cut + np.append(cut[1:], 0.0)) / 2
  candidates = np.flatnonzero(f1 == f1.max())
  # lexsort: last key first; closest to 0.5, then the higher threshold.
  pick = candidates[np.lexsort((-thresholds[candidates],
                                np.abs(thresholds[candidates] - DEFAULT_THRESHOLD)))[0]]
  return float(thresholds[pick]), float(f1[pick])


def per_label_thresholds(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """[L] thresholds, each maximising its label's F1 (probabilities, multi-hot labels [N, L])."""
  probabilities, labels = np.asarray(probabilities), np.asarray(labels)
  return np.array([best_f1_threshold(probabilities[:, j], labels[:, j])[0]
                   for j in range(probabilities.shape[1])])


def cross_fitted_decisions(probabilities: np.ndarray, labels: np.ndarray, seed: int = 0
                           ) -> np.ndarray:
  """Per-label decisions [N, L] where each half of the rows (a seeded split) is cut at the
  thresholds tuned on the other half: an estimate of tuned-threshold F1 on unseen rows
  (thresholds tuned and scored on the same rows overstate it)."""
  probabilities, labels = np.asarray(probabilities), np.asarray(labels)
  halves = np.array_split(np.random.default_rng(seed).permutation(len(labels)), 2)
  decided = np.zeros(labels.shape, bool)
  for tune, score in (halves, halves[::-1]):
    decided[score] = probabilities[score] >= per_label_thresholds(probabilities[tune],
                                                                  labels[tune])
  return decided


def cross_fitted_binary(probabilities: np.ndarray, labels: np.ndarray, positive: int = 1
                        ) -> np.ndarray:
  """int class ids [N] as `cross_fitted_decisions` decides them for a binary task: each half
  cut at the threshold on P(class `positive`) tuned on the other half."""
  probabilities = np.asarray(probabilities)
  hit = cross_fitted_decisions(probabilities[:, positive:positive + 1],
                               (np.asarray(labels) == positive)[:, None])[:, 0]
  return np.where(hit, positive, 1 - positive).astype(np.int64)


def global_threshold(probabilities: np.ndarray, labels: np.ndarray) -> float:
  """One threshold for every label, maximising micro F1 over [N, L]."""
  return best_f1_threshold(probabilities, labels)[0]


def binary_threshold(probabilities: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
  """The threshold on P(class `positive`) maximising its F1 (probabilities [N, 2], int labels)."""
  return best_f1_threshold(np.asarray(probabilities)[:, positive],
                           np.asarray(labels) == positive)[0]


def apply_binary(probabilities: np.ndarray, threshold: float, positive: int = 1) -> np.ndarray:
  """int class ids [N]: `positive` where P(positive) >= threshold, else the other class."""
  hit = np.asarray(probabilities)[:, positive] >= threshold
  return np.where(hit, positive, 1 - positive).astype(np.int64)


def check_thresholds(values: Sequence[float], num_labels: int, where: str) -> np.ndarray:
  """`values` as float64 [num_labels], each in (0, 1); UserError naming `where` if not."""
  try:
    out = np.asarray(values, np.float64).reshape(-1)
  except (TypeError, ValueError):
    raise UserError(f"{where}: thresholds must be numbers, got {values!r}") from None
  if len(out) != num_labels:
    raise UserError(f"{where}: {len(out)} thresholds for {num_labels} "
                    f"{'label' if num_labels == 1 else 'labels'}; give one per label, in "
                    "label order")
  bad = np.flatnonzero(~((out > 0) & (out < 1)))
  if len(bad):
    raise UserError(f"{where}: threshold {bad[0]} is {float(out[bad[0]])!r}; thresholds must be in "
                    "(0, 1)")
  return out


def read_thresholds_file(path: str, num_labels: int) -> np.ndarray:
  """A JSON file: a list of thresholds in label order, or an object with 'thresholds' (a
  list) or 'threshold' (binary), such as an export's config.json."""
  try:
    with open(os.path.expanduser(path)) as f:
      value = json.load(f)
  except OSError as e:
    raise UserError(f"thresholds_file {path}: cannot read: {e.strerror or e}") from None
  except ValueError as e:
    raise UserError(f"thresholds_file {path}: not JSON: {e}") from None
  if isinstance(value, dict):
    value = value.get("thresholds", value.get("threshold"))
    value = [value] if isinstance(value, (int, float)) else value
  if not isinstance(value, list):
    raise UserError(f"thresholds_file {path}: give a JSON list of thresholds (label order) or "
                    "an object with 'thresholds'")
  return check_thresholds(value, num_labels, f"thresholds_file {path}")
