"""The one Orbax CheckpointManager of a run: train state + JSON metadata per step.

Keeps the latest `max_to_keep` steps (for resume) and, when asked, the best
`keep_best` steps by the task's main metric (for export and early stopping), in
one directory through one preservation policy. Saves are asynchronous and atomic
(Orbax writes a temporary directory and renames it), so a half-written step is
never picked up; a step that fails to restore is skipped for the one before it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, TypeVar

from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.errors import UserError, one_line

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
BEST_METRIC_KEY = "main_metric"  # the value BestN ranks by (higher is better)

_T = TypeVar("_T")


class Checkpoints:
  """Saves and restores {'state': TrainState arrays, 'meta': JSON} under workdir/checkpoints."""

  def __init__(self, workdir: str, max_to_keep: int = 2, keep_best: int = 0,
               async_save: bool = True, read_only: bool = False, members: int = 0):
    """`members` > 0: a sweep; each member keeps its own best `keep_best` steps."""
    self.directory = workdir_lib.join(workdir_lib.resolve(workdir), CHECKPOINT_SUBDIR)
    if read_only and not workdir_lib.exists(self.directory):
      raise UserError(f"{self.directory}: no checkpoints (is the workdir right?)")
    policies = [checkpoint_managers.LatestN(max(max_to_keep, 1))]
    ranked = [BEST_METRIC_KEY] if members == 0 else [f"{BEST_METRIC_KEY}_{i}"
                                                     for i in range(members)]
    for key in ranked if keep_best > 0 else []:
      policies.append(checkpoint_managers.BestN(
          # Ties go to the earlier step, as in the loop's best tracking.
          get_metric_fn=lambda m, key=key: (m[key], -m["step"]), n=keep_best,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=not read_only, read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def best_step(self, member: int | None = None) -> int | None:
    """The step with the highest main metric among those saved with metrics (of `member`,
    for a sweep; default its best member)."""
    if member is None and self.all_steps():
      member = self.read_meta()[0].get("best_member")
    return _best_from_meta(self, member)

  def save(self, step: int, state: Any, meta: dict[str, Any],
           main_metric: float | list[float] | None = None) -> None:
    """Saves `step` (always: the caller decides when). Disk errors name the directory.

    A sweep's `main_metric` is a list, one per member.
    """
    metrics = None
    if isinstance(main_metric, (list, tuple)):
      main_metric = [float(v) for v in main_metric]
      metrics = {f"{BEST_METRIC_KEY}_{i}": v for i, v in enumerate(main_metric)}
    elif main_metric is not None:
      main_metric = float(main_metric)
      metrics = {BEST_METRIC_KEY: main_metric}
    if main_metric is not None:
      metrics["step"] = step
      meta = dict(meta, main_metric=main_metric)
    with self._save_errors():
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                        metrics=metrics, force=True)

  @contextlib.contextmanager
  def _save_errors(self):
    """Disk full, permissions...: one line naming the directory (async saves fail late)."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      text = str(e)
      if isinstance(e, OSError) or "RESOURCE_EXHAUSTED" in text or "No space left" in text:
        reason = "no space left on device" if ("No space left" in text or getattr(
            e, "errno", None) == 28) else one_line(e)[:200]
        raise UserError(f"{self.directory}: cannot save checkpoint: {reason}; earlier "
                        f"checkpoints are intact ({self.all_steps()})") from None
      raise

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, dict[str, Any], int]:
    """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding).

    Without `step`: the latest step that restores; a damaged step is skipped with a
    warning naming it. Returns (state, meta, step).
    """
    if step is not None and step not in self.all_steps():
      raise UserError(f"{self.directory}: no checkpoint at step {step}; have {self.all_steps()}")

    def load(candidate: int) -> tuple[Any, dict[str, Any]]:
      handler = ocp.StandardCheckpointHandler()
      item = self._item_dir(candidate, "state")
      # Structure first, from Orbax's metadata: a readable checkpoint of another model is
      # a config mistake; anything that fails after this check is damage.
      mismatch = _structure_mismatch(handler.metadata(item).tree, abstract_state)
      if mismatch:
        raise _MismatchError(mismatch)
      state = handler.restore(item, args=ocp.args.StandardRestore(abstract_state))
      return state, self._load_meta(candidate)

    def on_error(candidate: int, e: Exception, where: str) -> UserError | None:
      if isinstance(e, _MismatchError):
        return UserError(f"{self.directory}/{candidate}: checkpoint does not fit this config's "
                         f"model or optimizer ({e}); use the run's original "
                         "config, or --config.resume=False to start over")
      if step is not None:
        return UserError(f"{self.directory}/{candidate}: checkpoint is damaged{where}: "
                         f"{one_line(e)}")
      log.warning("Checkpoint %s/%d is damaged%s (%s); falling back to an earlier step.",
                  self.directory, candidate, where, one_line(e))
      return None

    (state, meta), candidate = self._newest_that_loads(
        step, load, on_error, "no checkpoint to restore",
        lambda steps: f"every checkpoint {steps} is damaged; none can be restored")
    return state, meta, candidate

  def read_meta(self, step: int | None = None) -> tuple[dict[str, Any], int]:
    """The metadata of `step` (default: the latest readable one) and its step."""

    def on_error(candidate: int, e: Exception, where: str) -> None:
      log.warning("Checkpoint %s/%d: unreadable metadata%s (%s)", self.directory, candidate,
                  where, one_line(e))
      return None

    return self._newest_that_loads(
        step, self._load_meta, on_error, "no checkpoint",
        lambda steps: f"no checkpoint with readable metadata among {steps}")

  def _item_dir(self, step: int, item: str) -> epath.Path:
    return epath.Path(self.directory) / str(step) / item

  def _load_meta(self, step: int) -> dict[str, Any]:
    return dict(ocp.JsonCheckpointHandler().restore(self._item_dir(step, "meta"),
                                                    args=ocp.args.JsonRestore()))

  def _newest_that_loads(self, step: int | None, load: Callable[[int], _T],
                         on_error: Callable[[int, Exception, str], UserError | None],
                         none_message: str, all_failed_message: Callable[[list[int]], str]
                         ) -> tuple[_T, int]:
    """`load(step)`; without `step`, the newest step that loads, trying older ones in turn.

    A step counts as loaded only if it loaded on every process (a tiny all-gather per
    step tried), so all processes return the same step. `load` must not wait for other
    processes: it reads through Orbax's handlers, not the manager, whose restore ends
    in a barrier that a process failing before it would never reach.
    `on_error(step, error, where)` returns an error to stop with, or None (after a
    warning) to try the step before; `where` names the processes that failed when not
    all did. If one process stops, all do. Messages name the directory. Returns (what
    `load` returned, its step).
    """
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    if not steps:
      raise UserError(f"{self.directory}: {none_message}")
    for candidate in steps:
      try:
        loaded, error = load(candidate), None
      except Exception as e:  # pylint: disable=broad-except  (any damage: try the one before)
        loaded, error = None, e
      failed = processes_where(error is not None)
      if not failed:
        return loaded, candidate
      where = "" if len(failed) == jax.process_count() else f" (on process {failed})"
      stop = on_error(candidate, error or RuntimeError("unreadable on another process"), where)
      stopped = processes_where(stop is not None)  # one process alone would wait forever
      if stopped:
        raise stop or UserError(f"{self.directory}/{candidate}: cannot restore (see the log "
                                f"of process {stopped})")
    raise UserError(f"{self.directory}: {all_failed_message(steps)}")

  def delete_all(self) -> None:
    """Starts over (only when the user asked for it: config.resume=False)."""
    self.delete_after(-1)

  def delete_after(self, step: int) -> None:
    """Deletes the steps after `step` (damaged ones a resume skipped: the run saves them anew).

    Every process takes part: Orbax deletes on the primary process and then waits at
    a barrier for all, and each process drops the steps from its own list.
    """
    self.manager.wait_until_finished()
    for later in self.all_steps():
      if later > step:
        self.manager.delete(later)
    self.manager.reload()

  def wait(self) -> None:
    with self._save_errors():
      self.manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()


