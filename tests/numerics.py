"""Tolerances that scale with the magnitude of what they compare.

XLA's CPU kernels differ between machines (AMD and Intel, AVX2 and AVX-512 take other
summation orders), so an absolute tolerance that holds on one CPU fails on another for
tensors whose entries are large. Here the tolerance is relative to the largest entry.
"""

import numpy as np


def assert_close(actual, desired, rel: float, err_msg: str = "", floor: float = 0.0) -> float:
  """max|actual - desired| <= rel * max(max|desired|, floor); returns the measured ratio.

  `floor`: the scale of the computation the tensor comes from, for tensors that are zero
  in exact arithmetic (e.g. a key bias's gradient: softmax ignores a shift of all scores)
  and so hold only rounding noise of the larger terms around them.
  """
  actual = np.asarray(actual, np.float64)
  desired = np.asarray(desired, np.float64)
  assert actual.shape == desired.shape, (actual.shape, desired.shape, err_msg)
  scale = max(float(np.abs(desired).max(initial=0.0)), floor, 1e-30)
  ratio = float(np.abs(actual - desired).max(initial=0.0)) / scale
  assert ratio <= rel, f"{err_msg}: max|diff| / max|desired| = {ratio:.3g} > {rel:g}"
  return ratio
