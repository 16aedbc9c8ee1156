"""The loop's checkpoint rules: when to evaluate and save (every N steps, or by a timer agreed
by every process), preemption (SIGTERM or JAX's sync point), what each checkpoint records,
resuming, and the guard against non-finite steps.

Resuming restores the exact state (bit-exact: dropout is a function of seed and step, the
data order of the step number); a checkpoint of another run is refused in one line.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.data import batching as data_lib
from flaxbert_cls.errors import Preempted, UserError, one_line
from flaxbert_cls.model import hf
from flaxbert_cls.training import selection
from flaxbert_cls.training import checkpoints as checkpoint_lib
from flaxbert_cls.training import experiment as experiment_lib
from flaxbert_cls.training import optimizer as optim
from flaxbert_cls.training import starts
from flaxbert_cls.training.state import TrainState

log = logging.getLogger(__name__)


def with_cache_dir(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy with cache_dir set: token caches are local files, so a remote workdir caches in
  the user's cache dir."""
  config = ml_collections.ConfigDict(config)
  with config.unlocked():
    config.cache_dir = config.cache_dir or (
        os.path.expanduser("~/.cache/flaxbert_cls/tokens") if workdir_lib.is_remote(workdir)
        else os.path.join(workdir, "cache"))
  return config


def eval_due(config: ml_collections.ConfigDict, step: int, total_steps: int) -> bool:
  return bool(config.eval_every_steps and step % config.eval_every_steps == 0) or \
      step == total_steps


def checkpoint_due(config: ml_collections.ConfigDict, step: int, total_steps: int,
                    save_timer: SaveTimer) -> bool:
  return (step % config.checkpoint_every_steps == 0 or step == total_steps
          or save_timer.due(step))


class FiniteGuard:
  """Stops (or warns, nonfinite_policy='skip') on a step whose loss or gradient was not finite.

  The flag is read one step late, so reading it does not stall the device.
  """

  def __init__(self, policy: str, ckpt: checkpoint_lib.Checkpoints):
    self.policy, self.ckpt = policy, ckpt
    self._pending = None

  def check_later(self, step: int, finite: jax.Array) -> None:
    self.check_now()
    self._pending = (step, finite)

  def check_now(self) -> None:
    if self._pending is None:
      return
    (step, finite), self._pending = self._pending, None
    if bool(finite):
      return
    if self.policy == "skip":
      log.warning("step %d: loss or gradient is not finite; the update was skipped", step)
      return
    raise UserError(f"step {step}: loss or gradient is not finite (NaN/inf); training stopped. "
                    f"Checkpoints in {self.ckpt.directory} are intact (latest: "
                    f"{self.ckpt.latest_step()}). Lower learning_rate, or set "
                    "config.nonfinite_policy='skip'")


def run_meta(exp: experiment_lib.Experiment, total_steps: int,
              train_splits: list[data_lib.TokenizedSplit]) -> dict[str, Any]:
  """What every checkpoint records about the run (resume checks it)."""
  task_name, label_names = exp.run_identity()
  meta = {"label_names": label_names, "task_name": task_name, "total_steps": total_steps,
          "model_name_or_path": exp.config.model_name_or_path,
          "batch_size": exp.config.batch_size,
          "train_data": "+".join(split.content_hash for split in train_splits)}
  if exp.members:
    meta["sweep"] = list(exp.members)  # another grid cannot resume these members
  return meta


# Recorded since a later version: a checkpoint without them resumes unchecked.
_RECORDED_LATER = ("batch_size", "train_data")


def check_same_run(ckpt: checkpoint_lib.Checkpoints, run_meta: dict[str, Any]) -> None:
  """Refuses to resume a checkpoint of another model, task, label set, batch size or data."""
  saved_meta, _ = ckpt.read_meta()
  for key, value in run_meta.items():
    if key == "total_steps" or (key in _RECORDED_LATER and key not in saved_meta):
      continue
    saved = saved_meta.get(key)
    if saved == value:
      continue
    if key == "train_data":
      what = (f"was trained on other data (content hash {saved}); this config's training data "
              "(train_file / data_dir / dataset) has " + repr(value))
    else:
      what = f"was made with {key}={saved!r}, this config has {value!r}"
    raise UserError(f"{ckpt.directory}: checkpoint {what}; use another --workdir, or "
                    "--config.resume=False to start over")


