"""The run and its baseline together: P = w * P(run) + (1 - w) * P(baseline).

Where the bag of words is strong (topic labels of long posts) the two make different
mistakes, and their mean can beat both. Single-label tasks, decided by the argmax. The
weight w is chosen on the validation rows by the task's main metric over a grid; what it
is worth on unseen rows is cross-fitted as thresholds are (each half of the rows scored at
the weight chosen on the other half), since a weight chosen and scored on the same rows
overstates it.
"""

from __future__ import annotations

import numpy as np

from flaxbert_cls.decisions import metrics as metrics_lib

WEIGHTS = np.linspace(0.0, 1.0, 21)  # the run's share: 0 = the baseline alone, 1 = the run
PREFIX = "blend/"  # the scores' names in eval's output and eval.json


def blend(run: np.ndarray, baseline: np.ndarray, weight: float) -> np.ndarray:
  """Class probabilities [N, C] of the blend."""
  return weight * np.asarray(run) + (1.0 - weight) * np.asarray(baseline)


def _scores(run: np.ndarray, baseline: np.ndarray, labels: np.ndarray, metric: str
            ) -> np.ndarray:
  return np.array([metrics_lib.compute_metrics((metric,), blend(run, baseline, w).argmax(-1),
                                               labels)[metric] for w in WEIGHTS])


def best_weight(run: np.ndarray, baseline: np.ndarray, labels: np.ndarray, metric: str
                ) -> float:
  """The grid weight with the best `metric` on these rows; among equals, the middle one of
  them (a plateau's centre moves least on new rows)."""
  scores = _scores(run, baseline, labels, metric)
  best = np.flatnonzero(scores >= scores.max() - 1e-12)
  return float(WEIGHTS[best[len(best) // 2]])


def cross_fitted(run: np.ndarray, baseline: np.ndarray, labels: np.ndarray, metric: str,
                 seed: int = 0) -> np.ndarray:
  """Class ids [N]: each half of the rows (a seeded split) decided by the blend at the weight
  chosen on the other half."""
  run, baseline, labels = np.asarray(run), np.asarray(baseline), np.asarray(labels)
  halves = np.array_split(np.random.default_rng(seed).permutation(len(labels)), 2)
  decided = np.zeros(len(labels), np.int64)
  for tune, score in (halves, halves[::-1]):
    w = best_weight(run[tune], baseline[tune], labels[tune], metric)
    decided[score] = blend(run[score], baseline[score], w).argmax(-1)
  return decided


def scores(probabilities: np.ndarray, baseline: np.ndarray, labels: np.ndarray, metric: str
           ) -> dict[str, float]:
  """The blend of a single-label run's validation probabilities with its baseline's, as
  'blend/<metric>' (cross-fitted: unseen rows), 'blend/<metric>_tuned' (the weight chosen and
  scored on all the rows) and 'blend/weight' (that weight)."""
  labels = np.asarray(labels)
  weight = best_weight(probabilities, baseline, labels, metric)
  tuned = blend(probabilities, baseline, weight).argmax(-1)
  crossed = cross_fitted(probabilities, baseline, labels, metric)
  return {f"{PREFIX}{metric}": metrics_lib.compute_metrics((metric,), crossed, labels)[metric],
          f"{PREFIX}{metric}_tuned": metrics_lib.compute_metrics((metric,), tuned,
                                                                 labels)[metric],
          f"{PREFIX}weight": weight}
