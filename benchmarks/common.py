"""What the benchmarks and the data tools share: the repository's paths, the shared data folder,
a short recipe.

Importing it puts the repository root on sys.path, so `python benchmarks/NAME.py` (and
tools/NAME.py, which puts benchmarks/ on its path first) finds flaxbert_cls in a checkout
without an install.
"""

from __future__ import annotations

import os
import sys
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DATA = os.path.join(REPO, "examples", "data", "sst2")  # the SST-2 sample in the repo

if REPO not in sys.path:
  sys.path.insert(0, REPO)


def data_dir(override: str = "") -> str:
  """The shared data folder (glue/SST-2/train.tsv, ...): `override`, else $FLAXBERT_DATA.

  Without either, `../shared/data` beside the repository, where CI and the
  developers' checkouts find it.
  """
  return override or os.environ.get("FLAXBERT_DATA") or os.path.join(
      os.path.dirname(REPO), "shared", "data")


def data_path(*parts: str, override: str = "") -> str:
  """A path inside `data_dir(override)`; exits with a hint when it is not there."""
  path = os.path.join(data_dir(override), *parts)
  if not os.path.exists(path):
    raise SystemExit(f"{path} not found: set FLAXBERT_DATA (or the tool's flag) to the folder "
                     "holding glue/SST-2/train.tsv")
  return path


def short_run_config(steps: int, **overrides: Any) -> Any:
  """The benchmarks' short fine-tune: the packaged MiniLM, lr 1e-4, 10% warmup, four log lines."""
  from flaxbert_cls.model import hf  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.config import default_config  # pylint: disable=g-import-not-at-top
  c = default_config()
  c.model_name_or_path = hf.packaged_minilm_dir()
  c.max_seq_length = 64
  c.learning_rate = 1e-4
  c.num_train_steps = steps
  c.warmup_steps = max(1, steps // 10)
  c.log_every_steps = max(1, steps // 4)
  c.update(overrides)
  return c
