"""Which checkpoint is best: the metric it is chosen by, the best eval so far, early stopping.

A task's main metric chooses its best checkpoints (`keep_best_checkpoints`, `start_step=best`,
eval's default) and stops the run early (`early_stopping_patience`); a single-label task whose
main metric defaulted to accuracy is chosen by macro F1 when the run weighs its classes or its
training classes are skewed (the smallest under SKEWED x the largest), and the log says so.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import logging
import math
from typing import Any

import numpy as np

from flaxbert_cls.data.tasks import SINGLE_LABEL

log = logging.getLogger(__name__)

SKEWED = 0.2  # smallest / largest training class below this: accuracy hides the small ones


def selection_metric(problem_type: str, main_metric: str, explicit: bool,
                     rebalanced: bool, labels: np.ndarray | None, num_labels: int
                     ) -> tuple[str, str]:
  """(the metric to choose checkpoints by, why): macro F1 instead of a defaulted accuracy
  when the run weighs classes or its training classes are skewed; else `main_metric`."""
  if (problem_type != SINGLE_LABEL or main_metric != "accuracy" or explicit
      or labels is None or num_labels < 2):
    return main_metric, ""
  counts = np.bincount(np.asarray(labels, np.int64), minlength=num_labels)
  if rebalanced:
    return "f1_macro", "class_weights or logit_adjustment is set"
  if counts.min() < SKEWED * counts.max():
    return "f1_macro", (f"the training classes are skewed (smallest {counts.min()} rows, "
                        f"largest {counts.max()})")
  return main_metric, ""


def choose_selection_metrics(exp: Any, train_labels: Sequence[np.ndarray | None]) -> None:
  """Each task's main metric (best checkpoints, early stopping) by `selection_metric`, said
  in the log when it is not the task's own."""
  for run_task, labels in zip(exp.tasks, train_labels):
    task = run_task.task
    metric, why = selection_metric(task.problem_type, task.main_metric,
                                   bool(run_task.config.main_metric),
                                   bool(run_task.class_weights or run_task.logit_offsets),
                                   labels, run_task.num_labels)
    if metric != task.main_metric:
      run_task.task = dataclasses.replace(task, main_metric=metric)
      log.info("%schoosing checkpoints by %s, not %s: %s (set config.main_metric to choose)",
               f"{run_task.name}: " if len(exp.tasks) > 1 else "", metric, task.main_metric, why)


@dataclasses.dataclass
class BestTracker:
  """The best eval so far by `key` (higher is better) and early stopping; saved in checkpoints.

  A NaN metric (e.g. Pearson of constant predictions) is never best: no improvement.
  """

  key: str
  patience: int
  best: dict[str, Any] | None = None  # {'step', 'metrics'}
  evals_without_improvement: int = 0
  should_stop: bool = False

  def update(self, step: int, metrics: dict[str, float]) -> None:
    value = metrics[self.key]
    if math.isfinite(value) and (self.best is None or value > self.best["metrics"][self.key]):
      self.best, self.evals_without_improvement = {"step": step, "metrics": metrics}, 0
    else:
      self.evals_without_improvement += 1
    self.should_stop = 0 < self.patience <= self.evals_without_improvement
    if self.should_stop:
      log.info("Early stopping at step %d: %s did not improve for %d evaluations.", step,
               self.key, self.patience)

  def state(self) -> dict[str, Any]:
    return {"best": self.best, "evals_without_improvement": self.evals_without_improvement}

  def restore(self, meta: dict[str, Any]) -> None:
    self.best = meta.get("best")
    self.evals_without_improvement = meta.get("evals_without_improvement", 0)


class Bests:
  """The best eval so far of each member of a run (one for a single run) and early stopping.

  The run stops early once every member would have stopped. Checkpoint metadata holds a
  single run's one BestTracker as it always has ({'best', 'evals_without_improvement'}), a
  sweep's each member's and the best member (`members` > 0).
  """

  def __init__(self, key: str, patience: int, members: int = 0):
    self.key, self.stacked = key, members > 0
    self.trackers = [BestTracker(key, patience) for _ in range(max(members, 1))]
    self.latest: list[dict[str, float]] = []

  def update(self, step: int, member_metrics: list[dict[str, float]]) -> None:
    self.latest = member_metrics
    for tracker, metrics in zip(self.trackers, member_metrics):
      tracker.update(step, metrics)

  @property
  def should_stop(self) -> bool:
    return all(t.should_stop for t in self.trackers)

  def best_member(self) -> int | None:
    """The member with the highest best metric (ties: the lower index)."""
    scored = [(t.best["metrics"][self.key], -i) for i, t in enumerate(self.trackers) if t.best]
    return -max(scored)[1] if scored else None

  @property
  def best(self) -> dict[str, Any] | None:
    """The best member's best eval ({'step', 'metrics'}; a sweep's with 'member')."""
    member = self.best_member()
    if member is None:
      return None
    best = self.trackers[member].best
    return {**best, "member": member} if self.stacked else best

  def state(self) -> dict[str, Any]:
    if not self.stacked:
      return self.trackers[0].state()
    return {"best": [t.best for t in self.trackers], "best_member": self.best_member(),
            "evals_without_improvement": [t.evals_without_improvement for t in self.trackers]}

  def restore(self, meta: dict[str, Any]) -> None:
    if not self.stacked:
      self.trackers[0].restore(meta)
      return
    for i, tracker in enumerate(self.trackers):
      tracker.best = (meta.get("best") or [None] * len(self.trackers))[i]
      tracker.evals_without_improvement = (meta.get("evals_without_improvement")
                                           or [0] * len(self.trackers))[i]

  def checkpoint_metric(self) -> float | list[float]:
    """What best-k checkpointing ranks the last evaluated step by (a sweep: per member)."""
    values = [m[self.key] for m in self.latest]
    return values if self.stacked else values[0]
