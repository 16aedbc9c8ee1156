"""Loss weights for imbalanced classes (config.class_weights), resolved from the training labels.

Single-label: one weight per class for the softmax cross-entropy; 'auto' is the inverse
class frequency scaled so the mean weight over the training examples is 1 (sklearn's
'balanced': n / (classes * count)), so the loss keeps its scale and the learning rate
its meaning. Multi-label: one BCE `pos_weight` per label; 'auto' is negatives / positives,
clipped to [1 / max_pos_weight, max_pos_weight] (a label seen 20 times in 43k rows would
otherwise weigh 2000 and swamp the others).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from flaxbert_cls.errors import UserError
from flaxbert_cls.data.tasks import MULTI_LABEL, REGRESSION


def auto_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """n / (num_classes * count) per class; a class absent from `labels` gets 1."""
  counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes).astype(np.float64)
  weights = np.ones(num_classes)
  seen = counts > 0
  # Normalised over the classes seen, so the mean weight over the examples is exactly 1.
  weights[seen] = len(labels) / (np.count_nonzero(seen) * counts[seen])
  return weights


def auto_pos_weights(multi_hot: np.ndarray, max_pos_weight: float) -> np.ndarray:
  """negatives / positives per label, clipped to [1/max_pos_weight, max_pos_weight]."""
  positives = np.asarray(multi_hot, np.float64).sum(0)
  negatives = len(multi_hot) - positives
  ratio = negatives / np.maximum(positives, 1e-12)
  return np.clip(ratio, 1.0 / max_pos_weight, max_pos_weight)


def parse_class_weights(value: Any) -> "str | tuple[float, ...] | None":
  """config.class_weights as () (none), 'auto' or a tuple of numbers; None if malformed.

  Takes the string form ('', 'auto', '1,4.5') and a list/tuple (a config read from JSON)."""
  if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
    return ()
  if isinstance(value, str) and value.strip().lower() == "auto":
    return "auto"
  parts = value.split(",") if isinstance(value, str) else list(value)
  try:
    weights = tuple(float(p) for p in parts if not isinstance(p, bool))
  except (TypeError, ValueError):
    return None
  if len(weights) != len(parts) or not all(w > 0 for w in weights):
    return None
  return weights


def resolve(setting: Any, labels: np.ndarray | None, label_names: Sequence[str] | None,
            problem_type: str, max_pos_weight: float = 30.0,
            key: str = "config.class_weights") -> tuple[float, ...]:
  """The weights a setting ('' / (), 'auto' or numbers in label order) means for these labels."""
  parsed = parse_class_weights(setting)
  if parsed is None:
    raise UserError(f"{key}={setting!r}: use '' (none), 'auto' or positive numbers in label "
                    "order, e.g. '1,4.5'")
  setting = parsed
  if setting == ():
    return ()
  if problem_type == REGRESSION:
    raise UserError(f"{key}={setting!r}: a regression task has no classes to weigh")
  num_labels = len(label_names)
  if setting == "auto":
    if labels is None:
      raise UserError(f"{key}='auto' needs labelled training data")
    weights = (auto_pos_weights(labels, max_pos_weight) if problem_type == MULTI_LABEL
               else auto_class_weights(labels, num_labels))
    return tuple(float(w) for w in weights)
  weights = setting
  if len(weights) != num_labels:
    raise UserError(f"{key}: {len(weights)} weights for {num_labels} labels "
                    f"{list(label_names)}; give one per label, in that order")
  return weights
