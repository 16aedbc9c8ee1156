"""`flaxbert-cls train|eval`: parse flags, then call one function.

  flaxbert-cls train --config=configs/sst2.py --workdir=DIR [--config.learning_rate=3e-5]
  flaxbert-cls eval --workdir=DIR [--config=... --config.validation_file=...] [--step=N]
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from flaxbert_cls.errors import PREEMPTED_EXIT_CODE, Preempted, UserError

COMMANDS = ("train", "eval")

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
_STEP = flags.DEFINE_integer("step", None, "eval: checkpoint step (default: latest).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file in configs/ (train: required; eval: overrides).",
    lock_config=True)


def _main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: flaxbert-cls {{{'|'.join(COMMANDS)}}} --workdir=DIR "
                         "[--config=FILE] [--config.KEY=VALUE ...]")
  command = argv[1]
  if not _WORKDIR.value:
    raise UserError("--workdir is required")
  # Quiet libraries; our own INFO lines are the progress log.
  logging.set_verbosity(logging.INFO)
  std_logging.getLogger("flaxbert_cls").setLevel(std_logging.INFO)
  for noisy in ("absl", "jax", "orbax", "transformers", "datasets", "tensorflow"):
    std_logging.getLogger(noisy).setLevel(std_logging.WARNING)

  from flaxbert_cls import sharding  # pylint: disable=g-import-not-at-top
  from flaxbert_cls import train  # pylint: disable=g-import-not-at-top
  sharding.initialize_distributed()
  if command == "train":
    if _CONFIG.value is None:
      raise UserError("train needs --config=configs/<name>.py")
    result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    _print_metrics("dev", result["eval"])
  elif command == "eval":
    results = train.evaluate_workdir(_WORKDIR.value, _CONFIG.value, _STEP.value)
    _print_metrics("eval", results)


def _print_metrics(name: str, results: dict[str, float]) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    print(f"{name}: " + "  ".join(f"{k}={v:.4f}" for k, v in results.items()), flush=True)


def run() -> None:
  """Console-script entry point: bad input is one line on stderr and exit status 2."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    app.run(_main)
  except UserError as e:
    print(f"flaxbert-cls: error: {e}", file=sys.stderr)
    sys.exit(2)
  except Preempted as e:
    print(f"flaxbert-cls: {e}; run the same command again to resume", file=sys.stderr)
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  run()
