"""What each step trains: the task mixture, the number of steps and the global batches.

One task is the 1-task mixture (every step is its step, exactly the single-task order);
a sweep's members each draw their own seed's order, stacked on a leading member axis.
"""

from __future__ import annotations

import logging
import math
from typing import Iterator

import jax
import ml_collections
import numpy as np

from flaxbert_cls import config as config_lib
from flaxbert_cls.data import batching as data_lib
from flaxbert_cls.data import packing
from flaxbert_cls.errors import UserError
from flaxbert_cls.training import experiment as experiment_lib
from flaxbert_cls.training import members as members_lib

log = logging.getLogger(__name__)


def task_mixture(exp: experiment_lib.Experiment, splits: list[data_lib.TokenizedSplit],
                  seed: int | None = None) -> data_lib.TaskMixture:
  """Which task and examples each step trains. One task is the 1-task mixture: every step
  is its step, exactly the single-task order. `seed`: a sweep member's (default config.seed)."""
  config = exp.config
  if seed is not None:
    config = config_lib.member_config(config, {"seed": seed})
  orders = []
  for i, (run_task, split) in enumerate(zip(exp.tasks, splits)):
    try:
      orders.append(packing.PackedOrder(
          split.document_lengths, config.batch_size, config.seed + i, config.max_seq_length,
          config.packing_max_examples) if config.packing else data_lib.TrainOrder(
              split.document_lengths, config.batch_size, config.seed + i,
              config.length_grouping_window))
    except UserError as e:
      raise UserError(f"task {run_task.name}: {e}" if exp.multitask else str(e)) from None
  mixture = data_lib.TaskMixture(
      orders, data_lib.mixing_probabilities([len(s) for s in splits],
                                            [t.weight for t in exp.tasks], config.mixing,
                                            config.mixing_temperature), config.seed)
  if exp.multitask and seed is None:
    log.info("Mixing (%s): %s", config.mixing, "  ".join(
        f"{t.name} {p:.3f}" for t, p in zip(exp.tasks, mixture.probabilities)))
  return mixture


def total_steps(config: ml_collections.ConfigDict, mixture: data_lib.TaskMixture) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return math.ceil(config.num_train_epochs * mixture.steps_per_epoch)


def labels_dtype(exp: experiment_lib.Experiment) -> type:
  """Every task's labels in one dtype: one jit signature whichever task a step draws."""
  return np.float32 if any(t.task.is_regression or t.task.is_multilabel
                           for t in exp.tasks) else np.int32


def label_width(exp: experiment_lib.Experiment) -> int | None:
  """Multi-task runs with a multi-label head: every task's labels as [batch, width] rows
  (multi-hot, or the class id / score in column 0), one jit signature; else None."""
  if not exp.multitask or not any(t.task.is_multilabel for t in exp.tasks):
    return None
  return max(t.num_labels for t in exp.tasks if t.task.is_multilabel)


def global_batches(exp: experiment_lib.Experiment, splits: list[data_lib.TokenizedSplit],
                   mixture: data_lib.TaskMixture, steps: range) -> Iterator[dict[str, jax.Array]]:
  """One run's global batches for `steps`, prepared in a background thread."""
  config = exp.config
  return data_lib.prefetch(
      data_lib.to_global(data_lib.train_batch(splits, mixture, step, config.seq_buckets,
                                              config.max_seq_length, labels_dtype(exp),
                                              exp.batch_sharding, label_width(exp),
                                              config.train_windows,
                                              config.train_windows_first),
                         exp.batch_sharding)
      for step in steps)


def stacked_global_batches(exp: experiment_lib.Experiment,
                           splits: list[data_lib.TokenizedSplit], steps: range
                           ) -> Iterator[dict[str, jax.Array]]:
  """A sweep's batches: each member's in its own seed's order, stacked [members, batch, ...]."""
  config = exp.config
  seeds = members_lib.member_seeds(config, exp.members)
  if len(set(seeds)) > 1 and len(config.seq_buckets) > 1:
    log.warning("Sweep: members with other seeds draw other batches; each step pads all to the "
                "longest one's bucket, so a member's dropout masks (drawn per padded shape) "
                "differ from its solo run's. It trains like it, not bit for bit; for exact "
                "equality use one bucket (config.seq_buckets=(max_seq_length,)).")
  by_seed = {seed: task_mixture(exp, splits, seed) for seed in set(seeds)}
  sharding = members_lib.stacked_batch_sharding(exp.mesh)
  # Rows are each process's contiguous block (process_rows without a sharding), which
  # make_array_from_process_local_data places along the batch axis, after 'member'.
  return data_lib.prefetch(
      {k: jax.make_array_from_process_local_data(sharding, v)
       for k, v in members_lib.stack_batches([
           data_lib.train_batch(splits, by_seed[seed], step, config.seq_buckets,
                                config.max_seq_length, labels_dtype(exp),
                                label_width=label_width(exp),
                                windows_per_document=config.train_windows,
                                keep_first_window=config.train_windows_first)
           for seed in seeds]).items()}
      for step in steps)
