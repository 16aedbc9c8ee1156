"""The one Orbax CheckpointManager of a run: train state + JSON metadata per step."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from flaxbert_cls.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"


class Checkpoints:
  """Saves and restores {'state': TrainState arrays, 'meta': JSON} under workdir/checkpoints.

  Saves are asynchronous and atomic (Orbax writes to a temporary directory and
  renames it), so a half-written step is never picked up.
  """

  def __init__(self, workdir: str, max_to_keep: int | None = 2, save_interval_steps: int = 1,
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save, create=not read_only, read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any], force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"{self.directory}: no checkpoint to restore")
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"{self.directory}: no checkpoint")
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