def restore_or_init(exp: experiment_lib.Experiment, ckpt: checkpoint_lib.Checkpoints,
                    run_meta: dict[str, Any], best: selection.Bests
                    ) -> tuple[TrainState, Any, Any, Any]:
  """(state, shardings, optimizer, schedule): the workdir's latest checkpoint, else the
  start's weights on a fresh state. `best` takes the checkpoint's best evals.

  A checkpoint of another run (`check_same_run`) is refused before anything compiles.
  """
  config = exp.config
  if ckpt.all_steps() and not config.resume:
    log.warning("config.resume=False: deleting the checkpoints in %s", ckpt.directory)
    ckpt.delete_all()
  resuming = bool(ckpt.all_steps())
  if resuming:
    check_same_run(ckpt, run_meta)
  pretrained = None if resuming else hf.resolve(config.model_name_or_path)
  state, state_shardings, tx, schedule = starts.create_train_state(
      exp, run_meta["total_steps"], pretrained)
  if resuming:
    state, saved_meta, restored_step = ckpt.restore(
        checkpoint_lib.abstract_with_shardings(state, state_shardings))
    ckpt.delete_after(restored_step)  # damaged later steps: saving them again would fail
    best.restore(saved_meta)
    log.info("Resumed from %s/%d.", ckpt.directory, restored_step)
  optim.log_parameters(state.params, config)
  return state, state_shardings, tx, schedule


def save(ckpt: checkpoint_lib.Checkpoints, step: int, state: TrainState, meta: dict[str, Any],
          main_metric: float | None) -> None:
  """Saves asynchronously; an evaluated step is ranked by its main metric for best-k."""
  t_save = time.perf_counter()
  ckpt.save(step, state, meta, main_metric)
  log.info("checkpoint %d: the loop waited %.0f ms (the write continues in the background)",
           step, 1e3 * (time.perf_counter() - t_save))


def exit_preempted(ckpt: checkpoint_lib.Checkpoints, step: int) -> None:
  ckpt.wait()
  log.warning("Preempted: saved step %d to %s; rerun the same command to resume.",
              step, ckpt.directory)
  raise Preempted(f"preempted at step {step}; checkpoint saved")


def write_run_files(exp: experiment_lib.Experiment, workdir: str) -> None:
  """config.json and model/ (HF config + tokenizer): eval and export need nothing else."""
  if jax.process_index() == 0:
    workdir_lib.write_text(workdir_lib.join(workdir, "config.json"),
                           exp.config.to_json(indent=2))
    if exp.started_from is not None:  # a fresh start (not a resume): what it started from
      workdir_lib.write_text(workdir_lib.join(workdir, workdir_lib.STARTED_FROM_NAME),
                             json.dumps(exp.started_from, indent=2))
  experiment_lib.save_model_dir(exp, workdir)


class PreemptionWatcher:
  """Notices SIGTERM (or JAX's multi-host preemption notice) so the loop can save and exit.

  Single process: a SIGTERM handler sets a flag; the step in flight finishes and the
  loop saves at the step boundary. Several processes: JAX's preemption sync point
  (the coordination service passes one process's SIGTERM to all, and they agree on
  the step). Where that service is not available, a warning says so once, and a local
  SIGTERM flag is all-gathered every `check_every` steps instead (like SaveTimer).
  """

  def __init__(self, check_every: int = 1):
    self._signalled = False
    self._previous = None
    self._check_every = max(check_every, 1)
    self._sync_point = jax.process_count() > 1
    if not self._sync_point:
      self._install_handler()

  def _install_handler(self) -> None:
    try:
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    except ValueError:  # not the main thread (e.g. a test runner thread): no handler
      pass

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    self._signalled = True

  def reached(self, step: int) -> bool:
    """True on every process at the same step once any process got a preemption notice."""
    if self._sync_point:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except Exception as e:  # pylint: disable=broad-except  (no preemption service)
        log.warning("JAX's preemption notices are not available (%s); SIGTERM is checked "
                    "every %d steps instead.", one_line(e), self._check_every)
        self._sync_point = False
        self._install_handler()
    if jax.process_count() == 1:
      return self._signalled
    return (step % self._check_every == 0
            and bool(checkpoint_lib.processes_where(self._signalled)))

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class SaveTimer:
  """Time-based saves, decided on process 0 and broadcast so every process saves together.

  Checked only every `check_every` steps: the broadcast is a (tiny) collective.
  """

  def __init__(self, minutes: float, check_every: int):
    self._clock = time.monotonic
    self._seconds = 60.0 * minutes
    self._check_every = max(check_every, 1)
    self._last = self._clock()

  def due(self, step: int) -> bool:
    if self._seconds <= 0 or step % self._check_every:
      return False
    due = self._clock() - self._last >= self._seconds
    if jax.process_count() > 1:
      due = bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))
    return due

  def saved(self) -> None:
    self._last = self._clock()
