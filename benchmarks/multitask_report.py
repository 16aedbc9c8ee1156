"""Multi-task vs single-task fine-tuning on SST-2, CoLA, MRPC and RTE, and the task sampler.

  python benchmarks/multitask_report.py [--glue_dir=DIR] [--steps_per_task=150] [--batch_size=32] \
      [--workdir=/tmp/multitask_report]

--glue_dir defaults to $FLAXBERT_DATA/glue, else ../shared/data/glue beside the repository.

1. The sampler: for the four training sets' sizes, the share of each task over 1,000
   steps against the configured probabilities, for proportional, temperature (T=2) and
   equal mixing (cheap: no model).
2. One multi-task run of 4 x --steps_per_task steps (equal mixing: ~steps_per_task steps
   per task) with the packaged MiniLM, max_seq_length 64, then four single-task runs of
   --steps_per_task steps each, same recipe. Prints each task's dev metrics side by side
   and one JSON summary at the end.
"""

import argparse
import json
import logging
import os
import shutil
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

import common
from flaxbert_cls.data import batching as data_lib
from flaxbert_cls.data import readers
from flaxbert_cls.data import tasks as tasks_lib
from flaxbert_cls.training import train

TASKS = ("sst2", "cola", "mrpc", "rte")


def _base_config(args, steps: int):
  return common.short_run_config(
      steps, data_dir=args.glue_dir, seq_buckets=(32, 64), batch_size=args.batch_size,
      eval_batch_size=128, checkpoint_every_steps=100_000, keep_best_checkpoints=0,
      cache_dir=os.path.join(args.workdir, "cache"))  # tokenize each file once for all runs


def sampler_table(sizes: dict[str, int], steps: int = 1000, seed: int = 42) -> dict[str, dict]:
  """Configured vs drawn share of each task over `steps` steps, per mixing strategy."""
  out = {}
  for mixing, temperature in (("proportional", 1.0), ("temperature", 2.0), ("equal", 1.0)):
    p = data_lib.mixing_probabilities(list(sizes.values()), [1.0] * len(sizes), mixing,
                                      temperature)
    orders = [data_lib.TrainOrder(np.ones(n, np.int64), 32, seed + i)
              for i, n in enumerate(sizes.values())]
    mixture = data_lib.TaskMixture(orders, p, seed)
    drawn = np.bincount([mixture.task_for_step(s) for s in range(steps)],
                        minlength=len(sizes)) / steps
    name = f"temperature T={temperature:g}" if mixing == "temperature" else mixing
    out[name] = {t: {"configured": round(float(a), 4), "drawn": round(float(b), 4)}
                 for t, a, b in zip(sizes, p, drawn)}
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--glue_dir", default=os.path.join(common.data_dir(), "glue"))
  parser.add_argument("--steps_per_task", type=int, default=150)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--workdir", default="/tmp/multitask_report")
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)
  for name in ("multi", *TASKS):  # fresh runs; the token cache is kept for the next call
    shutil.rmtree(os.path.join(args.workdir, name), ignore_errors=True)
  os.makedirs(args.workdir, exist_ok=True)

  sizes = {}
  for name in TASKS:
    task = tasks_lib.GLUE_TASKS[name]
    sizes[name] = len(readers.read_file(readers.glue_file(args.glue_dir, task, "train"), task))
  table = sampler_table(sizes)
  print("train sizes:", sizes)
  for mixing, rows in table.items():
    print(f"{mixing:>16}: " + "  ".join(f"{t} {r['configured']:.3f}/{r['drawn']:.3f}"
                                        for t, r in rows.items()) + "  (configured/drawn)")

  steps = args.steps_per_task * len(TASKS)
  c = _base_config(args, steps)
  c.tasks = tuple({"task_name": name} for name in TASKS)
  c.mixing = "equal"
  t0 = time.time()
  multi = train.train_and_evaluate(c, os.path.join(args.workdir, "multi"))
  multi_seconds = time.time() - t0
  mixture_counts = np.bincount(
      [data_lib.TaskMixture([None] * len(TASKS), np.full(len(TASKS), 1 / len(TASKS)),
                            c.seed).task_for_step(s) for s in range(steps)], minlength=len(TASKS))

  single, single_seconds = {}, {}
  for name in TASKS:
    c = _base_config(args, args.steps_per_task)
    c.task_name = name
    t0 = time.time()
    single[name] = train.train_and_evaluate(c, os.path.join(args.workdir, name))["eval"]
    single_seconds[name] = time.time() - t0

  rows = []
  print(f"\n{'task':<6} {'metric':<22} {'multi-task':>10} {'single':>8}  (steps: multi / single)")
  for i, name in enumerate(TASKS):
    task = tasks_lib.GLUE_TASKS[name]
    for metric in task.metrics:
      m, s = multi["eval"][f"{name}/{metric}"], single[name][metric]
      print(f"{name:<6} {metric:<22} {m:>10.4f} {s:>8.4f}  ({mixture_counts[i]} / "
            f"{args.steps_per_task})")
      rows.append({"task": name, "metric": metric, "multi_task": round(m, 4),
                   "single_task": round(s, 4)})
  average_single = float(np.mean([single[n][tasks_lib.GLUE_TASKS[n].main_metric]
                                  for n in TASKS]))
  print(f"average of main metrics: multi-task {multi['eval']['average']:.4f}, "
        f"single-task {average_single:.4f}")
  print(json.dumps({
      "train_sizes": sizes, "sampler_1000_steps": table, "steps_per_task": args.steps_per_task,
      "multi_task_steps_drawn": dict(zip(TASKS, map(int, mixture_counts))),
      "batch_size": args.batch_size, "max_seq_length": 64, "metrics": rows,
      "average_main_metric": {"multi_task": round(multi["eval"]["average"], 4),
                              "single_task": round(average_single, 4)},
      "seconds": {"multi_task": round(multi_seconds, 1),
                  **{k: round(v, 1) for k, v in single_seconds.items()}},
  }, indent=1))


if __name__ == "__main__":
  main()
