"""The TF-IDF + linear-model baseline of README recipes, on the rows each recipe uses.

  python tools/baseline_table.py configs/demo.py configs/goemotions.py configs/sms_spam.py \
      configs/newsgroups.py [--c=4 --c=1]

Each config's own train and validation files, task, labels, class weights and threshold
tuning go through the same code as a run's baseline (decisions/baseline.py, what
`config.baseline='tfidf'` fits beside every run), so the figures are the ones a run logs
as 'baseline/<metric>'. Prints a markdown table: config, C, metrics, rows, seconds.
SMS spam and 20 Newsgroups read the splits their configs' docstrings make first
(tools/dedup_split.py, tools/newsgroups_split.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import common  # noqa: F401  (puts the repository on sys.path)

from flaxbert_cls.data import batching as data_lib
from flaxbert_cls.data import class_weights as class_weights_lib
from flaxbert_cls.data import tasks as tasks_lib
from flaxbert_cls.decisions import baseline


def load_config(path: str):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def measure(path: str, c: float) -> dict:
  """The baseline's validation metrics for config file `path`, with timing and row counts."""
  config = load_config(path)
  task = tasks_lib.get_task(config)
  label_names = None if task.is_regression else data_lib.label_names_for(config, task)
  train = data_lib.read_split(config, task, "train", label_names)
  validation = data_lib.read_split(config, task, "validation", label_names)
  weights = class_weights_lib.resolve(config.get("class_weights", ""), train.labels,
                                      label_names, task.problem_type,
                                      config.get("max_pos_weight", 30.0))
  start = time.time()
  metrics = baseline.fit_and_score(train, validation, task, config,
                                   1 if label_names is None else len(label_names), weights, c)
  return {"config": path, "c": c, "metrics": metrics, "train_rows": len(train),
          "validation_rows": len(validation), "seconds": time.time() - start}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("configs", nargs="+", help="config files (configs/*.py)")
  parser.add_argument("--c", type=float, action="append",
                      help=f"inverse regularization strength(s); default {baseline.C}")
  args = parser.parse_args()
  print("| config | C | baseline metrics (validation) | train / validation rows | fit + score |")
  print("|---|---|---|---|---|")
  for path in args.configs:
    for c in args.c or [baseline.C]:
      row = measure(path, c)
      metrics = ", ".join(f"{k} {v:.4f}" for k, v in row["metrics"].items())
      print(f"| `{path}` | {c:g} | {metrics} | {row['train_rows']:,} / "
            f"{row['validation_rows']:,} | {row['seconds']:.1f}s |", flush=True)


if __name__ == "__main__":
  main()
