"""Several runs as one predictor: the mean of their probabilities, handed on as logits.

Members (a sweep's, or runs of one recipe with other seeds) are averaged in probability
space, where averaging is what an ensemble means; the mean goes back through the link
(log for a softmax, logit for sigmoids) so thresholds, calibration and the prediction files
treat the ensemble exactly as one run's logits: softmax / sigmoid of what this returns is
the members' mean probability.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from flaxbert_cls.decisions.calibration import sigmoid, softmax

_TINY = 1e-7  # keeps a unanimous 0 or 1 finite as a logit (float32 sigmoid saturates there)


def _mean_probabilities(member_logits: Sequence[np.ndarray], multi_label: bool) -> np.ndarray:
  """The members' mean class probabilities [N, C] (sigmoid per label for multi-label)."""
  link = sigmoid if multi_label else softmax
  return np.mean([link(np.asarray(x, np.float64)) for x in member_logits], axis=0)


def ensemble_logits(member_logits: Sequence[np.ndarray], multi_label: bool = False,
                    regression: bool = False) -> np.ndarray:
  """Logits [N, C] whose softmax (sigmoid for multi-label) is the members' mean probability;
  for regression the members' mean prediction."""
  if not member_logits:
    raise ValueError("an ensemble needs at least one member")
  shapes = {np.shape(x) for x in member_logits}
  if len(shapes) != 1:
    raise ValueError(f"members' logits differ in shape: {sorted(shapes)}")
  if regression:
    return np.mean(np.asarray(member_logits, np.float64), axis=0).astype(np.float32)
  p = np.clip(_mean_probabilities(member_logits, multi_label), _TINY, 1 - _TINY)
  out = np.log(p) - np.log1p(-p) if multi_label else np.log(p)
  return out.astype(np.float32)
