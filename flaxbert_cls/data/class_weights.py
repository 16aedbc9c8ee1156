"""What the loss does for skewed classes, resolved from the training labels: class weights
(config.class_weights) and the logit adjustment's offsets (config.logit_adjustment).

Single-label: one weight per class for the softmax cross-entropy; 'auto' is the inverse
class frequency scaled so the mean weight over the training examples is 1 (sklearn's
'balanced': n / (classes * count)), so the loss keeps its scale and the learning rate
its meaning. 'effective' (Cui et al. 2019) weighs each class by the inverse of its effective
number of samples (1 - beta^n) / (1 - beta), beta 0.999 unless 'effective:BETA' says: gentler
than inverse frequency on a very large class, the same scaling. The logit adjustment (Menon
et al. 2021) adds tau * log(prior) to the logits in the loss. Multi-label: one BCE
`pos_weight` per label; 'auto' is negatives / positives, clipped to [1 / max_pos_weight,
max_pos_weight] (a label seen 20 times in 43k rows would otherwise weigh 2000 and swamp the
others).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from flaxbert_cls.errors import UserError
from flaxbert_cls.data.tasks import MULTI_LABEL, REGRESSION, SINGLE_LABEL


EFFECTIVE_BETA = 0.999


def _mean_one(labels: np.ndarray, num_classes: int, per_count) -> np.ndarray:
  """per_count(counts) for the classes seen, scaled so the mean weight over the examples is
  exactly 1; a class absent from `labels` gets 1."""
  counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes).astype(np.float64)
  weights = np.ones(num_classes)
  seen = counts > 0
  raw = per_count(counts[seen])
  weights[seen] = raw * len(labels) / np.sum(raw * counts[seen])
  return weights


def auto_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """n / (classes seen * count) per class: inverse frequency, mean weight 1."""
  return _mean_one(labels, num_classes, lambda counts: 1.0 / counts)


def effective_class_weights(labels: np.ndarray, num_classes: int,
                            beta: float = EFFECTIVE_BETA) -> np.ndarray:
  """1 / effective number (1 - beta^count) / (1 - beta) per class, mean weight 1."""
  return _mean_one(labels, num_classes,
                   lambda counts: (1.0 - beta) / (1.0 - np.power(beta, counts)))


def auto_pos_weights(multi_hot: np.ndarray, max_pos_weight: float) -> np.ndarray:
  """negatives / positives per label, clipped to [1/max_pos_weight, max_pos_weight]."""
  positives = np.asarray(multi_hot, np.float64).sum(0)
  negatives = len(multi_hot) - positives
  ratio = negatives / np.maximum(positives, 1e-12)
  return np.clip(ratio, 1.0 / max_pos_weight, max_pos_weight)


def parse_class_weights(value: Any) -> "str | tuple[float, ...] | None":
  """config.class_weights as () (none), 'auto', 'effective:BETA' or a tuple of numbers; None
  if malformed.

  Takes the string form ('', 'auto', 'effective', 'effective:0.99', '1,4.5') and a
  list/tuple (a config read from JSON)."""
  if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
    return ()
  if isinstance(value, str) and value.strip().lower() == "auto":
    return "auto"
  if isinstance(value, str) and value.strip().lower().split(":")[0] == "effective":
    _, _, beta = value.strip().lower().partition(":")
    try:
      beta = float(beta) if beta else EFFECTIVE_BETA
    except ValueError:
      return None
    return f"effective:{beta!r}" if 0 < beta < 1 else None
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
    raise UserError(f"{key}={setting!r}: use '' (none), 'auto', 'effective[:BETA]' (0 < BETA "
                    "< 1) or positive numbers in label order, e.g. '1,4.5'")
  setting = parsed
  if setting == ():
    return ()
  if problem_type == REGRESSION:
    raise UserError(f"{key}={setting!r}: a regression task has no classes to weigh")
  num_labels = len(label_names)
  if isinstance(setting, str) and setting.startswith("effective"):
    if problem_type == MULTI_LABEL:
      raise UserError(f"{key}={setting!r} weighs the classes of a single-label task; a "
                      "multi-label task takes 'auto' (pos_weight per label)")
    if labels is None:
      raise UserError(f"{key}={setting!r} needs labelled training data")
    beta = float(setting.partition(":")[2])
    return tuple(float(w) for w in effective_class_weights(labels, num_labels, beta))
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


def logit_offsets(tau: float, labels: np.ndarray | None, num_labels: int, problem_type: str,
                  key: str = "config.logit_adjustment") -> tuple[float, ...]:
  """tau * log(prior) per class from the training labels (the logit-adjusted loss); () when tau
  is 0. A class absent from the labels gets the smallest prior seen: it has no rows to learn
  from either way, and log(0) would put -inf into the loss."""
  if not tau:
    return ()
  if problem_type != SINGLE_LABEL:
    raise UserError(f"{key}={tau}: adjusts a softmax by class priors: single-label tasks only")
  if labels is None:
    raise UserError(f"{key}={tau} needs labelled training data (its class priors)")
  counts = np.bincount(np.asarray(labels, np.int64), minlength=num_labels).astype(np.float64)
  counts[counts == 0] = counts[counts > 0].min()
  return tuple(float(tau * np.log(c / counts.sum())) for c in counts)