def parse_step(step: int | str | None) -> int | str | None:
  """--step: None or 'latest' -> None (the latest), 'best', or a step number."""
  if step is None or step == "latest":
    return None
  if isinstance(step, int) or (isinstance(step, str) and step.isdigit()):
    return int(step)
  if step == "best":
    return step
  raise UserError(f"--step={step!r}: use 'latest', 'best' or a step number")


def check_step(workdir: str, step: int | str | None) -> None:
  """A step number must name a saved checkpoint; the error lists the ones there are."""
  if not isinstance(step, int):
    return
  ckpt = Checkpoints(workdir, read_only=True)
  steps = ckpt.all_steps()
  ckpt.close()
  if step not in steps:
    raise UserError(f"--step={step}: {ckpt.directory} has no checkpoint at step {step}; "
                    f"saved steps: {steps}")


def _best_from_meta(ckpt: Checkpoints, member: int | None = None) -> int | None:
  best, best_step = None, None
  for step in ckpt.all_steps():  # ascending: ties go to the earlier step
    try:
      meta, _ = ckpt.read_meta(step)
    except UserError:
      continue
    value = meta.get("main_metric")
    if isinstance(value, list):  # a sweep: one per member
      value = value[member if member is not None else 0]
    if value is not None and (best is None or value > best):
      best, best_step = value, step
  return best_step


class _MismatchError(Exception):
  """A readable checkpoint whose arrays are not this run's state's."""


def _structure_mismatch(saved_tree: Any, abstract_state: Any) -> str | None:
  """The first difference between a saved state's arrays and `abstract_state`'s, or None."""
  def arrays(flat: dict[Any, Any]) -> dict[str, tuple[int, ...]]:
    return {"/".join(map(str, k)): tuple(v.shape) for k, v in flat.items() if hasattr(v, "shape")}
  saved = arrays(ocp.tree.to_flat_dict(saved_tree))
  wanted = arrays(ocp.tree.to_flat_dict(ocp.tree.serialize_tree(abstract_state,
                                                                keep_empty_nodes=True)))
  for path in sorted(set(saved) | set(wanted)):
    if path not in saved:
      return f"{path} is not in the checkpoint"
    if path not in wanted:
      return f"the checkpoint has {path}, this config's state does not"
    if saved[path] != wanted[path]:
      return f"{path} has shape {saved[path]} in the checkpoint, {wanted[path]} here"
  return None


def processes_where(flag: bool) -> list[int]:
  """The processes where `flag` is true (a collective when there are several processes)."""
  if jax.process_count() == 1:
    return [0] if flag else []
  flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
  return [int(p) for p in np.flatnonzero(np.asarray(flags).reshape(-1))]


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
