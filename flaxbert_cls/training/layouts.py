"""Where a run's members sit: one run's state, or a sweep's members stacked on a leading axis.

The loop is the same for both: it asks its layout for the jitted step, the batches, each
member's parameters at an eval, the best tracker and what the run adds at its end. A single
run is the one-member case with no member axis; `for_experiment` is the one place that
tells the two apart (from `exp.members`, the config's grid).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import numpy as np
import optax

from flaxbert_cls.data import batching as data_lib
from flaxbert_cls.decisions import baseline as baseline_lib
from flaxbert_cls.decisions import tuning as decisions_lib
from flaxbert_cls.training import selection
from flaxbert_cls.training import batches as batches_lib
from flaxbert_cls.training import experiment as experiment_lib
from flaxbert_cls.training import members as members_lib
from flaxbert_cls.training import optimizer as optim
from flaxbert_cls.training import step as step_lib


class SingleRun:
  """One run: the state as is, its own step, batches and tracker."""

  def __init__(self, exp: experiment_lib.Experiment):
    self.exp = exp

  def jit_step(self, state: Any, shardings: Any, tx: optax.GradientTransformation,
               schedule: optax.Schedule, total_steps: int) -> Callable:
    del total_steps  # in the schedule
    return step_lib.jit_train_step(self.exp, state.params, shardings, tx, schedule)

  def batches(self, splits: list[data_lib.TokenizedSplit], mixture: data_lib.TaskMixture,
              steps: range) -> Iterator[dict[str, jax.Array]]:
    return batches_lib.global_batches(self.exp, splits, mixture, steps)

  def tracker(self) -> selection.Bests:
    return selection.Bests(self.exp.selection_key(), self.exp.config.early_stopping_patience)

  def each_member(self, params: Any) -> Iterator[tuple[int, Any]]:
    """(member index, that member's parameters as a single run's tree)."""
    yield 0, params

  def named(self, member: int, metrics: dict[str, float], records: list[dict[str, Any]]
            ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """A member's eval metrics and records as metrics.jsonl holds them."""
    del member
    return metrics, records

  def decide(self, workdir: str, step: int, logits: np.ndarray, labels: np.ndarray
             ) -> dict[str, float]:
    """Temperature / thresholds / blend weight fitted on the eval's logits and saved
    (config.calibrate, ...); a blend reads the baseline's validation probabilities."""
    baseline = (baseline_lib.validation_probabilities(workdir, len(labels))
                if self.exp.config.blend_baseline else None)
    return decisions_lib.after_eval(self.exp, workdir, step, logits, labels, baseline)

  def results(self, best: selection.Bests, workdir: str) -> dict[str, Any]:
    """What the run's result adds at its end."""
    del best, workdir
    return {}


class StackedMembers(SingleRun):
  """A sweep: every member at once, its state stacked [members, ...] (members.py)."""

  def jit_step(self, state: Any, shardings: Any, tx: optax.GradientTransformation,
               schedule: optax.Schedule, total_steps: int) -> Callable:
    del state, tx, schedule  # per member: the step's hyper rows
    return step_lib.jit_stacked_train_step(self.exp, shardings, total_steps)

  def batches(self, splits: list[data_lib.TokenizedSplit], mixture: data_lib.TaskMixture,
              steps: range) -> Iterator[dict[str, jax.Array]]:
    del mixture  # each member draws its own seed's
    return batches_lib.stacked_global_batches(self.exp, splits, steps)

  def tracker(self) -> selection.Bests:
    return selection.Bests(self.exp.selection_key(), self.exp.config.early_stopping_patience,
                              len(self.exp.members))

  @functools.cached_property
  def _unstack(self) -> Callable:
    """One member's params from the stacked ones: jitted once per run, not per eval."""
    boxed, param_shardings = self.exp.abstract_params()
    frozen = optim.frozen_mask(nn.unbox(boxed), self.exp.config)
    return jax.jit(lambda p, i: members_lib.unstack(p, frozen, i), out_shardings=param_shardings)

  def each_member(self, params: Any) -> Iterator[tuple[int, Any]]:
    for i in range(len(self.exp.members)):
      yield i, self._unstack(params, i)

  def named(self, member: int, metrics: dict[str, float], records: list[dict[str, Any]]
            ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """'member<i>/<metric>'; each record carries the member's index and values."""
    values = self.exp.members[member]
    return ({f"member{member}/{k}": v for k, v in metrics.items()},
            [{"member": member, **values, **r} for r in records])

  def decide(self, workdir: str, step: int, logits: np.ndarray, labels: np.ndarray
             ) -> dict[str, float]:
    del workdir, step, logits, labels  # decisions are one run's (fit them on the chosen member)
    return {}

  def results(self, best: selection.Bests, workdir: str) -> dict[str, Any]:
    """The sweep table: each member scored by its best evaluation (what export --member picks)."""
    if not all(t.best for t in best.trackers):
      return {}
    table = members_lib.results_table(
        self.exp.members, [t.best["metrics"][best.key] for t in best.trackers], best.key)
    markdown = members_lib.write_results(workdir, table)
    return {"sweep": table, "sweep_markdown": markdown}


def for_experiment(exp: experiment_lib.Experiment) -> SingleRun:
  return StackedMembers(exp) if exp.members else SingleRun(exp)
