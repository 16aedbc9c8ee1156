"""Temperature scaling and expected calibration error (ECE), on the host with NumPy/SciPy.

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") divides
every logit by one T > 0 fitted on the validation set by minimising the negative
log-likelihood: softmax cross-entropy for single-label classification, per-label sigmoid
binary cross-entropy for multi-label. T > 1 softens over-confident probabilities; the
predicted class (argmax) never changes.

ECE: equal-width bins on [0, 1], the count-weighted mean |observed frequency - mean
probability| over the bins.
  single-label: the top-1 probability against "the predicted class is right".
  multi-label: every (example, label) sigmoid probability against "the label is present",
    all N x L pairs pooled in one reliability diagram (the calibration of P(label), which
    is what a threshold reads).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import optimize
from scipy import special

NUM_CALIBRATION_BINS = 10
# log T is searched in [-5, 5]: T from 0.0067 to 148, far beyond any fitted value seen.
_LOG_T_BOUNDS = (-5.0, 5.0)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
  """Class probabilities (float64) of logits / temperature along the last axis."""
  return special.softmax(np.asarray(logits, np.float64) / temperature, axis=-1)


def sigmoid(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
  """Per-label probabilities (float64) of logits / temperature."""
  return special.expit(np.asarray(logits, np.float64) / temperature)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float,
                            multi_label: bool = False) -> float:
  """Mean NLL of `labels` under logits / temperature.

  Single-label: logits [N, C], labels int [N]; multi-label: logits [N, L], labels multi-hot
  [N, L] (mean over examples of the summed per-label binary cross-entropies).
  """
  z = np.asarray(logits, np.float64) / temperature
  if multi_label:
    y = np.asarray(labels, np.float64)
    # BCE with logits, stable form: log(1 + e^z) - y z.
    return float(np.mean(np.sum(np.logaddexp(0.0, z) - y * z, axis=-1)))
  labels = np.asarray(labels, np.int64)
  log_probs = z - special.logsumexp(z, axis=-1, keepdims=True)
  return float(-np.mean(log_probs[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, multi_label: bool = False) -> float:
  """The T > 0 minimising the validation NLL of logits / T (bounded Brent search on log T).

  The NLL is convex in 1/T, so it has one minimum along log T and the search finds it.
  """
  if len(logits) == 0:
    raise ValueError("fit_temperature: no examples")
  result = optimize.minimize_scalar(
      lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t)), multi_label),
      bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6})
  return float(np.exp(result.x))


def calibration_bins(confidence: np.ndarray, correct: np.ndarray,
                     num_bins: int = NUM_CALIBRATION_BINS) -> dict[str, Any]:
  """Reliability-diagram bins of probabilities `confidence` against outcomes `correct`.

  `num_bins` equal-width bins on [0, 1]; a value on an inner edge goes to the lower bin,
  as in sklearn.calibration.calibration_curve. Returns edges [num_bins + 1], and per bin
  count, confidence (mean) and accuracy (NaN where empty), plus the expected calibration
  error 'ece' (the count-weighted mean |accuracy - confidence|).
  """
  confidence = np.asarray(confidence, np.float64).reshape(-1)
  correct = np.asarray(correct, np.float64).reshape(-1)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  bins = np.searchsorted(edges[1:-1], confidence)
  count = np.bincount(bins, minlength=num_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_confidence = np.bincount(bins, confidence, num_bins) / count
    accuracy = np.bincount(bins, correct, num_bins) / count
  filled = count > 0
  ece = float(np.sum(count[filled] * np.abs(accuracy[filled] - mean_confidence[filled]))
              / max(count.sum(), 1))
  return {"edges": edges, "count": count, "confidence": mean_confidence, "accuracy": accuracy,
          "ece": ece}


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray,
                               multi_label: bool = False,
                               num_bins: int = NUM_CALIBRATION_BINS) -> float:
  """ECE (module docstring) of probabilities [N, C] with int labels [N], or of per-label
  probabilities [N, L] with multi-hot labels [N, L] (`multi_label`)."""
  probabilities = np.asarray(probabilities, np.float64)
  if multi_label:
    return calibration_bins(probabilities, labels, num_bins)["ece"]
  correct = probabilities.argmax(-1) == np.asarray(labels, np.int64)
  return calibration_bins(probabilities.max(-1), correct, num_bins)["ece"]
